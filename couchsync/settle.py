"""Settling: what a worker wrote is read again, with its conflicts, once a CouchDB cluster has settled.

A cluster accepts two updates of one revision made at the same moment through two nodes: each node
answers 201, and learns of the other's update only when its internal replication runs (milliseconds;
seconds under load). Neither writer sees a 409 or a conflict. A state document left so holds one
writer's contribution as its winner, the other's as a losing leaf, and an instance's document holds
one projection among two. Whoever reads them next merges them (every read asks for the conflicts), but
after the last events of a burst nobody may read them again.

So every document couchsync writes is read once more, `delay` seconds later, with its conflicts
(`Settling.written`, then `Synchronizer.settle`): a conflicted state is joined and projected again
into every instance of its organization, a conflicted managed document is projected again from the
state in its instance (`Repair`). A conflicted state that the next event's read joins first is
repaired alike (`Settling.state_joined`): the check would find it resolved. Those writes are read
again in turn. Of two writers that collided, the later one's check comes after both writes are
replicated, so a collision is seen as long as replication takes less than `delay`. A single CouchDB
node never accepts both updates: there the check finds nothing, and `--settle-delay 0` turns it off.

`repairs_of` is pure; `Settling` only keeps the list of what to read again, thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from couchsync.identity import person_key
from couchsync.documents import CONTACTS, GROUPS, Doc, managed_tag
from couchsync.instances import Instance
from couchsync.state import GroupState, PersonState, state_from_doc

STATE = "state"  # the doctype of a key naming the state database (its instance is None)

# Where documents were written: an instance and its doctype, or (None, STATE).
Where = tuple[Instance | None, str]


@dataclass(frozen=True, slots=True)
class Repair:
    """What to project again after a conflict: groups (external ids) and people (lower-case emails) of one
    organization, in one instance (`domain`) or in all of them (None: the state itself was conflicted)."""

    organization_id: str
    groups: frozenset[str] = frozenset()
    emails: frozenset[str] = frozenset()
    domain: str | None = None


def repairs_of(where: Where, conflicted: Iterable[Sequence[Doc]]) -> list[Repair]:
    """The repairs the conflicted documents of one place call for (each given as its live leaves).

    A state document names its group or person; a managed group or contact names them in its tag.
    Anything else (a document couchsync does not manage) is not couchsync's to merge.
    """
    instance, doctype = where
    repairs: list[Repair] = []
    for leaves in conflicted:
        if instance is None:
            state = next((state for state in map(state_from_doc, leaves) if state is not None), None)
            if state is not None:
                repairs.append(_state_repair(state))
            continue
        tag = next((managed_tag(leaf) for leaf in leaves if managed_tag(leaf).get("organizationId")), None)
        if tag is None:
            continue
        organization_id = str(tag["organizationId"])
        if doctype == GROUPS and tag.get("externalId"):
            repairs.append(Repair(organization_id, groups=frozenset([str(tag["externalId"])]),
                                  domain=instance.domain))
        elif doctype == CONTACTS and tag.get("email"):
            repairs.append(Repair(organization_id, emails=frozenset([person_key(str(tag["email"]))]),
                                  domain=instance.domain))
    return joined_repairs(repairs)


def unsettled(leaves: dict[str, list[Doc]], written: dict[str, bool]) -> list[list[Doc]]:
    """The documents read again that a cluster left conflicted: several live leaves, or live where this
    worker deleted it (a concurrent update's branch won over the deletion, which `_conflicts` never shows)."""
    return [found for doc_id, found in leaves.items() if len(found) > 1 or (written.get(doc_id) and found)]


def _state_repair(state: GroupState | PersonState) -> Repair:
    if isinstance(state, GroupState):
        return Repair(state.organization_id, groups=frozenset([state.external_id]))
    return Repair(state.organization_id, emails=frozenset([state.email]))


def joined_repairs(repairs: Iterable[Repair]) -> list[Repair]:
    """One repair per organization and place, in a stable order."""
    joined: dict[tuple[str, str | None], Repair] = {}
    for repair in repairs:
        key = (repair.organization_id, repair.domain)
        known = joined.get(key)
        joined[key] = repair if known is None else Repair(
            repair.organization_id, known.groups | repair.groups, known.emails | repair.emails, repair.domain)
    return [joined[key] for key in sorted(joined, key=lambda key: (key[0], key[1] or ""))]


class Settling:
    """The documents written and not yet read again; `delay` seconds (0: none are kept).

    `on_merged(n)`: n losing revisions were deleted by a merge (the worker counts them).
    """

    def __init__(self, delay: float, on_merged: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.delay = delay
        self._on_merged = on_merged
        self._clock = clock
        self._lock = threading.Lock()
        # Document id → when it was last written, and whether that write deleted it.
        self._pending: dict[Where, dict[str, tuple[float, bool]]] = {}
        self._repairs: list[tuple[float, Repair]] = []  # when due, what
        self._rounds = 0  # checks taken off the lists and still running (`checking`)

    def written(self, instance: Instance | None, doctype: str, doc_ids: Iterable[str],
                deleted: Iterable[str] = ()) -> None:
        """Documents were written in an instance's database of `doctype` (None, STATE: the state's);
        `deleted`: ids it deleted (a losing leaf's deletion is not one: its winner is written)."""
        if self.delay <= 0:
            return
        now = self._clock()
        with self._lock:
            pending = self._pending.setdefault((instance, doctype), {})
            for doc_id in doc_ids:
                pending[doc_id] = (now, False)
            for doc_id in deleted:
                pending[doc_id] = (now, True)

    def merged(self, count: int) -> None:
        """`count` losing revisions were deleted by a merge."""
        if count and self._on_merged is not None:
            self._on_merged(count)

    def contact_merged(self, instance: Instance, contact: Doc) -> None:
        """A conflicted managed contact was written over its chosen leaf, the others deleted: a projection
        of some groups (an event's) leaves the relationships the deleted leaves held to other groups as the
        chosen leaf had them, so the contact is projected again from every group's state."""
        tag = managed_tag(contact)
        if tag.get("organizationId") and tag.get("email"):
            self._ask(Repair(str(tag["organizationId"]), emails=frozenset([person_key(str(tag["email"]))]),
                             domain=instance.domain))

    def state_joined(self, state: GroupState | PersonState) -> None:
        """A read found a state conflicted and wrote the join of its leaves: the projections of the losing
        leaves may have landed last in some instances, and the event that read it projects only its own
        part, while the settling check of the earlier writes finds the state resolved already. So the whole
        state is projected again into every instance of its organization."""
        self._ask(_state_repair(state))

    def failed(self, repair: Repair) -> None:
        """A repair failed (its writes kept conflicting with others'): made again once `delay` has passed,
        not only when the next event or reconcile happens to touch the same documents."""
        self._ask(repair, self._clock() + self.delay)

    def _ask(self, repair: Repair, due: float = float("-inf")) -> None:
        if self.delay > 0:
            with self._lock:
                self._repairs.append((due, repair))

    def repairs(self, *, everything: bool = False) -> list[Repair]:
        """The repairs `contact_merged`, `state_joined` and `failed` asked for that are due (`everything`:
        all), taken off the list."""
        now = float("inf") if everything else self._clock()
        with self._lock:
            taken = [repair for due, repair in self._repairs if due <= now]
            self._repairs = [(due, repair) for due, repair in self._repairs if due > now]
        return taken

    def due(self, *, everything: bool = False) -> dict[Where, dict[str, bool]]:
        """The documents written `delay` seconds ago or more (`everything`: all), taken off the list: by
        place, each id with whether it was deleted."""
        cutoff = float("inf") if everything else self._clock() - self.delay
        taken: dict[Where, dict[str, bool]] = {}
        with self._lock:
            for where, pending in list(self._pending.items()):
                ready = {doc_id: deleted for doc_id, (when, deleted) in sorted(pending.items()) if when <= cutoff}
                for doc_id in ready:
                    del pending[doc_id]
                if ready:
                    taken[where] = ready
                if not pending:
                    del self._pending[where]
        return taken

    @contextmanager
    def checking(self) -> Iterator[None]:
        """Around a check of what `due` and `repairs` gave: it counts as `pending` until it ends."""
        with self._lock:
            self._rounds += 1
        try:
            yield
        finally:
            with self._lock:
                self._rounds -= 1

    def pending(self) -> int:
        """Documents to read again, repairs to make and checks running: 0 once all this worker wrote is
        known settled (what `couchsync_settling_pending` shows)."""
        with self._lock:
            return sum(map(len, self._pending.values())) + len(self._repairs) + self._rounds

    def waiting(self) -> float:
        """Seconds until everything written so far is due (0 when nothing is waiting)."""
        with self._lock:
            newest = max((when for pending in self._pending.values() for when, _ in pending.values()), default=None)
        return 0.0 if newest is None else max(0.0, newest + self.delay - self._clock())
