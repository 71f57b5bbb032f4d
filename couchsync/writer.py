"""PlanWriter: brings one instance to a plan, planning again from a fresh read after a conflict.

Every use case (an event, a bootstrap page, a reconcile repair) is read → project → write. The writer
owns the write half and the loop: one `_bulk_docs` per database in the plan's order (a second one deletes
the losing leaves of the conflicted documents the first wrote), and on a 409 (or when the state a plan
was projected from moved under its writes, see `Plan.basis`) a new plan from a new read of the state
and of the instance.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from couchsync.couch import CouchGateway, WriteResult
from couchsync.documents import CONTACTS
from couchsync.errors import AccessDenied, CouchError, DocumentConflict
from couchsync.instances import Instance
from couchsync.plan import Plan, Write
from couchsync.settle import Settling
from couchsync.state_store import StateStore

logger = logging.getLogger(__name__)

REPLAN_PAUSE = 0.02  # seconds, times 2 ** attempt: the most a re-plan after a 409 waits

# Reads the state and the instance and plans; the argument is the attempt (1 first: the caller may hold
# the state already).
Planner = Callable[[int], Plan]


@dataclass(frozen=True, slots=True)
class Written:
    """What converging did: the writes that succeeded over all attempts, and the last plan's refusals."""

    done: tuple[Write, ...]
    refusals: tuple[str, ...]
    attempts: int
    requests: int = 0  # `_bulk_docs` requests made, over all attempts

    @property
    def writes(self) -> int:
        return len(self.done)


class PlanWriter:
    """Writes plans through a CouchGateway, each document at most once per attempt."""

    def __init__(self, couch: CouchGateway, states: StateStore, max_attempts: int,
                 settling: Settling | None = None) -> None:
        self._couch = couch
        self._states = states
        self._max_attempts = max_attempts
        self._settling = settling or Settling(0)

    def converge(self, instance: Instance, planner: Planner, *, first: Plan | None = None,
                 basis_checked_after: bool = False) -> Written:
        """Plan, write, and plan again while a write conflicts; `first`: the first plan, made already.
        `basis_checked_after`: the caller checks once, after every instance, whether the states moved
        under the writes (and converges again if they did) instead of a check per instance.

        Raises:
            DocumentConflict: still conflicting after the last attempt.
            CouchError: a document failed for another reason than a conflict or a validation refusal.
        """
        done: list[Write] = []
        requests = 0
        for attempt in range(1, self._max_attempts + 1):
            plan = first if attempt == 1 and first is not None else planner(attempt)
            results, made = self.write(instance, plan)
            requests += made
            written = [write for write, result in zip(plan.writes, results) if result.ok]
            self._settling.merged(sum(1 for write in written if write.merge))
            done += written
            if not any(result.conflict for result in results):
                _raise_unexpected(instance, results)
                # Nothing written changes nothing: a stale projection is only harmful once written.
                if (not any(result.ok for result in results) or basis_checked_after
                        or not self._states.moved(plan.basis, plan.since)):
                    refusals = [refusal.reason for refusal in plan.refusals]
                    # Once per document: a losing leaf left undeleted repeats its document's refusal.
                    refusals += dict.fromkeys(f"CouchDB refused {r.doc_id}: {r.reason}" for r in results
                                              if not r.ok and r.error == "forbidden")
                    return Written(tuple(done), tuple(refusals), attempt, requests)
            logger.debug("conflict in %s (or the state moved), planning again", instance.domain)
            # Writers of the same documents re-plan at once and collide again: spread them out, wider each
            # time (competing workers project the same organization's batches into the same instances).
            time.sleep(random.uniform(0, REPLAN_PAUSE * 2 ** attempt))
        raise DocumentConflict(f"still conflicting after {self._max_attempts} attempts", db=instance.prefix)

    def write(self, instance: Instance, plan: Plan) -> tuple[list[WriteResult], int]:
        """The plan's writes database by database in its order; a conflict stops the rest (re-planned).
        The results in the plan's order, and the `_bulk_docs` requests made."""
        results: list[WriteResult] = []
        requests = 0
        for doctype, group in itertools.groupby(plan.writes, key=_doctype):
            written, made = self._write_database(instance, doctype, list(group))
            results += written
            requests += made
            if any(result.conflict for result in written):
                break
        return results, requests

    def _write_database(self, instance: Instance, doctype: str,
                        writes: list[Write]) -> tuple[list[WriteResult], int]:
        """The chosen leaves in one `_bulk_docs`, then in a second the losing leaves of the documents
        whose chosen leaf was written (or that have none: a deletion); the results in order, the requests."""
        firsts = [i for i, write in enumerate(writes) if not write.merge]
        outcome = dict(zip(firsts, self._bulk(instance, doctype, [writes[i] for i in firsts])))
        chosen = {writes[i].doc["_id"]: i for i in firsts}
        # Deleted beside a write that then conflicted, what a losing leaf alone held would be lost.
        losers = [i for i, write in enumerate(writes) if write.merge and (
            write.doc["_id"] not in chosen or outcome[chosen[write.doc["_id"]]].ok)]
        outcome.update(zip(losers, self._bulk(instance, doctype, [writes[i] for i in losers])))
        if doctype == CONTACTS:
            for doc_id in {writes[i].doc["_id"] for i in losers if outcome[i].ok} & chosen.keys():
                self._settling.contact_merged(instance, writes[chosen[doc_id]].doc)
        # A losing leaf left undeleted shares its chosen leaf's result.
        results = [outcome.get(i) or outcome[chosen[write.doc["_id"]]] for i, write in enumerate(writes)]
        return results, bool(firsts) + bool(losers)

    def _bulk(self, instance: Instance, doctype: str, writes: list[Write]) -> list[WriteResult]:
        if not writes:
            return []
        written = self._couch.bulk_write(instance.database(doctype), [write.doc for write in writes])
        # Read again once a cluster has settled (see `couchsync.settle`).
        ok = [write for write, result in zip(writes, written) if result.ok and not write.merge]
        self._settling.written(instance, doctype, [w.doc["_id"] for w in ok if not w.doc.get("_deleted")],
                               [w.doc["_id"] for w in ok if w.doc.get("_deleted")])
        return written


def _doctype(write: Write) -> str:
    return write.doctype


def _raise_unexpected(instance: Instance, results: Sequence[WriteResult]) -> None:
    """Raise for a per-document error that is neither a conflict nor a validation refusal."""
    for result in results:
        if not result.ok and result.error not in ("conflict", "forbidden"):
            error = AccessDenied if result.error == "unauthorized" else CouchError
            raise error(f"not written: {result.error}: {result.reason}", db=instance.prefix,
                        doc_id=result.doc_id)
