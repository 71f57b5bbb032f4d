"""What becomes of a handled message, decided by `disposition` (pure).

Applied → ack; a passing failure → retry after a delay that doubles with each attempt; a lasting
failure, or the last attempt → dead letter with the reason. While CouchDB fails (`decide`), a failure
it may be to blame for is a pause instead: the message is handed back unchanged, no attempt counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from couchsync.broker.delivery import bounded
from couchsync.config import AmqpSettings
from couchsync.errors import AccessDenied, CouchsyncError, CouchUnavailable, InstancesFailed


@dataclass(frozen=True, slots=True)
class Ack:
    """Applied: acknowledge."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A passing failure: try again after `delay` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A lasting failure, or the last attempt: to the dead-letter queue with the reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class Pause:
    """CouchDB's fault, not the message's: handed back unchanged while the worker pauses; no attempt counted."""

    reason: str


Decision = Ack | Retry | DeadLetter | Pause


def retry_delay(attempt: int, first: float, cap: float) -> float:
    """The delay after failed attempt number `attempt` (1-based): doubling from `first`, at most `cap`."""
    return float(min(cap, first * 2 ** (attempt - 1)))


def disposition(error: BaseException | None, attempt: int, settings: AmqpSettings) -> Decision:
    """What to do with a message whose attempt number `attempt` ended with `error` (None: applied)."""
    if error is None:
        return Ack()
    if not isinstance(error, CouchsyncError):
        # A bug, most likely the same at every attempt: keep the message and the reason for a replay.
        return DeadLetter(bounded(f"unexpected {type(error).__name__}: {error}"))
    reason = f"{type(error).__name__}: {error}"
    if not error.retryable:
        return DeadLetter(bounded(reason))
    if attempt >= settings.delivery_limit:
        return DeadLetter(bounded(f"gave up after {attempt} attempts: {reason}"))
    return Retry(retry_delay(attempt, settings.retry_delay, settings.retry_delay_max), bounded(reason))


def suspects_server(error: BaseException | None) -> bool:
    """Whether a failure may be CouchDB's own rather than the message's: worth asking `Health`."""
    return isinstance(error, (CouchUnavailable, AccessDenied, InstancesFailed))


def decide(error: BaseException | None, attempt: int, settings: AmqpSettings, paused: str | None) -> Decision:
    """`disposition`, unless CouchDB is failing (`paused`: the reason) and the error may be its doing."""
    if paused is not None and suspects_server(error):
        return Pause(paused)
    return disposition(error, attempt, settings)
