"""ProtectionGuard: keeps `_design/couchsync-protection` in every contacts and groups database, and the
`couchsync/lookup` view in every contacts database, in the worker.

It follows CouchDB's `_db_updates` feed (the sync identity is a server admin): a database that is
`created` gets the protection and the lookup view within a second or two; a database that is `updated`
has its design documents checked (a HEAD each, compared with the revisions last seen good) and put back
when one was deleted or changed; the feed is polled at most once a second, so a database written many
times in a second is checked once. An instance whose protection was put back is reconciled at once
(`on_restored`): what another admin wrote in the gap is undone within seconds, not at the next run.
The feed's sequence is kept in `_local/couchsync-db-updates` of couchsync's own state database, so a
restarted worker resumes where it stopped and sees what happened meanwhile.
The first start (no sequence yet) sweeps every instance the global database lists; a sweep also runs
every `sweep_interval` as a backstop. A server without the feed (PouchDB Server; CouchDB without its
`_global_changes` database) is served by sweeps only, said once in the log. A server that does not
answer when the guard starts (CouchDB down, or refusing the sync identity) is asked again every
`feed_retry` seconds until the guard follows its feed; `couchsync_protection_feed_following` says which.
A protection a newer couchsync wrote is left as it is (said once): during a rolling upgrade the old
workers' guards do not put theirs back over the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from couchsync.config import SyncIdentity
from couchsync.couch import CouchGateway
from couchsync.breaker import REFUSED_RETRY
from couchsync.design_docs import (
    LOOKUP_DDOC, NEWER, PROTECTION_DDOC, VERSION_FIELD, DesignDocs, Target, create_protected, deploy, is_newer,
    same_body)
from couchsync.errors import (
    AccessDenied, CouchError, CouchsyncError, CouchUnavailable, DocumentConflict, NotFound)
from couchsync.instances import InstanceDirectory
from couchsync.metrics import Metrics

logger = logging.getLogger(__name__)

SINCE_DOC = "couchsync-db-updates"  # `_local/` in the state database: never replicated, never validated
CREATED, UPDATED, SWEPT = "created", "updated", "swept"
POLL_SECONDS = 10.0       # one longpoll of the feed; it returns at once when something happened
GATHER_SECONDS = 1.0      # at least this between two polls: a database written often is checked once a second
SAVE_EVERY = 5.0          # seconds between two saves of the sequence (a replay of a few seconds is harmless)
FALLBACK_SWEEP = 300.0    # seconds between sweeps when the server has no feed
RESTART_SECONDS = 30.0    # after an unexpected error
W_NO_FEED = ("the server serves no _db_updates feed (%s): new and tampered protections are found by a sweep "
             "every %.0fs instead%s")


class ProtectionGuard:
    """Installs and restores the protection; `run()` until `stop()` (on a thread of its own)."""

    def __init__(self, couch: CouchGateway, directory: InstanceDirectory, design: DesignDocs,
                 identity: SyncIdentity, state_db: str, metrics: Metrics | None = None, *,
                 concurrency: int = 8, sweep_interval: float = 3600.0, poll_seconds: float = POLL_SECONDS,
                 feed_retry: float = 30.0, on_restored: Callable[[str], None] | None = None) -> None:
        self._couch = couch
        self._directory = directory
        self._design = design
        self._protection = design.protection(identity)
        self._state = design.state_target(state_db, identity)
        self._metrics = metrics
        self._concurrency = concurrency
        self._sweep_interval = sweep_interval
        self._poll_seconds = poll_seconds
        self._feed_retry = feed_retry
        self._on_restored = on_restored or (lambda db: None)
        self._good: dict[str, tuple[str | None, ...]] = {}  # database → its design documents' revisions seen good
        self._lock = threading.Lock()
        self._since_rev: str | None = None
        self._stopping = threading.Event()
        self._said_newer = False  # whether the log said a newer couchsync's protection is left as it is

    def stop(self) -> None:
        """Ask `run()` to return (within one poll)."""
        self._stopping.set()

    def run(self) -> None:
        """Follow the feed, or sweep when the server has none, until `stop()`."""
        while not self._stopping.is_set():
            try:
                self._run()
            except Exception:  # noqa: BLE001 (the thread's last resort: the guard must not stop in silence)
                logger.error("protection guard failed: starting again in %.0fs", RESTART_SECONDS, exc_info=True)
                self._stopping.wait(RESTART_SECONDS)

    def _run(self) -> None:
        since = self._start_when_reachable()
        if self._stopping.is_set():
            return
        if since is None:
            self._sweep_forever(min(self._sweep_interval, FALLBACK_SWEEP))
        else:
            self._follow(since)

    def _start_when_reachable(self) -> str | None:
        """`_start`, tried again every `feed_retry` seconds while CouchDB fails (it may come up after the worker:
        sweeping instead would leave new databases unprotected for minutes). None: no feed, or stopping."""
        log = logger.warning
        waited = False
        while not self._stopping.is_set():
            try:
                return self._start(waited=waited)
            except CouchsyncError as exc:
                waited = True
                if self._metrics is not None:
                    self._metrics.protection_feed.set(0)
                log("protection guard: cannot follow _db_updates yet (%s); trying again every %.0fs", exc,
                    self._feed_retry)
                log = logger.info  # once at WARNING: the gauge says the rest
                # A refused password tried every few seconds would get the account locked out by CouchDB.
                self._stopping.wait(max(self._feed_retry, REFUSED_RETRY) if isinstance(exc, AccessDenied)
                                    else self._feed_retry)
        return None

    def _start(self, *, waited: bool = False) -> str | None:
        """Where to follow the feed from; None when the server has no feed. A first start sweeps.

        `waited`: CouchDB did not answer at first. A first start then follows the feed from its beginning
        (one entry per database): a database created between CouchDB's return and this start, of an
        instance the global database does not list yet, is found by no sweep, only by the feed.
        """
        saved = self._couch.get_local(self._state.db, SINCE_DOC)
        if saved is not None:
            self._since_rev = saved.get("_rev")
            logger.info("protection guard: following _db_updates from the saved sequence")
            return str(saved["since"])
        try:
            # The current sequence before sweeping: what is created during the sweep is in the feed after it.
            _, since = self._couch.db_updates("now", timeout=0.1)
        except NotFound:
            logger.warning(W_NO_FEED, "no _global_changes database", FALLBACK_SWEEP,
                           ": create it (PUT /_global_changes)")
            return None
        except CouchUnavailable:
            raise
        except CouchError as exc:
            logger.warning(W_NO_FEED, f"CouchDB answered {exc.status}", FALLBACK_SWEEP, "")
            return None
        if waited:
            since = "0"
        self.sweep(first=True)
        self._save(since, force=True)
        return since

    def _follow(self, since: str) -> None:
        if self._metrics is not None:
            self._metrics.protection_feed.set(1)
        next_sweep = time.monotonic() + self._sweep_interval
        saved_at = polled_at = time.monotonic()
        failures = 0
        while not self._stopping.is_set():
            # The feed lists each database once however often it was written since: waiting a little
            # between polls gathers a busy second's writes into one check of each database.
            if self._stopping.wait(max(0.0, GATHER_SECONDS - (time.monotonic() - polled_at))):
                break
            polled_at = time.monotonic()
            try:
                events, last = self._couch.db_updates(since, timeout=self._poll_seconds)
            except CouchsyncError as exc:
                failures += 1
                delay = min(30.0, 2.0 ** failures)
                logger.warning("protection guard: _db_updates failed (%s), polling again in %.0fs", exc, delay)
                self._stopping.wait(delay)
                continue
            failures = 0
            self.check(relevant(events))
            since = last
            if time.monotonic() - saved_at >= SAVE_EVERY:
                self._save(since)
                saved_at = time.monotonic()
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + self._sweep_interval
        self._save(since)

    def _sweep_forever(self, interval: float) -> None:
        if self._metrics is not None:
            self._metrics.protection_feed.set(0)
        first = True
        while not self._stopping.is_set():
            try:
                self.sweep(first=first)
                first = False
            except CouchsyncError as exc:
                logger.warning("protection guard: sweep failed (%s)", exc)
            self._stopping.wait(interval)

    def _save(self, since: str, *, force: bool = False) -> None:
        """Keep the sequence (best effort: a lost save replays a few seconds of the feed, harmlessly)."""
        body: dict[str, Any] = {"since": since}
        if self._since_rev:
            body["_rev"] = self._since_rev
        try:
            try:
                self._since_rev = self._couch.put_local(self._state.db, SINCE_DOC, body)
            except NotFound:
                # couchsync's own database, not deployed yet: made here with its protection, as the state
                # store makes it on its first write (never bare, even for the moment until the feed says so).
                create_protected(self._couch, self._state)
                self._since_rev = self._couch.put_local(self._state.db, SINCE_DOC, body)
        except DocumentConflict:
            # Another worker saved it: read its revision again, ours is as good a sequence.
            self._since_rev = (self._couch.get_local(self._state.db, SINCE_DOC) or {}).get("_rev")
        except CouchsyncError as exc:
            (logger.warning if force else logger.info)("protection guard: sequence not saved (%s)", exc)

    def sweep(self, *, first: bool = False) -> int:
        """Check every instance's contacts and groups databases and the state database; the protections put
        back. A first sweep counts what it installs as installed, later ones as restored where it was seen good."""
        started = time.monotonic()
        targets = [self._state] + [target for instance in self._directory.every_instance()
                                   for target in self._design.instance_targets(instance.prefix, self._protection)]
        restored = self._check_all([(target, SWEPT) for target in targets], first=first)
        logger.info("protection guard: swept %d databases in %.1fs, %d protections put back", len(targets),
                    time.monotonic() - started, restored)
        return restored

    def check(self, databases: dict[str, str]) -> int:
        """Check these databases ({name: "created" | "updated"}); the protections put back."""
        targets = []
        for db, kind in databases.items():
            target = self._state if db == self._state.db else self._design.database_target(db, self._protection)
            if target is not None:
                targets.append((target, kind))
        return self._check_all(targets) if targets else 0

    def _check_all(self, targets: list[tuple[Target, str]], *, first: bool = False) -> int:
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="couchsync-guard") as pool:
            return sum(pool.map(lambda pair: self._check(*pair, first=first), targets))

    def _check(self, target: Target, kind: str, *, first: bool = False) -> int:
        """Make one database hold its design documents; 1 when its protection was put back."""
        try:
            revisions = tuple(self._couch.design_revision(target.db, name) for name, _ in target.ddocs)
            with self._lock:
                seen_good = self._good.get(target.db)
            if None not in revisions and revisions == seen_good:
                return 0  # the cheap path: what a busy database costs per batch of the feed
            outcome = deploy(self._couch, target)
            if outcome.error is not None:
                logger.warning("protection guard: %s: %s", target.db, outcome.error)
                return 0
            self._remember(target)
        except CouchsyncError as exc:
            logger.warning("protection guard: %s: %s", target.db, exc)
            return 0
        results = dict(outcome.results)
        status = results.get(f"_design/{PROTECTION_DDOC}")
        if status == NEWER and not self._said_newer:
            self._said_newer = True
            logger.warning("protection guard: a newer couchsync's _design/%s is in %s (and maybe elsewhere): left "
                           "as it is, as every newer one will be (this worker is %s)", PROTECTION_DDOC, target.db,
                           self._protection.get(VERSION_FIELD))
        self._count_lookup(target.db, results.get(f"_design/{LOOKUP_DDOC}"), kind, seen_good is not None, first)
        return self._count(target.db, status in ("installed", "updated"), kind, seen_good is not None, first)

    def _remember(self, target: Target) -> None:
        """Record the revisions of the design documents as deployed, or as a newer couchsync left them (read
        back: a write after ours is not trusted)."""
        revisions: list[str | None] = []
        for name, body in target.ddocs:
            current = self._couch.get_design(target.db, name)
            if current is None or not (same_body(current, body) or is_newer(current, body, self._couch.seal_key)):
                return
            revisions.append(str(current["_rev"]))
        with self._lock:
            self._good[target.db] = tuple(revisions)

    def _count_lookup(self, db: str, result: str | None, kind: str, was_good: bool, first: bool) -> None:
        """The lookup view put back where someone deleted or changed it: said and counted (a hidden view
        left a deleted group's relationships on the contacts)."""
        if result not in ("installed", "updated") or not is_restoration(kind, was_good, first):
            return
        logger.warning("protection guard: put back _design/%s in %s (deleted or changed)", LOOKUP_DDOC, db)
        if self._metrics is not None:
            self._metrics.lookup_restored.inc()

    def _count(self, db: str, put: bool, kind: str, was_good: bool, first: bool) -> int:
        if not put:
            return 0
        restored = is_restoration(kind, was_good, first)
        if self._metrics is not None:
            (self._metrics.protection_restored if restored else self._metrics.protection_installed).inc()
        if restored:
            logger.warning("protection guard: put back _design/%s in %s (deleted or changed)", PROTECTION_DDOC, db)
            if was_good:
                # Repaired only where this guard saw the protection in place: a database the feed names
                # before the first sweep reaches it may never have been protected, and its first install
                # calls for no repair (the reconcile would also give it the owners' contacts at once).
                self._on_restored(db)
            return 1
        logger.info("protection guard: installed _design/%s in %s", PROTECTION_DDOC, db)
        return 0


def is_restoration(kind: str, was_good: bool, first: bool) -> bool:
    """Whether a design document put in a database was deleted or changed by someone (not a first install)."""
    # A database seen for the first time (created, or met by a first sweep) was never protected:
    # installing there is no restoration. Anything else was deleted or changed by someone.
    return kind == UPDATED or (kind == SWEPT and (was_good or not first))


def relevant(events: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The databases a batch of the feed names, created ones marked so (a creation wins over updates)."""
    found: dict[str, str] = {}
    for event in events:
        db, kind = event.get("db_name"), event.get("type")
        if not isinstance(db, str) or kind not in (CREATED, UPDATED):
            continue
        if kind == CREATED or db not in found:
            found[db] = kind
    return found
