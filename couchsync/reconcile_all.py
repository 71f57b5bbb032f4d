"""ReconcileRun: `reconcile --all`, every organization in turn, resumable after a crash.

Organizations are listed in id order (`InstanceDirectory.organizations`) and reconciled a few at a time.
Progress is kept in `_local/couchsync-reconcile-run` of couchsync's own state database after each
organization: a cursor (every organization up to it is finished) and the finished ones beyond it (a
slow organization holds the cursor back while the others go on). A run that dies is resumed by the
next invocation, which skips what was finished; a run that ends records its time as the last success
when no organization failed. The document is `_local`: never replicated, never judged by the state
database's validate_doc_update, and out of the state's id ranges.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from couchsync.couch import CouchGateway
from couchsync.errors import CouchsyncError
from couchsync.reconcile import ERROR, REFUSED, REPAIRED, InstanceResult

logger = logging.getLogger(__name__)

RUN_DOC = "couchsync-reconcile-run"
Reconcile = Callable[[str], list[InstanceResult]]


@dataclass
class OrganizationResult:
    """What reconciling one organization found and did."""

    organization_id: str
    instances: list[InstanceResult] = field(default_factory=list)
    error: str | None = None  # the organization as a whole could not be reconciled

    @property
    def found(self) -> int:
        return sum(len(result.items) for result in self.instances)

    @property
    def repaired(self) -> int:
        return sum(len(result.items) for result in self.instances if result.status == REPAIRED)

    @property
    def failed(self) -> bool:
        return self.error is not None or any(result.status in (REFUSED, ERROR) for result in self.instances)


@dataclass
class RunProgress:
    """The run document's content: where a run is, and what it found so far."""

    started: float
    cursor: str = ""                 # every organization up to this id (included) is finished
    done: set[str] = field(default_factory=set)  # finished organizations after the cursor
    found: int = 0
    repaired: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    finished: bool = False
    last_success: float | None = None  # of an earlier run, kept across runs
    resumed: int = 0                   # organizations an earlier process of this run finished

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RunProgress:
        return cls(started=float(doc["started"]), cursor=str(doc.get("cursor") or ""), done=set(doc.get("done") or ()),
                   found=int(doc.get("found") or 0), repaired=int(doc.get("repaired") or 0),
                   ok=int(doc.get("ok") or 0), failed=list(doc.get("failed") or ()),
                   finished=bool(doc.get("finished")), last_success=doc.get("lastSuccess"))

    def to_doc(self) -> dict[str, Any]:
        return {"started": self.started, "cursor": self.cursor, "done": sorted(self.done), "found": self.found,
                "repaired": self.repaired, "ok": self.ok, "failed": self.failed, "finished": self.finished,
                "lastSuccess": self.last_success}

    def is_done(self, organization_id: str) -> bool:
        return organization_id <= self.cursor or organization_id in self.done

    @property
    def organizations(self) -> int:
        return self.ok + len(self.failed)


class ReconcileRun:
    """Reconciles every organization, `concurrency` at a time, recording progress in the state database."""

    def __init__(self, couch: CouchGateway, state_db: str, organizations: Callable[[str], Iterator[str]],
                 reconcile: Reconcile, *, concurrency: int = 4, record: bool = True) -> None:
        self._couch = couch
        self._db = state_db
        self._organizations = organizations
        self._reconcile = reconcile
        self._concurrency = concurrency
        self._record = record  # False in a dry run: nothing written, nothing resumed
        self._rev: str | None = None
        self._lock = threading.Lock()

    def start(self) -> RunProgress:
        """The unfinished run to resume, or a new one (keeping the last success time)."""
        doc = self._couch.get_local(self._db, RUN_DOC) if self._record else None
        self._rev = doc.get("_rev") if doc else None
        previous = RunProgress.from_doc(doc) if doc else None
        if previous is not None and not previous.finished:
            previous.resumed = previous.organizations
            logger.info("resuming the reconcile run started at %s: %d organizations finished",
                        _iso(previous.started), previous.resumed)
            return previous
        return RunProgress(started=time.time(), last_success=previous.last_success if previous else None)

    def run(self, progress: RunProgress, on_result: Callable[[OrganizationResult], None]) -> RunProgress:
        """Reconcile what `progress` has not finished; the progress at the end (`finished`).

        Raises:
            CouchsyncError: a retryable failure (CouchDB gone): the run stops, to be resumed.
        """
        order: list[str] = []   # submitted and not yet under the cursor, in id order
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="couchsync-org") as pool:
            pending: set[Future[OrganizationResult]] = set()
            for organization_id in self._organizations(progress.cursor):
                if progress.is_done(organization_id):
                    continue
                order.append(organization_id)
                pending.add(pool.submit(self._one, organization_id))
                if len(pending) >= self._concurrency:
                    pending = self._settle(pending, progress, order, on_result)
            while pending:
                pending = self._settle(pending, progress, order, on_result)
        progress.finished = True
        if not progress.failed:
            progress.last_success = time.time()
        self._save(progress)
        return progress

    def _one(self, organization_id: str) -> OrganizationResult:
        try:
            return OrganizationResult(organization_id, self._reconcile(organization_id))
        except CouchsyncError as exc:
            if exc.retryable:
                raise
            return OrganizationResult(organization_id, error=f"{type(exc).__name__}: {exc}")

    def _settle(self, pending: set[Future[OrganizationResult]], progress: RunProgress, order: list[str],
                on_result: Callable[[OrganizationResult], None]) -> set[Future[OrganizationResult]]:
        finished, left = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            result = future.result()  # a retryable error stops the run here
            self._record_result(progress, order, result)
            on_result(result)
        return left

    def _record_result(self, progress: RunProgress, order: list[str], result: OrganizationResult) -> None:
        with self._lock:
            progress.found += result.found
            progress.repaired += result.repaired
            if result.failed:
                progress.failed.append(result.organization_id)
            else:
                progress.ok += 1
            progress.done.add(result.organization_id)
            # The cursor moves over every finished organization at the head of the order.
            while order and order[0] in progress.done:
                progress.cursor = order.pop(0)
            progress.done = {done for done in progress.done if done > progress.cursor}
            self._save(progress)

    def _save(self, progress: RunProgress) -> None:
        if not self._record:
            return
        body = progress.to_doc()
        if self._rev:
            body["_rev"] = self._rev
        self._rev = self._couch.put_local(self._db, RUN_DOC, body)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
