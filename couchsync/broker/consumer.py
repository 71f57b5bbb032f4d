"""Consumer: the message loop on couchsync's queues, batches, partitions, reconnection and shutdown.

Events are handled on a thread pool (`prefetch` threads): the connection's thread only moves frames,
so heartbeats never lapse during a long fan-out, and results come back to it through
`add_callback_threadsafe`. With `Batching`, messages of one key (an organization) are gathered on the
connection's thread for up to `batch_wait` seconds or `batch` messages, then handled together on one
thread; each is still settled on its own.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pika
import pika.exceptions
import tenacity
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from couchsync.broker.delivery import ATTEMPT, Delivery
from couchsync.broker.disposition import Decision, Pause, decide, suspects_server
from couchsync.broker.handlers import Batching, Handler, Health, Outcome, Route
from couchsync.broker.partition_share import TAKEOVER_SECONDS, PartitionShare
from couchsync.broker.pausing import Pausing
from couchsync.broker.session import LOST, Session
from couchsync.broker.settlement import carry_out, record, republish
from couchsync.broker.topology import connect, declare
from couchsync.config import AmqpSettings, redact
from couchsync.errors import BrokerUnavailable, CouchsyncError
from couchsync.metrics import Metrics
from couchsync.partitions import partition_of
from couchsync.systemd import Notifier

logger = logging.getLogger(__name__)

PROBE_SECONDS = 5.0  # between two reads of the queue depths (one passive queue.declare per queue)


class Consumer:
    """Consumes couchsync's queue until `stop()`, reconnecting with capped, jittered backoff.

    With `route`, the main queue is the intake: each message is re-published to the partition queue of
    its organization (confirmed, then acked), and the worker consumes every partition queue, holding
    those the broker makes it the active consumer of, and giving up those beyond its share (see
    `couchsync.partitions`). Without, it consumes the main queue itself.
    """

    def __init__(self, settings: AmqpSettings, handle: Handler, metrics: Metrics,
                 notifier: Notifier | None = None, *, batching: Batching | None = None,
                 health: Health | None = None, route: Route | None = None) -> None:
        self._settings = settings
        self._handle = handle
        self._route = route
        self._share = PartitionShare(settings, metrics, partitioned=route is not None)
        # Organizations with a batch running (any connection's): their next batch waits for its writes.
        self._running: set[str] = set()
        self._running_lock = threading.Lock()
        self._pausing = Pausing(health, settings.pause_probe, metrics)
        # Batches of one with `--batch 1` too: an organization's messages still run one at a time.
        self._batching = batching
        self._metrics = metrics
        self._notifier = notifier or Notifier(None)
        self._pool = ThreadPoolExecutor(settings.prefetch, thread_name_prefix="couchsync-event")
        self._session: Session | None = None
        self._generation = 0
        self._address = 0  # the number of the broker address to try first
        # A plain flag, not an Event: stop() runs in a signal handler, where taking a lock can deadlock.
        self._stop_requested = False
        self._draining = False  # stopping: what is delivered is handed back, not started (see _drain)
        self.consuming = False
        self.drained = True  # False when a shutdown left an event still running
        self._empty_at: float | None = None  # when the main queue was last seen empty (Unix time)
        self._last_published = 0.0  # the newest `timestamp` of a delivered message (Unix time)

    @property
    def paused(self) -> str | None:
        """The reason, while paused (set and cleared on the connection's thread)."""
        return self._pausing.reason

    def stop(self) -> None:
        """Ask the consumer to stop (safe from a signal handler)."""
        self._stop_requested = True

    def problem(self) -> str | None:
        """What keeps the worker from consuming (for /healthz), or None while it consumes."""
        if self.paused is not None:
            return f"paused: {self.paused}"
        return None if self.consuming else "not consuming"

    def run(self) -> None:
        """Consume until stop(); return once in-flight messages are settled or handed back.

        Raises:
            ConfigError: wrong credentials, or queues that exist with other arguments.
        """
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(BrokerUnavailable),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
            stop=lambda state: self._stop_requested, sleep=self._sleep, reraise=True,
            before_sleep=lambda state: logger.warning("broker unavailable (%s), connecting again in %.1fs",
                                                      state.outcome.exception() if state.outcome else "",
                                                      state.upcoming_sleep))
        try:
            while not self._stop_requested:
                try:
                    retrying(self._consume)
                except BrokerUnavailable:
                    if not self._stop_requested:
                        raise
        finally:
            self._pool.shutdown(wait=False)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop_requested and time.monotonic() < deadline:
            self._notifier.watchdog()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _consume(self) -> None:
        """One connection: consume until it is lost (return, to connect again) or a stop is asked.

        A lost connection is opened again starting with the next address: its node may be the one that
        went away (a cluster's quorum queues are served by every node).
        """
        connection, number = connect(self._settings, self._address)
        self._address = (number + 1) % len(self._settings.urls)
        self._generation += 1
        try:
            channel = declare(connection, self._settings)
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self._settings.prefetch_count)
            session = self._session = Session(self._generation, connection, channel)
            if self.paused is None:  # a connection made while paused consumes once the pause ends
                self._subscribe(session)
            if self._generation > 1:
                self._metrics.reconnects.inc()
            self.consuming = True
            self._notifier.ready(f"consuming {self._settings.queue}")
            logger.info("consuming %s at %s (prefetch %d)", self._settings.queue,
                        redact(self._settings.urls[number]), self._settings.prefetch)
            tick = min(0.5, self._settings.batch_wait / 2) if self._batching else 0.5
            next_probe = 0.0
            while not self._stop_requested:
                connection.process_data_events(time_limit=tick)
                if self.paused is None:
                    self._start_waited(session)
                    self._share.release_ready(session, functools.partial(self._release, session), self._on_message)
                else:
                    self._while_paused(session)
                self._notifier.watchdog()
                if time.monotonic() >= next_probe:
                    self._probe(channel)
                    next_probe = time.monotonic() + PROBE_SECONDS
            self._drain(session)
        except LOST as exc:
            logger.warning("broker connection lost: %s", type(exc).__name__)
        finally:
            self.consuming = False
            if self._session is not None:
                self._metrics.in_flight.dec(len(self._session.in_flight))
                self._share.drop(self._session)  # the broker has made other workers active on them by now
            self._session = None
            if connection.is_open:
                try:
                    connection.close()
                except LOST:
                    pass

    def _probe(self, channel: BlockingChannel) -> None:
        """Queue depths (a passive queue.declare: the broker's own count of ready messages) and a bound on
        the age of the main queue's oldest ready message.

        AMQP shows no message without handing it out, so the age is bounded, not read: the main queue is
        FIFO, so every ready message arrived after the later of (a) the last time it was seen empty and (b)
        the `timestamp` property of the last message delivered (when its publisher set one; couchsync keeps
        it on a retry). Without timestamps it is how long the queue has not been empty.
        """
        depths = {label: channel.queue_declare(name, passive=True).method.message_count for label, name in (
            ("main", self._settings.queue), ("retry", self._settings.retry_queue),
            ("dead", self._settings.dead_letter_queue))}
        for label, count in depths.items():
            self._metrics.queue_messages.labels(label).set(count)
        now = time.time()
        if depths["main"] == 0 or self._empty_at is None:
            self._empty_at = now
        age = 0.0 if depths["main"] == 0 else now - max(self._empty_at, self._last_published)
        self._metrics.oldest_message_age.set(max(0.0, age))
        if self._route is not None and self.paused is None and self._session is not None:
            # Every worker has one consumer on the intake queue: the broker's count is the number of workers.
            self._share.workers = channel.queue_declare(self._settings.queue, passive=True).method.consumer_count
            self._share.rebalance(self._session)

    def _subscribe(self, session: Session) -> None:
        """Consume the main queue, and with partitions every partition queue (active on those the broker says)."""
        for queue in (self._settings.queue, *self._share.numbers):
            session.consumers[queue] = session.channel.basic_consume(queue, self._on_message)

    def _unsubscribe(self, session: Session) -> None:
        for tag in session.consumers.values():
            session.channel.basic_cancel(tag)
        session.consumers.clear()
        for number in list(session.releasing):
            session.parked.extend(session.releasing.pop(number))
        self._share.drop(session)

    def _while_paused(self, session: Session) -> None:
        """Cancel the consumer, hand back the messages held, probe CouchDB; consume again once it answers."""
        if session.consumers:
            # Cancelled first: the acks of the hand-backs below must not make room for new deliveries.
            self._unsubscribe(session)
        for key in list(session.gathering):
            deliveries, _ = session.gathering.pop(key)
            session.parked.extend(deliveries)
        while session.parked:
            self._finish(session, session.parked.pop(0), Pause(self.paused or "couchdb"), {}, 0.0)
        if self._pausing.poll(self._pool):
            self._subscribe(session)

    def _drain(self, session: Session) -> None:
        """Stop taking messages; let those received finish for a while, then hand the rest back.

        The batches being gathered start (each once its organization's previous batch ends) and run to
        their end. The partitions' consumers are cancelled last: while this worker is their active consumer
        the broker activates no other, so the next worker in line never writes an organization beside a
        batch still running here (a rolling restart is one writer per organization too). What is
        delivered after the stop began is handed back unchanged once they are cancelled.
        """
        self._notifier.stopping()
        self._draining = True
        intake = session.consumers.pop(self._settings.queue, None)
        if intake is not None:
            session.channel.basic_cancel(intake)
        deadline = time.monotonic() + self._settings.shutdown_timeout
        while _running(session) and time.monotonic() < deadline:
            for key in list(session.gathering):
                self._start(session, key)
            session.connection.process_data_events(time_limit=0.2)
        if session.consumers:
            self._unsubscribe(session)
        for key in list(session.gathering):
            session.parked.extend(session.gathering.pop(key)[0])
        while session.parked:  # back to the queue as they came, not requeued (a requeue counts)
            self._finish(session, session.parked.pop(0), Pause(self.paused or "stopping"), {}, 0.0)
        for tag in list(session.in_flight):
            # basic.nack with requeue: "this consumer cannot take it now", not a failed attempt.
            session.channel.basic_nack(tag, multiple=False, requeue=True)
            logger.warning("handed back message %d, still running at shutdown", tag)
        self.drained = not session.in_flight

    def _on_message(self, channel: BlockingChannel, method: Any, properties: pika.BasicProperties,
                    body: bytes) -> None:
        assert self._session is not None
        session = self._session
        queue = session.queue_of(method.consumer_tag) or self._settings.queue
        delivery = Delivery.of(session.generation, method, properties, body, queue=queue)
        if isinstance(properties.timestamp, int) and properties.timestamp <= time.time():
            self._last_published = max(self._last_published, float(properties.timestamp))
        session.in_flight[delivery.tag] = delivery
        self._metrics.in_flight.inc()
        if self.paused is not None or self._draining:  # handed back with the others once the consumers are cancelled
            session.parked.append(delivery)
            return
        if self._route is not None and queue == self._settings.queue:
            self._pool.submit(self._work_route, session.connection, delivery)
            return
        number = self._share.numbers.get(queue)
        if number is not None:
            self._share.take(session, number, method.redelivered)
            if number in session.releasing:  # being given up: not started here
                session.releasing[number].append(delivery)
                return
        key = self._batching.key(delivery.routing_key, delivery.body) if self._batching else None
        if key is None:
            self._pool.submit(self._work, session.connection, delivery)
            return
        deliveries, _ = session.gathering.setdefault(key, ([], time.monotonic()))
        deliveries.append(delivery)
        if len(deliveries) >= self._settings.batch and time.monotonic() - self._share.taken_over(
                session, delivery) >= TAKEOVER_SECONDS:
            self._start(session, key)

    def _start_waited(self, session: Session) -> None:
        """Start the batches whose first message has waited `batch_wait`, or that are full."""
        now = time.monotonic()
        for key in [key for key, (deliveries, since) in session.gathering.items()
                    if (now - since >= self._settings.batch_wait or len(deliveries) >= self._settings.batch)
                    and now - self._share.taken_over(session, deliveries[0]) >= TAKEOVER_SECONDS]:
            self._start(session, key)

    def _start(self, session: Session, key: str) -> None:
        """Start a batch of `key`, unless one is running: an organization's batches run one at a time, so
        the next one plans on the writes of the previous (it keeps gathering meanwhile)."""
        with self._running_lock:
            if key in self._running:
                return
            self._running.add(key)
        deliveries, since = session.gathering.pop(key)
        if len(deliveries) > self._settings.batch:
            session.gathering[key] = (deliveries[self._settings.batch:], since)
            deliveries = deliveries[:self._settings.batch]
        self._pool.submit(self._work_batch, session.connection, key, deliveries)

    def _work(self, connection: BlockingConnection, delivery: Delivery) -> None:
        """On a pool thread: handle the message, then settle it on the connection's thread."""
        started = time.monotonic()
        try:
            outcome: Outcome = self._handle(delivery.routing_key, delivery.body)
        except Exception as exc:  # noqa: BLE001 (the last-resort handler: a bug must not kill the worker)
            outcome = exc
        self._settle_later(connection, delivery, outcome, time.monotonic() - started)

    def _work_route(self, connection: BlockingConnection, delivery: Delivery) -> None:
        """On a pool thread: find the partition of a message of the intake queue, then forward it there (on
        the connection's thread); a failure to find it is settled as a handler's failure."""
        assert self._route is not None
        try:
            organization = self._route(delivery.routing_key, delivery.body)
        except Exception as exc:  # noqa: BLE001 (as in _work)
            self._settle_later(connection, delivery, exc, 0.0)
            return
        # A message naming no organization goes anywhere (the partition's consumer dead-letters it).
        number = partition_of(organization if organization is not None else delivery.message_id,
                              self._settings.partitions)
        try:
            connection.add_callback_threadsafe(functools.partial(self._forward, delivery, number))
        except LOST:
            pass  # the connection is gone: the broker hands the message out again

    def _forward(self, delivery: Delivery, number: int) -> None:
        """On the connection's thread: re-publish a message of the intake queue to its partition, unchanged
        (its attempt count and original routing key in couchsync's headers), confirmed before the ack."""
        session = self._session
        if session is None or session.generation != delivery.generation or delivery.tag not in session.in_flight:
            return
        try:
            republish(session.channel, delivery, self._settings.partition_queues[number], {ATTEMPT: delivery.attempt})
            session.channel.basic_ack(delivery.tag)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            logger.error("could not forward message %s to partition %d (%s): returned to the queue",
                         delivery.message_id, number, exc)
            session.channel.basic_reject(delivery.tag, requeue=True)
        del session.in_flight[delivery.tag]
        self._metrics.in_flight.dec()
        self._metrics.routed.labels(str(number)).inc()

    def _work_batch(self, connection: BlockingConnection, key: str, deliveries: list[Delivery]) -> None:
        """On a pool thread: handle a batch, then settle each of its messages on the connection's thread."""
        assert self._batching is not None
        started, started_at = time.monotonic(), time.time()
        try:
            outcomes = list(self._batching.handle([(d.routing_key, d.body) for d in deliveries]))
        except Exception as exc:  # noqa: BLE001 (as in _work)
            outcomes = [exc] * len(deliveries)
        finally:
            with self._running_lock:
                self._running.discard(key)
        seconds = time.monotonic() - started
        # One line per batch, with its organization and its span: whoever reads the workers' logs sees
        # which worker handled which organization when.
        logger.info("batch organization=%s messages=%d started=%.3f ended=%.3f", key, len(deliveries),
                    started_at, time.time())
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            self._settle_later(connection, delivery, outcome, seconds)

    def _settle_later(self, connection: BlockingConnection, delivery: Delivery, outcome: Outcome,
                      seconds: float) -> None:
        error = outcome if isinstance(outcome, Exception) else None
        if error is not None and not isinstance(error, CouchsyncError):
            logger.error("unexpected error on message %s", delivery.message_id, exc_info=error)
        fields = outcome if not isinstance(outcome, Exception) else {}
        # A plain read of `paused` from this thread: a pause starting meanwhile is caught by the probe.
        paused = self.paused or (self._pausing.ask() if suspects_server(error) else None)
        decision = decide(error, delivery.attempt, self._settings, paused)
        settle = functools.partial(self._settle, delivery, decision, fields, seconds)
        try:
            connection.add_callback_threadsafe(settle)
        except LOST:
            pass  # the connection is gone: the broker hands the message out again

    def _settle(self, delivery: Delivery, decision: Decision, fields: Mapping[str, object], seconds: float) -> None:
        """On the connection's thread: ack, retry, dead-letter or (paused) hand back one message."""
        session = self._session
        if session is None or session.generation != delivery.generation or delivery.tag not in session.in_flight:
            return  # from a lost connection: redelivered, and applied again idempotently
        if isinstance(decision, Pause):
            self._pausing.trip(decision.reason)
            if session.consumers:
                session.parked.append(delivery)
                return
        self._finish(session, delivery, decision, fields, seconds)

    def _release(self, session: Session, delivery: Delivery) -> None:
        """Hand back, unchanged, a message of a partition being given up."""
        self._finish(session, delivery, Pause("released"), {}, 0.0)

    def _finish(self, session: Session, delivery: Delivery, decision: Decision, fields: Mapping[str, object],
                seconds: float) -> None:
        carry_out(session.channel, delivery, decision, self._settings)
        del session.in_flight[delivery.tag]
        self._metrics.in_flight.dec()
        record(self._metrics, delivery, decision, fields, seconds)


def _running(session: Session) -> bool:
    """Whether a message is being handled, forwarded or gathered: in flight, and not waiting to be handed
    back."""
    waiting = {delivery.tag for delivery in session.parked}
    waiting |= {delivery.tag for deliveries in session.releasing.values() for delivery in deliveries}
    return any(tag not in waiting for tag in session.in_flight)
