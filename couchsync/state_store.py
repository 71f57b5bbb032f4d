"""StateStore: the directory state in couchsync's own database, merged by compare-and-set.

One document per group and per person (ids from `couchsync.state`), all live. Whoever reads one
reads every leaf: a cluster accepts concurrent updates through different nodes, so a 409 is no
serialization guarantee. The leaves are joined (the join is commutative), the join is written over
the winner, and once it is written the other leaves are deleted. A merge is that same loop with the
new contribution joined in: a 409 means read, join, write again. A join written over several leaves
is projected again whole, later (`Settling.state_joined`): each leaf's writer projected only its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from couchsync.couch import CouchGateway
from couchsync.documents import CONFLICTS, Doc, losing_deletions
from couchsync.errors import CouchError, DocumentConflict
from couchsync.settle import STATE, Settling
from couchsync.state import (
    GROUP, PERSON, GroupState, PersonState, State, id_range, join_states, organization_state_id, state_from_doc)

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=State)


@dataclass(frozen=True, slots=True)
class Stored(Generic[S]):
    """A state as written: its revision is what a projection names as its basis."""

    state: S
    rev: str


class StateStore:
    """Reads and merges states in one database (`couchsync/directory` by default); thread-safe."""

    def __init__(self, couch: CouchGateway, db: str, *, max_attempts: int = 5, page_size: int = 1000,
                 settling: Settling | None = None) -> None:
        self._couch = couch
        self.db = db
        self._settling = settling or Settling(0)
        self._max_attempts = max_attempts
        self._page_size = page_size
        self._seeded: set[str] = set()

    def merge(self, contributions: Iterable[State]) -> dict[str, Stored[State]]:
        """Join each contribution into its stored state (one `_bulk_docs` an attempt); the states as written.

        Raises:
            DocumentConflict: still conflicting after the last attempt.
            CouchError: the database refused a write for another reason.
        """
        pending: dict[str, State | None] = {}
        for state in contributions:  # several events of a batch may touch one state: joined first
            known = pending.get(state.state_id)
            pending[state.state_id] = state if known is None else join_states((known, state))
        return self._converge(pending)

    def read(self, state_ids: Sequence[str]) -> dict[str, Stored[State]]:
        """The stored states with these ids (absent: none), their conflicts joined and resolved."""
        return self._converge(dict.fromkeys(state_ids))

    def _converge(self, pending: dict[str, State | None]) -> dict[str, Stored[State]]:
        done: dict[str, Stored[State]] = {}
        for _ in range(self._max_attempts):
            leaves = self._couch.leaves(self.db, list(pending))
            joins: dict[str, tuple[State, list[Doc]]] = {}  # state id → the join, the leaves it replaces
            for state_id, contribution in pending.items():
                current = leaves.get(state_id, [])
                known = join_states(state for state in map(state_from_doc, current) if state is not None)
                new = join_states(state for state in (known, contribution) if state is not None)
                if new is None:
                    continue
                if len(current) == 1 and new == known:
                    done[state_id] = Stored(new, current[0]["_rev"])
                else:
                    joins[state_id] = (new, current)
            conflicting = self._write(joins, done)
            if not conflicting:
                return done
            pending = {state_id: pending[state_id] for state_id in conflicting}
        raise DocumentConflict(f"directory state still conflicting after {self._max_attempts} attempts", db=self.db)

    def _write(self, joins: dict[str, tuple[State, list[Doc]]], done: dict[str, Stored[State]]) -> list[str]:
        """Write each join over its winning leaf (into `done`), then delete the other leaves of those
        written; the ids whose write conflicted.

        Raises:
            CouchError: the database refused a write for another reason than a conflict.
        """
        if not joins:
            return []
        docs = [{"_id": state_id, **new.to_doc(), **({"_rev": current[0]["_rev"]} if current else {})}
                for state_id, (new, current) in joins.items()]
        conflicting, written = [], []
        for doc, result in zip(docs, self._couch.bulk_write(self.db, docs)):
            if result.conflict:
                conflicting.append(doc["_id"])
            elif not result.ok or result.rev is None:
                raise CouchError(f"state not written: {result.error}: {result.reason}", db=self.db, doc_id=doc["_id"])
            else:
                done[doc["_id"]] = Stored(joins[doc["_id"]][0], result.rev)
                written.append(doc["_id"])
        self._settling.written(None, STATE, written)
        # Only once the join that holds them is written: deleted beside a join that then conflicted, what a
        # losing leaf alone held (another worker's acknowledged event) would be lost.
        losers = [deletion for state_id in written for deletion in losing_deletions(
            {"_id": state_id, CONFLICTS: [leaf["_rev"] for leaf in joins[state_id][1][1:]]})]
        if losers:
            # A losing leaf someone deleted or extended meanwhile stays for the next reader to join.
            self._settling.merged(sum(1 for result in self._couch.bulk_write(self.db, losers) if result.ok))
        for state_id in written:
            if len(joins[state_id][1]) > 1:
                self._settling.state_joined(joins[state_id][0])
        return conflicting

    def groups(self, organization_id: str) -> Iterator[Stored[GroupState]]:
        """Every group state of the organization, page by page."""
        for stored in self._all(organization_id, GROUP):
            assert isinstance(stored.state, GroupState)
            yield Stored(stored.state, stored.rev)

    def people(self, organization_id: str) -> Iterator[list[Stored[PersonState]]]:
        """Every person of the organization, in pages."""
        page: list[Stored[PersonState]] = []
        for stored in self._all(organization_id, PERSON):
            assert isinstance(stored.state, PersonState)
            page.append(Stored(stored.state, stored.rev))
            if len(page) == self._page_size:
                yield page
                page = []
        if page:
            yield page

    def count_people(self, organization_id: str) -> int:
        """How many people the organization's state has (ids only: for a progress bar)."""
        start, end = id_range(organization_id, PERSON)
        return sum(1 for _ in self._couch.range(self.db, start, end, page_size=self._page_size, include_docs=False))

    def _all(self, organization_id: str, kind: str) -> Iterator[Stored[State]]:
        conflicted: list[str] = []
        for doc in self._couch.range(self.db, *id_range(organization_id, kind), page_size=self._page_size):
            state = state_from_doc(doc)
            if state is None:
                continue
            if doc.get("_conflicts"):
                conflicted.append(doc["_id"])
            else:
                yield Stored(state, doc["_rev"])
        # Conflicted documents are few: joined and resolved once the range is read.
        yield from self.read(conflicted).values()

    def moved(self, basis: Sequence[tuple[str, str]]) -> bool:
        """Whether any of these states has another revision than the one a projection was made from.

        Winning revisions only (one light `_all_docs`): a conflict the cluster makes without changing
        the winner is joined at the next read of that state.
        """
        if not basis:
            return False
        current = self._couch.revisions(self.db, [state_id for state_id, _ in basis])
        return any(current.get(state_id) != rev for state_id, rev in basis)

    def is_seeded(self, organization_id: str) -> bool:
        """Whether the organization's state was taken over already (see `couchsync.state.seed`)."""
        if organization_id in self._seeded:
            return True
        if self._couch.get_many(self.db, [organization_state_id(organization_id)]):
            self._seeded.add(organization_id)
            return True
        return False

    def mark_seeded(self, organization_id: str, source: str | None) -> None:
        """Record that the organization's state was taken over (from `source`, its organization instance)."""
        doc = {"_id": organization_state_id(organization_id), "type": "organization",
               "organizationId": organization_id, "seededFrom": source}
        result = self._couch.bulk_write(self.db, [doc])[0]
        if not result.ok and not result.conflict:
            raise CouchError(f"state not written: {result.error}: {result.reason}", db=self.db, doc_id=doc["_id"])
        self._seeded.add(organization_id)
        logger.info("directory state of %s taken over from %s", organization_id, source or "nothing")
