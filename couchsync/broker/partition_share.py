"""This worker's share of the partition queues: the ones it holds (the broker made it their single active
consumer), and giving up those beyond its share (`couchsync.partitions.to_release`) once none of their
messages is being handled here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from couchsync.broker.delivery import Delivery
from couchsync.broker.session import Session
from couchsync.config import AmqpSettings
from couchsync.metrics import Metrics
from couchsync.partitions import share, to_release

logger = logging.getLogger(__name__)

# A partition taken over with messages its previous holder had not settled (redelivered) waits this long
# before its first batch starts. That holder may have lost only its broker connection in the middle of a
# batch: the broker hands the partition over at once, while that batch still writes (it cannot be
# interrupted). Ten seconds covers a batch under a burst; the writes are idempotent anyway, so a longer
# one only costs contention. A partition whose first delivery is a new message starts at once.
TAKEOVER_SECONDS = 10.0

OnMessage = Callable[[BlockingChannel, Any, pika.BasicProperties, bytes], None]


class PartitionShare:
    """The partition queues a worker consumes (none without partitions), and the partitions it holds."""

    def __init__(self, settings: AmqpSettings, metrics: Metrics, partitioned: bool) -> None:
        self._settings = settings
        self._metrics = metrics
        self.numbers = {queue: number for number, queue in enumerate(settings.partition_queues)} if partitioned else {}
        self.workers = 1  # consumers of the intake queue at the last probe: one per worker

    def take(self, session: Session, number: int, redelivered: bool) -> None:
        """A delivery came from partition `number`: this worker is its active consumer, it holds it."""
        if number not in session.held:
            session.held.add(number)
            session.held_since[number] = time.monotonic() if redelivered else 0.0
            self.log_held(session)

    def taken_over(self, session: Session, delivery: Delivery) -> float:
        """When this worker became the holder of the delivery's partition (0: not from a partition)."""
        number = self.numbers.get(delivery.queue)
        return session.held_since.get(number, 0.0) if number is not None else 0.0

    def drop(self, session: Session) -> None:
        """Hold none any more: the consumers are cancelled, or the connection is gone."""
        if session.held:
            session.held.clear()
            self.log_held(session)

    def rebalance(self, session: Session) -> None:
        """Start giving up the partitions held beyond this worker's share."""
        for number in to_release(session.held - session.releasing.keys(), self._settings.partitions, self.workers):
            queue = self._settings.partition_queues[number]
            waiting = session.releasing[number] = []
            for key in list(session.gathering):  # not started: handed back with what comes meanwhile
                deliveries, since = session.gathering[key]
                waiting.extend(d for d in deliveries if d.queue == queue)
                kept = [d for d in deliveries if d.queue != queue]
                if kept:
                    session.gathering[key] = (kept, since)
                else:
                    del session.gathering[key]

    def release_ready(self, session: Session, hand_back: Callable[[Delivery], None], on_message: OnMessage) -> None:
        """Give up each partition being released once none of its messages is being handled here: cancelled,
        the next registered worker becomes its active consumer; what came meanwhile goes back unchanged
        (`hand_back`), and this worker registers again, at the back of the line."""
        for number, waiting in list(session.releasing.items()):
            queue = self._settings.partition_queues[number]
            if sum(1 for d in session.in_flight.values() if d.queue == queue) > len(waiting):
                continue  # a batch of it is still running: the next worker must not start beside it
            del session.releasing[number]
            session.held.discard(number)  # first: the next worker may be active before the cancel returns
            session.channel.basic_cancel(session.consumers.pop(queue))
            for delivery in waiting:
                hand_back(delivery)
            session.consumers[queue] = session.channel.basic_consume(queue, on_message)
            logger.info("released partition %d to the next worker (share %d of %d partitions among %d workers)",
                        number, share(self._settings.partitions, self.workers), self._settings.partitions,
                        self.workers)
            self.log_held(session)

    def log_held(self, session: Session) -> None:
        """The metric and the log line of which partitions this worker holds (is the active consumer of)."""
        for number in range(self._settings.partitions):
            self._metrics.partition_held.labels(str(number)).set(1 if number in session.held else 0)
        logger.info("partitions held: %s (%d of %d, %d workers)",
                    ",".join(map(str, sorted(session.held))) or "none", len(session.held),
                    self._settings.partitions, self.workers)
