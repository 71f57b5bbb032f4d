"""StateStore: the directory state in couchsync's own database, merged by compare-and-set.

One document per group and per person (ids from `couchsync.state`), all live. Whoever reads one
reads every leaf: a cluster accepts concurrent updates through different nodes, so a 409 is no
serialization guarantee. The leaves are joined (the join is commutative), and the join is written over
the winner while the other leaves are deleted, in the same `_bulk_docs`. A merge is that same loop
with the new contribution joined in: a 409 means read, join, write again. A join written over
several leaves is projected again whole, later (`Settling.state_joined`): each leaf's writer projected
only its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from couchsync.couch import CouchGateway
from couchsync.documents import Doc, losing_deletions
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
            docs: list[Doc] = []
            joined: dict[str, State] = {}
            conflicted: set[str] = set()
            for state_id, contribution in pending.items():
                current = leaves.get(state_id, [])
                known = join_states(state for state in map(state_from_doc, current) if state is not None)
                new = join_states(state for state in (known, contribution) if state is not None)
                if new is None:
                    continue
                if len(current) == 1 and new == known:
                    done[state_id] = Stored(new, current[0]["_rev"])
                    continue
                joined[state_id] = new
                doc: Doc = {"_id": state_id, **new.to_doc()}
                if len(current) > 1:
                    conflicted.add(state_id)
                if current:
                    doc["_rev"] = current[0]["_rev"]
                    doc["_conflicts"] = [leaf["_rev"] for leaf in current[1:]]
                docs += [{k: v for k, v in doc.items() if k != "_conflicts"}, *losing_deletions(doc)]
            results = self._couch.bulk_write(self.db, docs)
            self._settling.merged(sum(1 for doc, result in zip(docs, results) if doc.get("_deleted") and result.ok))
            retry: dict[str, State | None] = {}
            for doc, result in zip(docs, results):
                if doc.get("_deleted"):
                    continue  # a losing leaf someone else already deleted is as good
                if result.conflict:
                    retry[doc["_id"]] = pending[doc["_id"]]
                elif not result.ok or result.rev is None:
                    raise CouchError(f"state not written: {result.error}: {result.reason}", db=self.db,
                                     doc_id=doc["_id"])
                else:
                    done[doc["_id"]] = Stored(joined[doc["_id"]], result.rev)
                    if doc["_id"] in conflicted:
                        self._settling.state_joined(joined[doc["_id"]])
            self._settling.written(None, STATE, [doc["_id"] for doc, result in zip(docs, results)
                                                 if result.ok and not doc.get("_deleted")])
            if not retry:
                return done
            pending = retry
        raise DocumentConflict(f"directory state still conflicting after {self._max_attempts} attempts", db=self.db)

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
