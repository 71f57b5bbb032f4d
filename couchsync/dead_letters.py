"""The dead letters: read them with their reasons, and send chosen ones back to the main queue.

A dead letter carries couchsync's headers (`x-couchsync-reason`, the attempt count, the original
routing key) when couchsync put it there, or the broker's `x-death` record when the broker's
`x-delivery-limit` did. Reading leaves the queue as it was: messages are taken unacknowledged and put
back, in order, when the channel closes. Bodies are shown only through `masked_body`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from couchsync.broker.delivery import (
    ATTEMPT, DEAD_AT, MAX_ROUTING_KEY, REASON, ROUTING_KEY, count_header, message_digest)
from couchsync.broker.topology import connect, declare, peek
from couchsync.config import AmqpSettings
from couchsync.events import SECRET_FIELDS

MASK = "[secure]"
SHOWN_BODY = 2000  # characters of a body shown
MASKED_TEXT = 65536  # bytes of a body that is not JSON read to be masked (more than is shown)
# A secret field's value in text that is not JSON (or not only): the field's name, quoted or not, or any
# quoted name written with escapes (it may spell one), then `:` or `=`, then a quoted value (closed or
# cut off) or a bare one.
_SECRET_IN_TEXT = re.compile(
    r"""(?P<name>(?:["']?\b(?:%s)\b["']?|"[^"\n]*\\[^"\n]*")\s*[:=]\s*)"""
    r"""(?P<value>"(?:[^"\\]|\\.)*"?|'(?:[^'\\]|\\.)*'?|[^\s,;}\]]+)""" % "|".join(sorted(SECRET_FIELDS)))


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
    def of(cls, method: Any, properties: pika.BasicProperties, body: bytes, *, queue: str) -> DeadMessage:
        """A message read from the dead-letter queue of couchsync's main queue `queue`."""
        headers = properties.headers or {}
        deaths = headers.get("x-death") or [{}]
        reason = headers.get(REASON) or f"dead-lettered by the broker: {deaths[0].get('reason', 'unknown')}"
        attempts = count_header(headers.get(ATTEMPT)) or count_header(deaths[0].get("count"))
        routing_key = dead_routing_key(method, headers, queue)
        return cls(id=str(properties.message_id or message_digest(routing_key, body)), routing_key=routing_key,
                   reason=str(reason), attempts=attempts, dead_at=headers.get(DEAD_AT), body=body)


def dead_routing_key(method: Any, headers: dict[str, Any], queue: str) -> str:
    """The routing key a dead letter was handled as (and is replayed as).

    Couchsync dead-letters through the default exchange: then its `x-couchsync-routing-key` is the key
    (`broker.delivery.routing_key_of` decided it). The broker dead-letters through the dead-letter
    exchange: then `x-death` names the key of the delivery it gave up, and only when that delivery had
    come back through couchsync's retry path (addressed to `queue`) is the header couchsync set there
    taken. The header a publisher set on a message is never taken: `dlq replay` would make the main
    queue trust it.
    """
    kept = headers.get(ROUTING_KEY)
    kept = kept if isinstance(kept, str) and 0 < len(kept) <= MAX_ROUTING_KEY else None
    if method.exchange == "":
        return kept or str(method.routing_key)
    deaths = headers.get("x-death")
    keys = deaths[0].get("routing-keys") if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) \
        else None
    delivered = str(keys[0]) if isinstance(keys, list) and keys else str(method.routing_key)
    return kept if delivered == queue and kept else delivered


def masked_body(body: bytes) -> str:
    """A message body for display, at most SHOWN_BODY characters, every secret field's value masked.

    JSON is masked field by field at any depth (objects in arrays too); any other body, JSON cut short
    or with a trailing comma included, by pattern over the raw text, which masks too much rather than
    too little.
    """
    try:
        return json.dumps(_masked(json.loads(body)), ensure_ascii=False)[:SHOWN_BODY]
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return _masked_text(body[:MASKED_TEXT].decode("utf-8", errors="replace"))[:SHOWN_BODY]


def _masked(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: MASK if key in SECRET_FIELDS else _masked(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_masked(value) for value in data]
    if isinstance(data, str):
        return _masked_text(data[:MASKED_TEXT])  # a string may hold JSON (a body encoded twice)
    return data


def _masked_text(text: str) -> str:
    return _SECRET_IN_TEXT.sub(lambda match: match["name"] + f'"{MASK}"', text)


def _read_dead_letters(channel: BlockingChannel, settings: AmqpSettings,
                       limit: int) -> list[tuple[int, DeadMessage, pika.BasicProperties]]:
    """Up to `limit` dead letters, left unacknowledged: closing the channel puts them back, in order."""
    return [(method.delivery_tag, DeadMessage.of(method, properties, body, queue=settings.queue), properties)
            for method, properties, body in peek(channel, settings.dead_letter_queue, limit)]


def list_dead_letters(settings: AmqpSettings, limit: int = 1000) -> list[DeadMessage]:
    """The first `limit` dead letters; the queue is left as it was.

    Raises:
        BrokerUnavailable, ConfigError: as `connect`.
    """
    connection, _ = connect(settings)
    try:
        channel = declare(connection, settings)
        return [message for _, message, _ in _read_dead_letters(channel, settings, limit)]
    finally:
        connection.close()


def replay_dead_letters(settings: AmqpSettings, ids: set[str] | None, limit: int = 1000) -> list[DeadMessage]:
    """Send dead letters (those with these ids, or all when None) back to the main queue, as new.

    Each is published (confirmed) before it leaves the dead-letter queue; its attempt count starts again.

    Raises:
        BrokerUnavailable, ConfigError: as `connect`.
    """
    connection, _ = connect(settings)
    replayed = []
    try:
        channel = declare(connection, settings)
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
