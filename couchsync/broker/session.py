"""One broker connection's state (`Session`), and the errors that mean the connection is gone (`LOST`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from couchsync.broker.delivery import Delivery

LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosed, pika.exceptions.ChannelWrongStateError)


@dataclass
class Session:
    """One connection's state; deliveries of an older one cannot be settled (the broker redelivers them)."""

    generation: int
    connection: BlockingConnection
    channel: BlockingChannel
    in_flight: dict[int, Delivery] = field(default_factory=dict)
    # Batches being gathered, by key: their deliveries (in flight too) and when the first came.
    gathering: dict[str, tuple[list[Delivery], float]] = field(default_factory=dict)
    consumers: dict[str, str] = field(default_factory=dict)  # queue → consumer tag; empty: paused or stopping
    # Messages to hand back once the consumers are cancelled (in flight too): handed back earlier, each
    # ack would make room for a new delivery.
    parked: list[Delivery] = field(default_factory=list)
    held: set[int] = field(default_factory=set)  # partitions delivered from: this worker is their active consumer
    held_since: dict[int, float] = field(default_factory=dict)  # when each became held (monotonic)
    # Partitions being given up: the deliveries that came meanwhile, handed back once the rest has settled.
    releasing: dict[int, list[Delivery]] = field(default_factory=dict)

    def queue_of(self, consumer_tag: str) -> str | None:
        return next((queue for queue, tag in self.consumers.items() if tag == consumer_tag), None)
