"""A decision carried out on the connection's channel, then counted and logged: one line per message.

Every outcome is decided by `disposition` (pure) and settled on the connection's thread:
applied → ack; a passing failure → republished to the retry queue with the attempt count in a header,
then acked; a lasting failure, or the last attempt → published to the dead-letter queue with the reason
in `x-couchsync-reason`, then acked; paused → republished unchanged to its own queue, then acked.
Publishing is confirmed before the ack, so nothing is acked away unhandled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from couchsync.broker.delivery import ATTEMPT, DEAD_AT, REASON, Delivery, republish_headers
from couchsync.broker.disposition import Ack, DeadLetter, Decision, Pause, Retry
from couchsync.config import AmqpSettings
from couchsync.metrics import Metrics

logger = logging.getLogger(__name__)


def carry_out(channel: BlockingChannel, delivery: Delivery, decision: Decision, settings: AmqpSettings) -> None:
    """On the connection's thread: move the message where `decision` sends it (confirmed), then ack it; one
    the broker would not take is rejected back to its queue."""
    try:
        if isinstance(decision, Pause):
            # Unchanged, to the queue it came from (its partition): the same attempt count (a pause
            # is no attempt), a new delivery count for the broker (a requeue would count towards
            # x-delivery-limit).
            republish(channel, delivery, delivery.queue, {ATTEMPT: delivery.attempt})
        elif isinstance(decision, Retry):
            republish(channel, delivery, settings.retry_queue, {
                ATTEMPT: delivery.attempt + 1, REASON: decision.reason}, expiration=decision.delay)
        elif isinstance(decision, DeadLetter):
            republish(channel, delivery, settings.dead_letter_queue, {
                ATTEMPT: delivery.attempt, REASON: decision.reason,
                DEAD_AT: datetime.now(timezone.utc).isoformat(timespec="seconds")})
        channel.basic_ack(delivery.tag)
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
        # Not stored elsewhere: keep it here. A reject is a failed attempt on every broker version.
        logger.error("could not move message %s (%s): returned to the queue", delivery.message_id, exc)
        channel.basic_reject(delivery.tag, requeue=True)


def republish(channel: BlockingChannel, delivery: Delivery, queue: str, headers: dict[str, Any],
              expiration: float | None = None) -> None:
    """Publish the message again to `queue` through the default exchange, with couchsync's `headers`."""
    properties = delivery.properties
    merged = republish_headers(properties.headers, delivery.routing_key, headers)
    channel.basic_publish("", queue, delivery.body, pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        message_id=delivery.message_id, timestamp=properties.timestamp, delivery_mode=2, headers=merged,
        expiration=str(int(expiration * 1000)) if expiration is not None else None), mandatory=True)


def record(metrics: Metrics, delivery: Delivery, decision: Decision, fields: Mapping[str, object],
           seconds: float) -> None:
    """Count a settled message's outcome and log its line (the handler's `fields` included)."""
    outcome = {Ack: "applied", Retry: "retried", DeadLetter: "dead_lettered", Pause: "paused"}[type(decision)]
    metrics.count_event(delivery.routing_key, outcome)
    refusals = fields.get("refusals")
    if isinstance(decision, Ack):
        metrics.observe_fanout(delivery.routing_key, seconds)
        if isinstance(refusals, int) and refusals > 0:
            metrics.count_refusals(delivery.routing_key, refusals)
        bulk_writes = fields.get("bulk_writes")
        if isinstance(bulk_writes, int) and bulk_writes > 0:
            metrics.bulk_writes.inc(bulk_writes)
    line = {"message": delivery.message_id, "delivery_tag": delivery.tag, "routing_key": delivery.routing_key,
            "attempt": delivery.attempt, "outcome": outcome, **fields, "seconds": round(seconds, 3)}
    if isinstance(decision, Ack):
        level = logging.WARNING if refusals else logging.INFO
        logger.log(level, "event %s", _logfmt(line), extra={"event": line})
    elif isinstance(decision, Pause):
        logger.info("event %s handed back, paused: %s", _logfmt(line), decision.reason,
                    extra={"event": {**line, "reason": decision.reason}})
    elif isinstance(decision, Retry):
        logger.warning("event %s retry_in=%.1fs reason=%r", _logfmt(line), decision.delay, decision.reason,
                       extra={"event": {**line, "retry_in": decision.delay, "reason": decision.reason}})
    else:
        logger.error("event %s reason=%r", _logfmt(line), decision.reason,
                     extra={"event": {**line, "reason": decision.reason}})


def _logfmt(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={value}" for key, value in fields.items())
