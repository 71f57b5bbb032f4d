"""The worker's pause while CouchDB fails: whether it is paused and why, and the probes that end it.

A failure that is CouchDB's own (the server down, or refusing the sync identity: `health()` says so, the
breaker of `couchsync.breaker`) is a pause, not an attempt: the consumer is cancelled, each message held
is republished unchanged (same headers, same attempt count) to its own queue and acked, and `health()`
is asked every `pause_probe` seconds; once it answers None, the consumer is started again. Holding no
delivery while paused is what keeps a paused message clear of the broker's `consumer_timeout` (which
closes the channel of a delivery held too long) and of `x-delivery-limit` (which counts requeues).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future

from couchsync.broker.handlers import Health
from couchsync.metrics import Metrics

logger = logging.getLogger(__name__)


class Pausing:
    """The pause's state: set and cleared on the connection's thread; `reason` read from any thread."""

    def __init__(self, health: Health | None, probe_interval: float, metrics: Metrics) -> None:
        self._health = health
        self._interval = probe_interval  # `pause_probe`: seconds between two probes while paused
        self._metrics = metrics
        self.reason: str | None = None  # while paused
        self._probe: Future[str | None] | None = None
        self._next_probe = 0.0

    def trip(self, reason: str) -> None:
        """Pause (on the connection's thread): the loop cancels the consumer and hands back what it holds."""
        if self.reason == reason:
            return
        if self.reason is not None:
            logger.warning("paused: the reason is now %s (was %s)", reason, self.reason)
        else:
            logger.warning("paused (%s): CouchDB is failing; messages are handed back unchanged and consumption "
                           "resumes once a probe every %.0fs finds it answering", reason, self._interval)
        self.reason = reason
        self._metrics.set_paused(reason)
        self._next_probe = time.monotonic() + self._interval

    def poll(self, pool: Executor) -> bool:
        """While paused, on the connection's thread: take the last probe's answer, start the next one when due
        (on `pool`); True once CouchDB answers again: the pause is over, the caller consumes again."""
        probe = self._probe
        if probe is not None and probe.done():
            self._probe = None
            reason = probe.result()
            if reason is None:
                self._resume()
                return True
            self.trip(reason)
        if self._health is not None and self._probe is None and time.monotonic() >= self._next_probe:
            self._probe = pool.submit(self.ask)
            self._next_probe = time.monotonic() + self._interval
        return False

    def ask(self) -> str | None:
        """`health()` (None without one); a bug in it is logged and taken as healthy, never lets a message
        go unsettled."""
        if self._health is None:
            return None
        try:
            return self._health()
        except Exception:  # noqa: BLE001 (as in the consumer's _work: the message must still be settled)
            logger.exception("probing CouchDB failed")
            return None

    def _resume(self) -> None:
        logger.warning("resumed: CouchDB answers again (paused for %s)", self.reason)
        self.reason = None
        self._metrics.set_paused(None)
