"""A message being handled (`Delivery`), couchsync's headers on it, and the bounds of a republished message.

Retries are counted by couchsync's own header, not by the broker, whose counting changed
across versions (3.10 counts every requeue, 4.3 only rejects); `x-delivery-limit` stays as the
backstop for a message that kills the worker each time it is handled.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.data
import pika.exceptions

logger = logging.getLogger(__name__)

ATTEMPT = "x-couchsync-attempt"
ROUTING_KEY = "x-couchsync-routing-key"  # the original key, once a message has gone through our queues
REASON = "x-couchsync-reason"
DEAD_AT = "x-couchsync-dead-lettered-at"
_OURS = frozenset({ATTEMPT, ROUTING_KEY, REASON, DEAD_AT, "x-delivery-count"})  # set again, never copied

# What a republished message may carry. Its properties and headers must fit in one frame (131,072 bytes
# unless the broker asks for less); a bigger one makes the broker close the connection (FRAME_ERROR),
# which drops every message in flight, again at each attempt. With these bounds they stay under 8 KiB.
MAX_REASON = 1000  # characters of a reason, in a header or a log line
MAX_ROUTING_KEY = 255  # an AMQP routing key is a short string
MAX_HEADER_BYTES = 512  # one of the publisher's headers, encoded; a bigger one is left out
MAX_HEADERS_BYTES = 2048  # all of the publisher's headers copied, encoded


def bounded(text: str, limit: int = MAX_REASON) -> str:
    """`text`, cut to `limit` characters (an error's text may quote whatever a message held)."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message being handled, and the connection it came on (its tag is only valid there)."""

    generation: int
    tag: int
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    attempt: int
    queue: str  # the queue it came from: the intake, a partition, or (without partitions) the main queue

    @classmethod
    def of(cls, generation: int, method: Any, properties: pika.BasicProperties, body: bytes, *,
           queue: str) -> Delivery:
        """A delivery from couchsync's queue `queue` (the main one, or a partition)."""
        headers = properties.headers or {}
        # Our own count, and the broker's where it has one (a worker that died mid-message).
        attempt = max(count_header(headers.get(ATTEMPT)) or 1, count_header(headers.get("x-delivery-count")) + 1)
        return cls(generation, method.delivery_tag, routing_key_of(method, headers, queue), body, properties, attempt,
                   queue)

    @property
    def message_id(self) -> str:
        return str(self.properties.message_id or message_digest(self.routing_key, self.body))


def routing_key_of(method: Any, headers: Mapping[str, Any], queue: str) -> str:
    """The routing key a delivery from the main queue `queue` is handled as: its own, unless it came back
    through couchsync's own path.

    Couchsync's own path is the only one that reaches the main queue through the default exchange (""),
    addressed by the queue's name: the retry queue dead-letters an expired message there, and `dlq
    replay` publishes there. Only such a delivery is handled by the original key that couchsync kept in
    `x-couchsync-routing-key`. A message routed by the directory's exchanges arrives with the
    exchange's name and its own routing key, and that key decides, whatever headers its publisher set.
    Publishing to the default exchange needs write permission on `amq.default` (RabbitMQ's name for it
    in permissions), which the directory's publishers do not need and should not have; no HMAC is needed.
    """
    if method.exchange == "" and method.routing_key == queue:
        kept = headers.get(ROUTING_KEY)
        if isinstance(kept, bytes):
            kept = kept.decode("utf-8", errors="replace")
        if isinstance(kept, str) and 0 < len(kept) <= MAX_ROUTING_KEY:
            return kept
    return str(method.routing_key)


def republish_headers(original: Mapping[str, Any] | None, routing_key: str,
                      ours: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a message republished to the retry or dead-letter queue: `ours`, the routing key, and
    those of the publisher's that fit (at most MAX_HEADER_BYTES each, MAX_HEADERS_BYTES in all, encoded).

    Every value couchsync sets is bounded (reasons to MAX_REASON characters), so no message, whatever
    headers it came with, makes a republish too big for a frame.
    """
    kept: dict[str, Any] = {}
    left_out = 0
    room = MAX_HEADERS_BYTES
    for key, value in (original or {}).items():
        if key in _OURS:
            continue
        size = _encoded_size(key, value)
        if size <= min(MAX_HEADER_BYTES, room):
            kept[key] = value
            room -= size
        else:
            left_out += 1
    if left_out:
        logger.warning("left out %d header(s) too big to carry", left_out)
    own = {key: bounded(value) if isinstance(value, str) else value for key, value in ours.items()}
    return {**kept, ROUTING_KEY: bounded(routing_key, MAX_ROUTING_KEY), **own}


def _encoded_size(key: str, value: Any) -> int:
    """The size of one header in an AMQP field table; a header pika cannot encode counts as too big."""
    try:
        return int(pika.data.encode_table([], {key: value}))
    except (pika.exceptions.AMQPError, TypeError, ValueError, OverflowError, struct.error):
        return MAX_HEADERS_BYTES + 1


def count_header(value: object) -> int:
    """A count from a header; anything but a non-negative integer counts as 0 (a header is input too)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def message_digest(routing_key: str, body: bytes) -> str:
    """A short stable id for a message without one: its routing key and body."""
    return hashlib.sha256(routing_key.encode() + b"\0" + body).hexdigest()[:12]
