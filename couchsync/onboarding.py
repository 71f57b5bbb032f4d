"""DirectoryCopy: projects an organization's directory state into one instance, page by page.

The state is read page by page (`_all_docs` ranges of the state database), and each page is planned
by `couchsync.mirror` against what the instance holds and written in bulk, so memory stays flat
whatever the directory's size (the group states, a few hundred, are held whole: every contact's
relationships follow them). A page is re-read and re-planned after a conflict, or when the states it
was projected from moved. Running the copy again writes nothing that is already there, which also
makes it resumable: after a crash, run it again.

Groups are copied before contacts, so that every relationship a contact gets points to a group that exists.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from typing import TypeVar

from couchsync.couch import CouchGateway
from couchsync.documents import CONTACTS, GROUPS, TAG, Doc, managed_contact_id
from couchsync.instances import Instance, InstanceDirectory
from couchsync.mirror import Person, people_keys, person_of_settings, plan_contact_copies, plan_group_copies
from couchsync.plan import InstanceView, Plan, Write, named_by
from couchsync.reader import InstanceReader
from couchsync.state import GroupState, PersonState
from couchsync.state_store import StateStore, Stored
from couchsync.writer import Planner, PlanWriter

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How a page of people finds the contacts it may match (see DirectoryCopy.copy).
_FRESH, _STALE, _IDS, _NONE = "fresh", "stale", "ids", "none"

# (what, how many): ("total", an estimate of the documents to compare) once at the start, then
# ("groups" or "contacts", how many more were compared) after each page.
Progress = Callable[[str, int], None]


def managed_selector(organization_id: str) -> Doc:
    """The Mango selector of an organization's managed documents."""
    return {f"{TAG}.managed": True, f"{TAG}.organizationId": organization_id}


@dataclass
class CopyReport:
    """What a copy did (or, in a dry run, would do) in one instance."""

    domain: str
    groups: int = 0     # reference groups compared
    contacts: int = 0   # people compared (reference contacts and members)
    written: int = 0
    refusals: list[str] = field(default_factory=list)
    drift: Counter[str] = field(default_factory=Counter)  # what was (or would be) written, by label
    items: list[tuple[str, str]] = field(default_factory=list)  # (label, document id), when kept

    @property
    def unchanged(self) -> int:
        """Reference documents that needed no write."""
        return max(self.groups + self.contacts - sum(self.drift.values()), 0)

    def add(self, writes: Sequence[Write], refusals: Iterable[str], *, written: bool, keep_items: bool) -> None:
        """Count a page's writes: made when `written`, planned only in a dry run."""
        self.written += len(writes) if written else 0
        # A person may come twice (a reference contact and a member's settings): one refusal is enough.
        self.refusals += [reason for reason in dict.fromkeys(refusals) if reason not in self.refusals]
        for write in writes:
            self.drift[write.summary.split(":", 1)[0]] += 1
            if keep_items:
                self.items.append((write.summary, write.doc["_id"]))


class DirectoryCopy:
    """Copies through a CouchGateway; pages of `page_size` documents."""

    def __init__(self, couch: CouchGateway, states: StateStore, reader: InstanceReader, writer: PlanWriter,
                 page_size: int) -> None:
        self._couch = couch
        self._states = states
        self._reader = reader
        self._writer = writer
        self._page_size = page_size

    def copy(self, organization_id: str, target: Instance, members: Iterable[Person] = (), *,
             owner_email: str | None = None, dry_run: bool = False, keep_items: bool = False,
             progress: Progress | None = None) -> CopyReport:
        """Project the organization's state into the target, then a contact for each of `members`.

        `owner_email` overrides the target's settings (a new instance may have none yet).

        Raises:
            CouchError: a page could not be read or written.
        """
        report = CopyReport(target.domain)
        owner = owner_email or self._reader.owner_email(target)
        members = list(members)
        # Before any state is read: each page's check for states moved under its writes reads only the
        # changes since (see `StateStore.moved`).
        since = self._states.checkpoint()
        groups = _Groups(self._states, organization_id)
        if progress is not None:
            progress("total", len(groups.stored) + self._states.count_people(organization_id) + len(members))
        # How a page finds the contacts it may match. The first page's lookup brings the view up to date;
        # later pages read it as it is, sparing the indexing of each page just written (the contacts
        # couchsync creates are found by their ids instead). A new instance, with no contact when the
        # copy starts, has nothing to find: its pages are planned over nothing, and only a page that
        # meets a 409 (a person met twice, a worker's contact) is planned again over what its ids find.
        new = not self._couch.holds_documents(target.database(CONTACTS))
        # The groups are written first, so that every relationship a contact gets points to a group that
        # exists; meanwhile the first page of people is read and planned.
        with ThreadPoolExecutor(1, thread_name_prefix="couchsync-groups") as pool:
            groups_copied = pool.submit(self._copy_groups, organization_id, target, groups, since, dry_run, report,
                                        keep_items, progress)
            steps = self._contact_steps(organization_id, members, target, owner, groups, new, since)
            for count, planner, plan in _planned_ahead(steps):
                groups_copied.result()
                self._run(target, planner, plan, dry_run, report, keep_items)
                report.contacts += count
                if progress is not None:
                    progress("contacts", count)
            groups_copied.result()  # no people at all
        return report

    def _copy_groups(self, organization_id: str, target: Instance, groups: _Groups, since: str | None,
                     dry_run: bool, report: CopyReport, keep_items: bool, progress: Progress | None) -> None:
        for page in _batches(groups.listed(), self._page_size):
            plan_page = partial(self._plan_groups, organization_id, target, [s.state.state_id for s in page], groups,
                                since)
            self._run(target, plan_page, plan_page(1), dry_run, report, keep_items)
            report.groups += len(page)
            if progress is not None:
                progress("groups", len(page))

    def _run(self, target: Instance, planner: Planner, plan: Plan, dry_run: bool, report: CopyReport,
             keep_items: bool) -> int:
        if dry_run:
            report.add(plan.writes, [refusal.reason for refusal in plan.refusals], written=False,
                       keep_items=keep_items)
            return len(plan.writes)
        written = self._writer.converge(target, planner, first=plan)
        report.add(written.done, written.refusals, written=True, keep_items=keep_items)
        return written.writes

    def _plan_groups(self, organization_id: str, target: Instance, state_ids: Sequence[str], groups: _Groups,
                     since: str | None, attempt: int) -> Plan:
        page = [groups.stored[state_id] for state_id in state_ids] if attempt == 1 else groups.reread(state_ids)
        current = self._reader.documents(target, GROUPS, [stored.state.group_id for stored in page], organization_id)
        plan = plan_group_copies([stored.state for stored in page], current)
        return replace(plan, basis=tuple((stored.state.state_id, stored.rev) for stored in page), since=since)

    def _people(self, organization_id: str, members: Sequence[Person]) -> Iterator[list[_Entry]]:
        """The state's people page by page (with their revisions), then the members (from their settings)."""
        for page in self._states.people(organization_id):
            yield [(Person(stored.state), stored.rev) for stored in page]
        for batch in _batches(members, self._page_size):
            yield [(person, None) for person in batch]

    def _contact_steps(self, organization_id: str, members: Sequence[Person], target: Instance, owner: str | None,
                       groups: _Groups, new: bool,
                       since: str | None) -> Iterator[tuple[int, Planner, Callable[[], Plan]]]:
        """(size, planner, first plan) of each page of people."""
        for number, page in enumerate(_read_ahead(self._people(organization_id, members))):
            plan = partial(self._plan_people, organization_id, groups, target, owner, page, since)
            lookup = _IDS if new else _STALE if number else _FRESH
            yield len(page), partial(plan, lookup), partial(plan, _NONE if new else lookup, 1)

    def _plan_people(self, organization_id: str, groups: _Groups, target: Instance, owner: str | None,
                     page: Sequence[_Entry], since: str | None, lookup: str, attempt: int) -> Plan:
        if attempt > 1:  # a conflict, or the states moved: read them again
            groups.refresh()
            page = self._reread(page)
        people = [person for person, _ in page]
        found = {} if lookup in (_IDS, _NONE) else {
            doc["_id"]: doc for doc in self._reader.contacts(target, people_keys(people), organization_id,
                                                             stale=lookup == _STALE)}
        if lookup != _NONE:  # the view does not find a squat with no email: read every derived id
            derived = [managed_contact_id(organization_id, person.state.email) for person in people]
            found.update(self._reader.documents(target, CONTACTS, derived, organization_id))
        view = InstanceView(target.domain, owner, contacts=tuple(found.values()))
        plan = plan_contact_copies(people, view, *groups.states())
        basis = [(person.state.state_id, rev) for person, rev in page if rev is not None] + groups.basis()
        return replace(plan, basis=tuple(basis), since=since)

    def _reread(self, page: Sequence[_Entry]) -> list[_Entry]:
        fresh = self._states.read([person.state.state_id for person, rev in page if rev is not None])
        entries: list[_Entry] = []
        for person, rev in page:
            stored = fresh.get(person.state.state_id) if rev is not None else None
            if stored is not None and isinstance(stored.state, PersonState):
                entries.append((Person(stored.state), stored.rev))
            else:
                entries.append((person, rev))
        return entries


# A person to copy, with the revision of their state (None: known from their settings only).
_Entry = tuple[Person, str | None]


class _Groups:
    """The organization's group states, held whole (a few hundred), refreshed when a page finds them moved."""

    def __init__(self, states: StateStore, organization_id: str) -> None:
        self._states = states
        self._organization_id = organization_id
        self._lock = threading.Lock()  # the plan-ahead thread and re-plans on the caller's
        self.stored: dict[str, Stored[GroupState]] = {}
        # Built once for every page until the states change: one entry per person of the organization.
        self._named: dict[str, tuple[str, ...]] | None = None
        self.refresh()

    def refresh(self) -> None:
        stored = {s.state.state_id: s for s in self._states.groups(self._organization_id)}
        with self._lock:
            self.stored, self._named = stored, None

    def reread(self, state_ids: Sequence[str]) -> list[Stored[GroupState]]:
        fresh = self._states.read(state_ids)
        with self._lock:
            for state_id, stored in fresh.items():
                if isinstance(stored.state, GroupState):
                    self.stored[state_id] = Stored(stored.state, stored.rev)
                    self._named = None
            return [self.stored[state_id] for state_id in state_ids if state_id in self.stored]

    def listed(self) -> list[Stored[GroupState]]:
        """The group states as they are now (a copy: re-plans on other threads refresh them)."""
        with self._lock:
            return list(self.stored.values())

    def states(self) -> tuple[dict[str, GroupState], dict[str, tuple[str, ...]]]:
        """The group states by managed id, and who each names (`named_by`), of the same moment."""
        with self._lock:
            states = {stored.state.group_id: stored.state for stored in self.stored.values()}
            if self._named is None:
                self._named = named_by(states)
            return states, self._named

    def basis(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(state_id, stored.rev) for state_id, stored in self.stored.items()]


def members_as_people(directory: InstanceDirectory, members: Sequence[Instance], pool: Executor) -> list[Person]:
    """The owners of these member instances, from their settings, read at once (one request each: they
    are the organization's size, not the directory's); those whose settings name no email left out."""
    people = pool.map(lambda instance: person_of_settings(instance.org_id or "", instance.domain,
                                                          directory.settings(instance)), members)
    return [person for person in people if person is not None]


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last one shorter), read lazily."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _read_ahead(pages: Iterator[T]) -> Iterator[T]:
    """The pages, the next one read while the caller writes the current one (two in memory at most)."""
    with ThreadPoolExecutor(1, thread_name_prefix="couchsync-read-ahead") as pool:
        future = pool.submit(next, pages, None)
        while (page := future.result()) is not None:
            future = pool.submit(next, pages, None)
            yield page


def _planned_ahead(steps: Iterator[tuple[int, Planner, Callable[[], Plan]]]) -> Iterator[tuple[int, Planner, Plan]]:
    """Each (size, planner, first plan) step with its first plan made while the caller writes the one before.

    Safe because writing is optimistic: a plan made before the previous page was written and
    touching the same document (one person in two pages) meets a 409 and is made again by the planner.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="couchsync-plan-ahead") as pool:
        ahead: tuple[int, Planner, Future[Plan]] | None = None
        for count, planner, first in steps:
            future = pool.submit(first)
            if ahead is not None:
                yield ahead[0], ahead[1], ahead[2].result()
            ahead = (count, planner, future)
        if ahead is not None:
            yield ahead[0], ahead[1], ahead[2].result()
