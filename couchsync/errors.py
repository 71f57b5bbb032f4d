"""The one exception hierarchy of couchsync; each class says how it is handled.

    CouchsyncError
    ├── ConfigError             bad or missing setting                      exit 78 (EX_CONFIG)
    ├── InvalidEvent            not JSON, fails its schema, unknown type    dead-lettered with the reason
    │   └── FutureEvent         stamped further ahead than --max-future-skew (replay it once its time has come)
    ├── EventRefused            a valid event its group's state cannot take              dead-lettered
    │   ├── StaleEvent          stamped before its group's horizon (records below it may be forgotten)
    │   └── GroupStateRefused   CouchDB refused the group's state document (too large, ...): its events only
    ├── UnknownOrganization     no instance of the organization             dead-lettered with the reason
    ├── AmbiguousOrganization   several organization instances, or organizations of a domain  dead-lettered
    ├── UnknownInstance         no usable instance has the domain named     retryable (it may appear)
    ├── InstancesFailed         an event failed in some instances for lasting reasons     dead-lettered
    │   └── InstancesUnavailable    ... for passing reasons only                         retryable
    ├── CouchError              carries the database and document id, never credentials
    │   ├── CouchUnavailable    connection error, timeout, 5xx, 429         retryable
    │   ├── DocumentConflict    409 still there after re-read and re-plan   retryable
    │   ├── NotFound            404 on a database or document
    │   └── AccessDenied        401/403, a validate_doc_update refusal included
    └── BrokerUnavailable       AMQP connection or channel lost             retryable
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar


class CouchsyncError(Exception):
    """Base class of every error couchsync raises on purpose."""

    retryable: ClassVar[bool] = False
    exit_code: ClassVar[int] = 1


class ConfigError(CouchsyncError):
    """A setting is missing or malformed."""

    exit_code = 78


class InvalidEvent(CouchsyncError):
    """A message that can never be applied: the reason says which event, which field and why."""

    exit_code = 65  # EX_DATAERR

    def __init__(self, reason: str, *, routing_key: str | None = None) -> None:
        super().__init__(f"{routing_key}: {reason}" if routing_key else reason)
        self.reason = reason
        self.routing_key = routing_key


class FutureEvent(InvalidEvent):
    """An event stamped further ahead of the worker's clock than allowed: it would win over every later
    event. Not retryable now, yet valid: replayed once its time has come, it applies."""

    def __init__(self, reason: str, *, routing_key: str | None = None, timestamp: datetime) -> None:
        super().__init__(reason, routing_key=routing_key)
        self.timestamp = timestamp


class EventRefused(CouchsyncError):
    """A valid event that its group's directory state cannot take; the other events of its batch apply.

    Not retryable: the same state refuses it the same way; the reason names the group and what to do.
    """

    exit_code = 65


class StaleEvent(EventRefused):
    """An event stamped before its group's horizon: records older than it (removals) may be forgotten,
    so applying it could resurrect a removed member."""


class GroupStateRefused(EventRefused):
    """CouchDB refused to write a group's state document for a reason of that document (over
    `max_document_size`, most likely): that group's events fail, and only they."""

    def __init__(self, message: str, *, size: int, limit: int | None) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class UnknownOrganization(CouchsyncError):
    """No usable instance belongs to the organization named by an event."""

    exit_code = 65


class AmbiguousOrganization(CouchsyncError):
    """The global database names several records where one is meant: several instances could be an
    organization's own (first domain label = organization id), or several organizations claim the custom
    domain a user.created names.

    Not retryable: picking one would take a stranger's instance as the organization's reference, or give
    a new member a stranger's directory; the global database must be mended first. The message names the
    candidates.
    """

    exit_code = 65

    def __init__(self, what: str, candidates: list[str]) -> None:
        super().__init__(f"{what}: {', '.join(candidates)}")
        self.candidates = candidates


class UnknownInstance(CouchsyncError):
    """No usable instance has the domain named (by an operator, or by a user.created event).

    Retryable: a new instance may be announced before the global database lists it; if it never
    appears, the event is dead-lettered after the last attempt.
    """

    retryable = True
    exit_code = 65


class InstancesFailed(CouchsyncError):
    """An event was applied to some instances and failed in others; the message names them."""


class InstancesUnavailable(InstancesFailed):
    """An event failed in some instances, each for a passing reason: trying again may finish it."""

    retryable = True
    exit_code = 75  # EX_TEMPFAIL


class CouchError(CouchsyncError):
    """A CouchDB request failed; names the database and document, never the credentials."""

    def __init__(self, message: str, *, db: str | None = None, doc_id: str | None = None,
                 status: int | None = None) -> None:
        where = "/".join(part for part in (db, doc_id) if part)
        super().__init__(f"{message} ({where})" if where else message)
        self.db = db
        self.doc_id = doc_id
        self.status = status


class CouchUnavailable(CouchError):
    """CouchDB did not answer usefully: connection error, timeout, 5xx or 429."""

    retryable = True
    exit_code = 69  # EX_UNAVAILABLE


class DocumentConflict(CouchError):
    """A 409 that re-reading and re-planning did not resolve."""

    retryable = True
    exit_code = 75  # EX_TEMPFAIL


class NotFound(CouchError):
    """A database or document does not exist."""


class AccessDenied(CouchError):
    """CouchDB refused the credentials or the write (401/403, validate_doc_update included)."""

    exit_code = 77  # EX_NOPERM


class BrokerUnavailable(CouchsyncError):
    """The AMQP connection or channel was lost."""

    retryable = True
    exit_code = 69
