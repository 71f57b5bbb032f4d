"""StateStore: the directory state in couchsync's own database, merged by compare-and-set.

One document per group and per person (ids from `couchsync.state`), all live. Whoever reads one
reads every leaf: a cluster accepts concurrent updates through different nodes, so a 409 is no
serialization guarantee. The leaves are joined (the join is commutative), the join is written over
the winner, and once it is written the other leaves are deleted. A merge is that same loop with the
new contribution joined in: a 409 means read, join, write again. A join written over several leaves
is projected again whole, later (`Settling.state_joined`): each leaf's writer projected only its own.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Generic, TypeVar

from couchsync.couch import CouchGateway, WriteResult
from couchsync.documents import CONFLICTS, Doc, losing_deletions
from couchsync.errors import (
    AccessDenied, CouchError, CouchsyncError, CouchUnavailable, DocumentConflict, GroupStateRefused, NotFound,
    StaleEvent)
from couchsync.events import GroupEvent
from couchsync.memory import MARKER_DATABASE, DatabaseIdentity, seed_reason
from couchsync.settle import STATE, Settling
from couchsync.state import (
    GROUP, PERSON, Admission, GroupState, PersonState, State, admit, group_state_id, id_range, join_states,
    organization_state_id, profiles, state_from_doc)

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=State)
# A state's new value from the stored one (None: none stored); None leaves it as it is.
Update = Callable[[State | None], State | None]
# Per-document errors that say the server is failing, not that the document is wrong: passing.
SERVER_ERRORS = frozenset({"unknown_error", "internal_server_error", "timeout", "service_unavailable"})
# `_bulk_docs` chunks of one merge sent at once (they hold different documents): a big event's thousands
# of person states were otherwise written one chunk after the other, CouchDB validating one at a time.
STATE_WRITES_IN_FLIGHT = 2
# Group states read at once: each holds every membership of its group, so a page of 1,000 of them could be
# as large as the whole directory; a smaller page bounds what is parsed at once.
GROUP_PAGE = 50


@dataclass(frozen=True, slots=True)
class Stored(Generic[S]):
    """A state as written: its revision is what a projection names as its basis."""

    state: S
    rev: str


@dataclass(frozen=True, slots=True)
class Merged:
    """What merging a batch of events did: the states as written, and the events that failed (by their
    position in the batch) with their error; the others are merged."""

    states: dict[str, Stored[State]]
    failed: dict[int, CouchsyncError]
    created: frozenset[str] = frozenset()  # the states no document held before: groups and people new to it


@dataclass(frozen=True, slots=True)
class Changes:
    """States changed since a checkpoint, their winning revision when read (None: deleted), and the sequence
    those changes reach: a later read asks from there."""

    revisions: dict[str, str | None]
    reach: str


@dataclass(frozen=True, slots=True)
class _Converged:
    done: dict[str, Stored[State]]
    refused: dict[str, WriteResult]  # documents refused for a reason of their own
    created: set[str] = field(default_factory=set)  # written where no document was


class StateStore:
    """Reads and merges states in one database (`couchsync/directory` by default); thread-safe."""

    def __init__(self, couch: CouchGateway, db: str, *, max_attempts: int = 5, page_size: int = 1000,
                 settling: Settling | None = None, create: Callable[[], None] | None = None) -> None:
        self._couch = couch
        self.db = db
        self._settling = settling or Settling(0)
        self._max_attempts = max_attempts
        self._page_size = page_size
        # How the database is made when a write finds it missing: with its protection (see `Synchronizer`).
        self._create = create or (lambda: couch.create_database(db))

    def merge(self, contributions: Iterable[State]) -> dict[str, Stored[State]]:
        """Join each contribution into its stored state (one `_bulk_docs` an attempt); the states as written.

        Raises:
            DocumentConflict: still conflicting after the last attempt.
            CouchError: the database refused a write for another reason.
        """
        return _written(self._merge(contributions))

    def _merge(self, contributions: Iterable[State]) -> _Converged:
        pending: dict[str, State] = {}
        for state in contributions:  # several events of a batch may touch one state: joined first
            known = pending.get(state.state_id)
            pending[state.state_id] = state if known is None else _join(known, state)
        return self._converge({state_id: functools.partial(_join, contribution=state)
                               for state_id, state in pending.items()})

    def read(self, state_ids: Sequence[str]) -> dict[str, Stored[State]]:
        """The stored states with these ids (absent: none), their conflicts joined and resolved."""
        return _written(self._converge(dict.fromkeys(state_ids, _same)))

    def merge_events(self, events: Sequence[GroupEvent], keep: timedelta) -> Merged:
        """Merge group events of one organization: each group's state admits its events (see
        `couchsync.state.admit`: removals older than `keep` before its newest stamp dropped, older events
        refused), then the profiles of the events admitted are merged. A group whose state CouchDB refuses
        (too large, or another error of that document) fails its own events only.

        Raises:
            DocumentConflict: still conflicting after the last attempt.
            AccessDenied: the sync identity may not write the state.
            CouchError: a person's state could not be written.
        """
        by_group: dict[str, list[int]] = {}
        for position, event in enumerate(events):
            by_group.setdefault(group_state_id(event.organization_id, event.group_id), []).append(position)
        admissions: dict[str, Admission] = {}

        def admitted(state_id: str, known: State | None) -> State:
            assert known is None or isinstance(known, GroupState)
            admission = admit(known, [events[i] for i in by_group[state_id]], keep)
            admissions[state_id] = admission
            return admission.state
        groups = self._converge({state_id: functools.partial(admitted, state_id) for state_id in by_group})
        failed = self._failures(events, by_group, admissions, groups.refused)
        people = self._merge(state for position, event in enumerate(events) if position not in failed
                             for state in profiles(event))
        return Merged({**groups.done, **_written(people)}, failed, frozenset(groups.created | people.created))

    def _failures(self, events: Sequence[GroupEvent], by_group: dict[str, list[int]],
                  admissions: dict[str, Admission], refused: dict[str, WriteResult]) -> dict[int, CouchsyncError]:
        """The events that failed on their own, by position: every event of a group whose state was
        refused, and the stale events of the others."""
        failed: dict[int, CouchsyncError] = {}
        for state_id, positions in by_group.items():
            admission = admissions[state_id]
            if state_id in refused:
                error = self._refusal(admission.state, refused[state_id])
                failed.update((position, error) for position in positions)
            else:
                failed.update((position, _stale(events[position], admission.state))
                              for position in positions if events[position] in admission.stale)
        return failed

    def _refusal(self, state: GroupState, result: WriteResult) -> GroupStateRefused:
        """The error of the events of a group whose state document CouchDB refused: the group, the
        document's size and the server's limit (read from its configuration, when the identity may)."""
        size = len(json.dumps(state.to_doc(), separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        limit = self._couch.max_document_size()
        shown = f"{limit} bytes" if limit is not None else "unknown (the server's configuration is not readable)"
        refusal = result.error if result.error == "document_too_large" else f"{result.error}: {result.reason}"
        return GroupStateRefused(
            f"group {state.external_id!r} of organization {state.organization_id!r}: its directory state "
            f"({size} bytes) was refused ({refusal}); the server's max_document_size is {shown}; this group's "
            f"events fail until its state is smaller or the limit larger", size=size, limit=limit)

    def _converge(self, pending: dict[str, Update]) -> _Converged:
        """Bring each state to its update of what is stored, by compare-and-set; a conflict reads again.

        Raises:
            DocumentConflict: still conflicting after the last attempt.
            AccessDenied, CouchUnavailable: the server refused the identity, or failed, for a document.
        """
        outcome = _Converged({}, {})
        for _ in range(self._max_attempts):
            leaves = self._couch.leaves(self.db, list(pending))
            joins: dict[str, tuple[State, list[Doc]]] = {}  # state id → the join, the leaves it replaces
            for state_id, update in pending.items():
                current = leaves.get(state_id, [])
                known = join_states(state for state in map(state_from_doc, current) if state is not None)
                new = update(known)
                if new is None:
                    continue
                if len(current) == 1 and new == known:
                    outcome.done[state_id] = Stored(new, current[0]["_rev"])
                else:
                    joins[state_id] = (new, current)
            conflicting = self._write(joins, outcome)
            if not conflicting:
                return outcome
            pending = {state_id: pending[state_id] for state_id in conflicting}
        raise DocumentConflict(f"directory state still conflicting after {self._max_attempts} attempts", db=self.db)

    def _write(self, joins: dict[str, tuple[State, list[Doc]]], outcome: _Converged) -> list[str]:
        """Write each join over its winning leaf (into `outcome`), then delete the other leaves of those
        written; the ids whose write conflicted. A document refused for a reason of its own goes to
        `outcome.refused`.

        Raises:
            AccessDenied, CouchUnavailable: the server refused the identity, or failed, for a document.
        """
        if not joins:
            return []
        docs = [{"_id": state_id, **new.to_doc(), **({"_rev": current[0]["_rev"]} if current else {})}
                for state_id, (new, current) in joins.items()]
        conflicting, written = [], []
        for doc, result in zip(docs, self._bulk_write(docs)):
            if result.conflict:
                conflicting.append(doc["_id"])
            elif not result.ok or result.rev is None:
                outcome.refused[doc["_id"]] = _checked(result, self.db)
            else:
                outcome.done[doc["_id"]] = Stored(joins[doc["_id"]][0], result.rev)
                written.append(doc["_id"])
                if not joins[doc["_id"]][1]:
                    outcome.created.add(doc["_id"])
        self._settling.written(None, STATE, written)
        # Only once the join that holds them is written: deleted beside a join that then conflicted, what a
        # losing leaf alone held (another worker's acknowledged event) would be lost.
        losers = [deletion for state_id in written for deletion in losing_deletions(
            {"_id": state_id, CONFLICTS: [leaf["_rev"] for leaf in joins[state_id][1][1:]]})]
        if losers:
            # A losing leaf someone deleted or extended meanwhile stays for the next reader to join.
            self._settling.merged(sum(1 for result in self._bulk_write(losers) if result.ok))
        for state_id in written:
            if len(joins[state_id][1]) > 1:
                self._settling.state_joined(joins[state_id][0])
        return conflicting

    def groups(self, organization_id: str) -> Iterator[Stored[GroupState]]:
        """Every group state of the organization, page by page."""
        for stored in self._all(organization_id, GROUP, GROUP_PAGE):
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

    def _all(self, organization_id: str, kind: str, page_size: int | None = None) -> Iterator[Stored[State]]:
        conflicted: list[str] = []
        start, end = id_range(organization_id, kind)
        for doc in self._couch.range(self.db, start, end, page_size=page_size or self._page_size):
            state = state_from_doc(doc)
            if state is None:
                continue
            if doc.get("_conflicts"):
                conflicted.append(doc["_id"])
            else:
                yield Stored(state, doc["_rev"])
        # Conflicted documents are few: joined and resolved once the range is read.
        yield from self.read(conflicted).values()

    def checkpoint(self) -> str | None:
        """Where the state database's changes stand now (None: no database yet): states read after it can be
        checked against the changes since (`moved`)."""
        return self._couch.update_seq(self.db)

    def changes(self, state_ids: Sequence[str], since: str | None) -> Changes | None:
        """The changes of these states since a checkpoint, read now, for a later `moved` to ask only for what
        came after (a big event's merge writes thousands of states: they are read while its projection
        writes, not after it). None without a checkpoint, or when they could not be read: `moved` then
        reads every change itself.
        """
        if since is None or not state_ids:
            return None
        try:
            return Changes(*self._couch.changed_since(self.db, since, state_ids))
        except CouchsyncError as exc:
            logger.debug("changes of the state read later, at once: %s", exc)
            return None

    def moved(self, basis: Sequence[tuple[str, str]], since: str | None = None, seen: Changes | None = None) -> bool:
        """Whether any of these states has another revision than the one a projection was made from.

        Winning revisions only: a conflict the cluster makes without changing the winner is joined at the
        next read of that state. `since`: a checkpoint taken before the basis was read. Then only the
        states changed since are compared, read from the changes feed (from where `seen`, the `changes` of
        these same states since that checkpoint, reached); else each state's revision is asked
        (`_all_docs`, which CouchDB opens key by key: half a second for a bootstrap page's thousand).
        """
        if not basis:
            return False
        ids = [state_id for state_id, _ in basis]
        if since is not None:
            try:
                changed, _ = self._couch.changed_since(self.db, seen.reach if seen else since, ids)
            except NotFound:
                return True  # the state database is gone: whatever was read of it is no basis any more
            changed = {**seen.revisions, **changed} if seen else changed
            return any(state_id in changed and changed[state_id] != rev for state_id, rev in basis)
        current = self._couch.revisions(self.db, ids)
        return any(current.get(state_id) != rev for state_id, rev in basis)

    def _bulk_write(self, docs: Sequence[Doc]) -> list[WriteResult]:
        """`_bulk_docs` to the state database, made first (with its protection) when it is missing."""
        try:
            return self._couch.bulk_write(self.db, docs, create_database=False, in_flight=STATE_WRITES_IN_FLIGHT)
        except NotFound:
            self._create()
            return self._couch.bulk_write(self.db, docs, create_database=False, in_flight=STATE_WRITES_IN_FLIGHT)

    def seed_check(self, organization_id: str) -> SeedCheck:
        """Whether the organization's state must be seeded again (see `couchsync.memory`): two reads."""
        info = self._couch.database_info(self.db)
        identity = DatabaseIdentity.of(info or {})
        marker_id = organization_state_id(organization_id)
        marker = self._couch.get_many(self.db, [marker_id]).get(marker_id) if info is not None else None
        return SeedCheck(seed_reason(marker, identity), identity, marker, exists=info is not None)

    def mark_seeded(self, organization_id: str, source: str | None, check: SeedCheck) -> None:
        """Record that the organization's state was seeded (from `source`), and the database's identity then.

        Another worker's marker written meanwhile is as good (a conflict is left as it is).
        """
        identity = check.identity
        if not check.exists:  # made since the check (by the seeding's writes, else here): its identity now
            info = self._couch.database_info(self.db)
            if info is None:
                self._create()
                info = self._couch.database_info(self.db)
            identity = DatabaseIdentity.of(info or {})
        doc: Doc = {"_id": organization_state_id(organization_id), "type": "organization",
                    "organizationId": organization_id, "seededFrom": source,
                    MARKER_DATABASE: identity.recorded()}
        if check.marker is not None:
            doc["_rev"] = check.marker["_rev"]
        result = self._bulk_write([doc])[0]
        if not result.ok and not result.conflict:
            raise CouchError(f"state not written: {result.error}: {result.reason}", db=self.db, doc_id=doc["_id"])
        logger.info("directory state of %s taken over from %s", organization_id, source or "nothing")


def _join(known: State | None, contribution: State) -> State:
    joined = join_states(state for state in (known, contribution) if state is not None)
    assert joined is not None
    return joined


def _same(known: State | None) -> State | None:
    return known


def _written(outcome: _Converged) -> dict[str, Stored[State]]:
    """The states written, when every one was.

    Raises:
        CouchError: a document was refused for a reason of its own.
    """
    if outcome.refused:
        state_id, result = next(iter(outcome.refused.items()))
        raise CouchError(f"state not written: {result.error}: {result.reason}", doc_id=state_id)
    return outcome.done


def _checked(result: WriteResult, db: str) -> WriteResult:
    """A refused document's result when the refusal is the document's own (its size, its content).

    Raises:
        AccessDenied: the sync identity was refused (every document would be).
        CouchUnavailable: the server failed for this document (passing).
    """
    if result.error in ("unauthorized", "forbidden"):
        raise AccessDenied(f"state not written: {result.error}: {result.reason}", db=db, doc_id=result.doc_id)
    if result.error in SERVER_ERRORS:
        raise CouchUnavailable(f"state not written: {result.error}: {result.reason}", db=db, doc_id=result.doc_id)
    return result


def _stale(event: GroupEvent, state: GroupState) -> StaleEvent:
    return StaleEvent(
        f"stale: group {event.group_id!r} of organization {event.organization_id!r} refuses events stamped "
        f"before {state.horizon} (its newest event's stamp less the state horizon), and this one is stamped "
        f"{event.stamp}: removals older than the horizon may be forgotten, so it cannot be ordered")


@dataclass(frozen=True, slots=True)
class SeedCheck:
    """What `StateStore.seed_check` found: why to seed (None: the state is whole), from what."""

    reason: str | None
    identity: DatabaseIdentity
    marker: Doc | None
    exists: bool = True  # whether the database existed
