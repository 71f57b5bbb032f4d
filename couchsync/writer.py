"""PlanWriter: brings one instance to a plan, planning again from a fresh read after a conflict.

Every use case (an event, a bootstrap page, a reconcile repair) is read → plan → write. The writer
owns the write half and the loop: one `_bulk_docs` per database in the plan's order, and on a 409 (or
when the document a plan was derived from moved under its writes, see `Plan.basis`) a new plan from a
new read, since plans merge rather than overwrite.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from couchsync.couch import CouchGateway, WriteResult
from couchsync.errors import AccessDenied, CouchError, DocumentConflict
from couchsync.instances import Instance
from couchsync.plan import Plan, Write

logger = logging.getLogger(__name__)

REPLAN_PAUSE = 0.02  # seconds, times the attempt: the most a re-plan after a 409 waits

# Reads the instance and plans; True asks for the earlier revisions a write replaced unseen to be read
# too (see `replaced_unseen`).
Planner = Callable[[bool], Plan]


@dataclass(frozen=True, slots=True)
class Written:
    """What converging did: the writes that succeeded over all attempts, and the last plan's refusals."""

    done: tuple[Write, ...]
    refusals: tuple[str, ...]
    attempts: int

    @property
    def writes(self) -> int:
        return len(self.done)


class PlanWriter:
    """Writes plans through a CouchGateway, each document at most once per attempt."""

    def __init__(self, couch: CouchGateway, max_attempts: int) -> None:
        self._couch = couch
        self._max_attempts = max_attempts

    def converge(self, instance: Instance, planner: Planner, *, first: Plan | None = None) -> Written:
        """Plan, write, and plan again while a write conflicts; `first`: the first plan, made already.

        Raises:
            DocumentConflict: still conflicting after the last attempt.
            CouchError: a document failed for another reason than a conflict or a validation refusal.
        """
        done: list[Write] = []
        recover = False
        for attempt in range(1, self._max_attempts + 1):
            plan = first if attempt == 1 and first is not None else planner(recover)
            results = self.write(instance, plan)
            done += [write for write, result in zip(plan.writes, results) if result.ok]
            replaced = replaced_unseen(plan, results)
            recover = recover or replaced
            if not any(result.conflict for result in results) and not replaced:
                _raise_unexpected(instance, results)
                if not self._basis_moved(instance, plan, results):
                    refusals = [refusal.reason for refusal in plan.refusals]
                    refusals += [f"CouchDB refused {r.doc_id}: {r.reason}" for r in results
                                 if not r.ok and r.error == "forbidden"]
                    return Written(tuple(done), tuple(refusals), attempt)
            logger.debug("conflict in %s (or the plan's basis moved), planning again", instance.domain)
            # Writers of the same document re-plan at once and collide again: spread them out.
            time.sleep(random.uniform(0, REPLAN_PAUSE * attempt))
        raise DocumentConflict(f"still conflicting after {self._max_attempts} attempts", db=instance.prefix)

    def _basis_moved(self, instance: Instance, plan: Plan, results: Sequence[WriteResult]) -> bool:
        """Whether the document the plan was derived from changed under its writes (see `Plan.basis`).

        A basis written first guarded every later write with its revision: nothing to check. One not
        written must still be at the revision it was read at; one written last must find the writes
        before it as it left them. Either way the writes are idempotent: planning again only repairs.
        """
        basis = plan.basis
        written = [(write, result) for write, result in zip(plan.writes, results) if result.ok]
        if basis is None or not written:
            return False
        ids = [(write.doctype, write.doc["_id"]) for write, _ in written]
        if (basis.doctype, basis.doc_id) not in ids:
            current = self._couch.revisions(instance.database(basis.doctype), [basis.doc_id])
            return current.get(basis.doc_id) != basis.rev
        expected: dict[str, dict[str, str | None]] = {}
        for write, result in written[:ids.index((basis.doctype, basis.doc_id))]:
            expected.setdefault(write.doctype, {})[write.doc["_id"]] = result.rev
        for doctype, revs in expected.items():
            current = self._couch.revisions(instance.database(doctype), list(revs))
            if {doc_id: current.get(doc_id) for doc_id in revs} != revs:
                return True
        return False

    def write(self, instance: Instance, plan: Plan) -> list[WriteResult]:
        """One bulk write per database, in the plan's order; a conflict stops the rest (re-planned)."""
        results: list[WriteResult] = []
        for doctype, writes in itertools.groupby(plan.writes, key=lambda write: write.doctype):
            results += self._couch.bulk_write(instance.database(doctype), [write.doc for write in writes])
            if any(result.conflict for result in results):
                break
        return results


def replaced_unseen(plan: Plan, results: Sequence[WriteResult]) -> bool:
    """Whether a write planned over no document replaced a revision nobody read.

    CouchDB accepts a write without `_rev` over a deleted document, with no conflict: two workers that
    both saw no group and both wrote its memory as a tombstone leave only the second one's. Such a
    write comes back as revision 2 or later; its writer then plans again with the memory of the
    revisions it replaced merged back in.
    """
    return any("_rev" not in write.doc and result.ok and result.rev is not None
               and int(result.rev.split("-", 1)[0]) > 1
               for write, result in zip(plan.writes, results))


def _raise_unexpected(instance: Instance, results: Sequence[WriteResult]) -> None:
    """Raise for a per-document error that is neither a conflict nor a validation refusal."""
    for result in results:
        if not result.ok and result.error not in ("conflict", "forbidden"):
            error = AccessDenied if result.error == "unauthorized" else CouchError
            raise error(f"not written: {result.error}: {result.reason}", db=instance.prefix,
                        doc_id=result.doc_id)
