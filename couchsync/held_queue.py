"""The hold queue: removals and deletions the mass-removal hold parks, until a person releases or drops them.

`couchsync.b2b.group.held` (after the main queue's name) is a quorum queue of couchsync's own, without
a delivery limit, so that reading it (`hold list`) and putting messages back never drops one. Each held
message keeps its body and routing key, with headers saying its organization, why it was held, when,
and how many memberships it would take away. Every move is a publish the broker confirmed before the
message leaves where it was. The worker parks through a connection of its own, opened for each batch
to hold (a mass removal is rare), so that its consumer's connection is left to the consumer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from couchsync.broker.delivery import DEAD_AT, REASON, ROUTING_KEY, message_digest
from couchsync.broker.topology import connect, declare, peek
from couchsync.config import AmqpSettings
from couchsync.errors import BrokerUnavailable, ConfigError

ORGANIZATION = "x-couchsync-organization"
HELD_REASON = "x-couchsync-held-reason"
HELD_AT = "x-couchsync-held-at"
TAKEN = "x-couchsync-taken"  # memberships the message would take away, as counted when it was held
MAX_HELD = 100_000  # messages read from the hold queue by one command
DEPTH_SECONDS = 10.0  # the depth the metric shows is at most this old


def held_queue(settings: AmqpSettings) -> str:
    return f"{settings.queue}.held"


@dataclass(frozen=True, slots=True)
class HeldMessage:
    """A message waiting in the hold queue."""

    id: str
    organization: str
    routing_key: str
    reason: str
    held_at: str
    taken: int
    body: bytes

    @classmethod
    def of(cls, properties: pika.BasicProperties, body: bytes) -> HeldMessage:
        headers = properties.headers or {}
        routing_key = str(headers.get(ROUTING_KEY) or "")
        taken = headers.get(TAKEN)
        return cls(id=str(properties.message_id or message_digest(routing_key, body)),
                   organization=str(headers.get(ORGANIZATION) or ""), routing_key=routing_key,
                   reason=str(headers.get(HELD_REASON) or ""), held_at=str(headers.get(HELD_AT) or ""),
                   taken=taken if isinstance(taken, int) else 0, body=body)


@dataclass(frozen=True, slots=True)
class Parcel:
    """A message to hold: its routing key and body, its organization, why, and what it would take away."""

    routing_key: str
    body: bytes
    organization: str
    reason: str
    taken: int


def declare_held(connection: pika.BlockingConnection, settings: AmqpSettings) -> BlockingChannel:
    """couchsync's queues (see `broker.topology.declare`) and the hold queue; the channel to go on with.

    Raises:
        ConfigError: a queue exists with other arguments.
    """
    channel = declare(connection, settings)
    try:
        channel.queue_declare(held_queue(settings), durable=True, arguments={"x-queue-type": "quorum"})
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise ConfigError(f"cannot declare couchsync's hold queue: {exc.reply_text}") from exc
    return channel


class Parking:
    """The worker's side: parks messages (thread-safe) and tells the hold queue's depth (for the metric)."""

    def __init__(self, settings: AmqpSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._depth: tuple[float, float] | None = None  # (when, messages)

    def park(self, parcels: Sequence[Parcel]) -> None:
        """Publish them to the hold queue, each confirmed by the broker.

        Raises:
            BrokerUnavailable: the broker is unreachable or refused one (nothing is then acknowledged).
        """
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            connection, _ = connect(self._settings)
            try:
                channel = declare_held(connection, self._settings)
                channel.confirm_delivery()
                for parcel in parcels:
                    channel.basic_publish("", held_queue(self._settings), parcel.body, pika.BasicProperties(
                        message_id=message_digest(parcel.routing_key, parcel.body), delivery_mode=2,
                        content_type="application/json", headers={
                            ROUTING_KEY: parcel.routing_key, ORGANIZATION: parcel.organization,
                            HELD_REASON: parcel.reason, HELD_AT: now, TAKEN: parcel.taken}), mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError, pika.exceptions.AMQPError) as exc:
                raise BrokerUnavailable(f"could not hold messages: {type(exc).__name__}") from exc
            finally:
                _close(connection)
            self._depth = None

    def depth(self) -> float:
        """Messages waiting in the hold queue (read at most every DEPTH_SECONDS; -1 when unknown)."""
        with self._lock:
            if self._depth is not None and self._clock() - self._depth[0] < DEPTH_SECONDS:
                return self._depth[1]
            try:
                connection, _ = connect(self._settings)
                try:
                    channel = declare_held(connection, self._settings)
                    frame = channel.queue_declare(held_queue(self._settings), passive=True)
                    messages = float(frame.method.message_count)
                finally:
                    _close(connection)
            except (BrokerUnavailable, ConfigError, pika.exceptions.AMQPError):
                return -1.0
            self._depth = (self._clock(), messages)
            return messages


def _close(connection: pika.BlockingConnection) -> None:
    try:
        connection.close()
    except pika.exceptions.AMQPError:
        pass  # closed already: nothing unacknowledged on it


def _read(channel: BlockingChannel, settings: AmqpSettings,
          limit: int) -> list[tuple[int, HeldMessage, pika.BasicProperties]]:
    """Up to `limit` held messages, left unacknowledged: closing the channel puts them back, in order."""
    return [(method.delivery_tag, HeldMessage.of(properties, body), properties)
            for method, properties, body in peek(channel, held_queue(settings), limit)]


def list_held(settings: AmqpSettings, limit: int = MAX_HELD) -> list[HeldMessage]:
    """Every held message (up to `limit`); the queue is left as it was.

    Raises:
        BrokerUnavailable, ConfigError: as `broker.topology.connect`.
    """
    connection, _ = connect(settings)
    try:
        return [message for _, message, _ in _read(declare_held(connection, settings), settings, limit)]
    finally:
        _close(connection)


def take_held(settings: AmqpSettings, organization: str,
              act: Callable[[BlockingChannel, list[HeldMessage]], None]) -> list[HeldMessage]:
    """Hand the organization's held messages to `act` (with the channel), and remove them from the hold queue
    once it returned; an error leaves them all held. The other organizations' stay as they were.

    Raises:
        BrokerUnavailable, ConfigError: as `broker.topology.connect`; whatever `act` raises.
    """
    connection, _ = connect(settings)
    try:
        channel = declare_held(connection, settings)
        mine = [(tag, message) for tag, message, _ in _read(channel, settings, MAX_HELD)
                if message.organization == organization]
        act(channel, [message for _, message in mine])
        for tag, _ in mine:
            channel.basic_ack(tag)
        return [message for _, message in mine]
    finally:
        _close(connection)


def dead_letter(settings: AmqpSettings, reason: str) -> Callable[[BlockingChannel, list[HeldMessage]], None]:
    """What `take_held` does to drop messages: each to the dead-letter queue with the operator's reason."""
    def act(channel: BlockingChannel, messages: list[HeldMessage]) -> None:
        channel.confirm_delivery()
        dead_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for message in messages:
            headers: dict[str, Any] = {ROUTING_KEY: message.routing_key, ORGANIZATION: message.organization,
                                       REASON: f"dropped from the hold: {reason}", DEAD_AT: dead_at}
            channel.basic_publish("", settings.dead_letter_queue, message.body, pika.BasicProperties(
                message_id=message.id, delivery_mode=2, content_type="application/json", headers=headers),
                mandatory=True)
    return act
