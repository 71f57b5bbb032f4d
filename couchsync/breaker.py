"""CouchBreaker: tells "CouchDB itself is failing" (a pause) from "this message failed" (a retry or a
dead letter), and re-reads the sync identity's password file while paused.

The consumer asks `check()` when a message fails with an error CouchDB may be to blame for: the server's
health is probed (`/_up`, the sync identity's `/_session`, a HEAD of the state database), so one instance
database failing does not pause the worker, and a stopped server or a wrong password does. While paused,
the consumer calls `check()` every few seconds until it answers None; the password file is read at each
call, but a password CouchDB refused is sent again only when it changed, or after REFUSED_RETRY.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from couchsync.config import Secret, read_secret_file
from couchsync.errors import (
    AccessDenied, ConfigError, CouchsyncError, CouchUnavailable)

logger = logging.getLogger(__name__)

COUCHDB = "couchdb"            # the server is unreachable, times out or answers 5xx
CREDENTIALS = "credentials"    # the server refuses the sync identity (401/403 on its own session)
REASONS = (COUCHDB, CREDENTIALS)
CACHE_SECONDS = 1.0            # a burst of failed messages shares one probe
CREDENTIALS_LOG_EVERY = 60.0   # seconds between two ERROR lines about the credentials
# A refused password is sent again at most this often while unchanged: CouchDB locks an account out
# after 5 failed logins (chttpd_auth_lockout, 5 minutes), which a probe every few seconds would reach.
REFUSED_RETRY = 120.0


class Prober(Protocol):
    """What the breaker asks CouchDB (a CouchGateway)."""

    def up(self) -> None: ...

    def session_name(self) -> str | None: ...

    def database_exists(self, db: str) -> bool: ...

    def set_password(self, username: str, password: Secret) -> None: ...


def reason_of(error: CouchsyncError) -> str | None:
    """The pause reason a probe's error means; None for an error that says nothing of the server."""
    if isinstance(error, AccessDenied) and error.status in (401, 403):
        return CREDENTIALS
    if isinstance(error, ConfigError):  # the password file cannot be read
        return CREDENTIALS
    return COUCHDB if isinstance(error, CouchUnavailable) else None


class CouchBreaker:
    """Probes CouchDB's health for the consumer; `check()` is safe from any thread."""

    def __init__(self, probe: Prober, state_db: str, username: str | None, *,
                 password_file: str | None = None, also_update: Sequence[Prober] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._state_db = state_db
        self._username = username
        self._password_file = password_file
        self._password: Secret | None = None
        self._gateways = (probe, *also_update)  # every gateway that must take a fixed password
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, str | None] | None = None
        self._refused_at: float | None = None  # when the current password was last refused
        self._refusal = ""  # and CouchDB's words (never a secret): a wrong password, or a lockout
        self._logged_at: float | None = None

    def check(self) -> str | None:
        """None when CouchDB serves the sync identity; else the reason to pause (COUCHDB, CREDENTIALS)."""
        with self._lock:  # one probe at a time; the threads that wait share its answer
            now = self._clock()
            if self._last is not None and now - self._last[0] < CACHE_SECONDS:
                return self._last[1]
            reason = self._probe_once(now)
            self._last = (self._clock(), reason)
            if reason == CREDENTIALS:
                self._log_credentials(now)
            return reason

    def _probe_once(self, now: float) -> str | None:
        try:
            if not self._reload_password() and self._refused_at is not None \
                    and now - self._refused_at < REFUSED_RETRY:
                return CREDENTIALS  # the same password again would only bring CouchDB's lockout closer
            self._probe.up()
            self._probe.session_name()
            self._probe.database_exists(self._state_db)
        except CouchsyncError as exc:
            reason = reason_of(exc)
            logger.debug("CouchDB probe: %s (%s)", reason or "answers", exc)
            if reason == CREDENTIALS:
                self._refused_at, self._refusal = now, str(exc)
            return reason
        self._refused_at = None
        return None

    def _reload_password(self) -> bool:
        """Read the password file again (the operator may have fixed it); a changed one goes to every gateway.
        Whether it changed.

        Raises:
            ConfigError: the file cannot be read.
        """
        if not self._password_file or not self._username:
            return False
        password = read_secret_file(self._password_file)
        if password == self._password:
            return False
        for gateway in self._gateways:
            gateway.set_password(self._username, password)
        if self._password is not None:
            logger.warning("CouchDB password of %s read again from %s: changed", self._username, self._password_file)
        self._password = password
        return True

    def _log_credentials(self, now: float) -> None:
        if self._logged_at is not None and now - self._logged_at < CREDENTIALS_LOG_EVERY:
            return
        self._logged_at = now
        where = (f"the password file {self._password_file} (COUCHSYNC_COUCH_PASSWORD_FILE), read again every "
                 "probe: the worker resumes by itself once it is right" if self._password_file else
                 "COUCHSYNC_COUCH_PASSWORD, then restart the worker")
        logger.error("paused: CouchDB refuses the sync identity %s (%s): fix its password in %s, or the user %s "
                     "in CouchDB", self._username, self._refusal, where, self._username)
