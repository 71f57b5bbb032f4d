"""The dead letters: read them with their reasons, and send chosen ones back to the main queue.

A dead letter carries couchsync's headers (`x-couchsync-reason`, the attempt count, the original
routing key) when couchsync put it there, or the broker's `x-death` record when the broker's
`x-delivery-limit` did. Reading leaves the queue as it was: messages are taken unacknowledged and put
back, in order, when the channel closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from couchsync.amqp import ATTEMPT, DEAD_AT, REASON, ROUTING_KEY, connect, count_header, declare, message_digest
from couchsync.config import AmqpSettings


@dataclass(frozen=True, slots=True)
class DeadMessage:
    """A dead-lettered message, with why and when it was given up."""

    id: str
    routing_key: str
    reason: str
    attempts: int
    dead_at: str | None
    body: bytes

    @classmethod
    def of(cls, method: Any, properties: pika.BasicProperties, body: bytes) -> DeadMessage:
        headers = properties.headers or {}
        deaths = headers.get("x-death") or [{}]
        # Dead-lettered by couchsync: its headers; by the broker (x-delivery-limit): its x-death record.
        routing_key = str(headers.get(ROUTING_KEY) or (deaths[0].get("routing-keys") or [method.routing_key])[0])
        reason = headers.get(REASON) or f"dead-lettered by the broker: {deaths[0].get('reason', 'unknown')}"
        attempts = count_header(headers.get(ATTEMPT)) or count_header(deaths[0].get("count"))
        return cls(id=str(properties.message_id or message_digest(routing_key, body)), routing_key=routing_key,
                   reason=str(reason), attempts=attempts, dead_at=headers.get(DEAD_AT), body=body)


def _read_dead_letters(channel: BlockingChannel, settings: AmqpSettings,
                       limit: int) -> list[tuple[int, DeadMessage, pika.BasicProperties]]:
    """Up to `limit` dead letters, left unacknowledged: closing the channel puts them back, in order."""
    found = []
    for _ in range(limit):
        method, properties, body = channel.basic_get(settings.dead_letter_queue, auto_ack=False)
        if method is None:
            break
        found.append((method.delivery_tag, DeadMessage.of(method, properties, body), properties))
    return found


def list_dead_letters(settings: AmqpSettings, limit: int = 1000) -> list[DeadMessage]:
    """The first `limit` dead letters; the queue is left as it was.

    Raises:
        BrokerUnavailable, ConfigError: as `connect`.
    """
    connection = connect(settings)
    try:
        channel = connection.channel()
        declare(channel, settings)
        return [message for _, message, _ in _read_dead_letters(channel, settings, limit)]
    finally:
        connection.close()


def replay_dead_letters(settings: AmqpSettings, ids: set[str] | None, limit: int = 1000) -> list[DeadMessage]:
    """Send dead letters (those with these ids, or all when None) back to the main queue, as new.

    Each is published (confirmed) before it leaves the dead-letter queue; its attempt count starts again.

    Raises:
        BrokerUnavailable, ConfigError: as `connect`.
    """
    connection = connect(settings)
    replayed = []
    try:
        channel = connection.channel()
        declare(channel, settings)
        channel.confirm_delivery()
        for tag, message, properties in _read_dead_letters(channel, settings, limit):
            if ids is not None and message.id not in ids:
                continue
            headers = {key: value for key, value in (properties.headers or {}).items()
                       if key not in (ATTEMPT, REASON, DEAD_AT, "x-death", "x-delivery-count")}
            channel.basic_publish("", settings.queue, message.body, pika.BasicProperties(
                content_type=properties.content_type, message_id=message.id, delivery_mode=2,
                headers={**headers, ROUTING_KEY: message.routing_key}), mandatory=True)
            channel.basic_ack(tag)
            replayed.append(message)
    finally:
        connection.close()
    return replayed
