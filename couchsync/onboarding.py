"""DirectoryCopy: copies the organization instance's managed groups and contacts into a member instance.

The reference is read page by page (Mango `_find`, bookmarks), and each page is planned by
`couchsync.mirror` against what the member instance holds and written in bulk, so memory stays flat
whatever the directory's size. A page is re-read and re-planned after a conflict. Running the copy
again writes nothing that is already there, which also makes it resumable: after a crash, run it again.

Groups are copied before contacts, so that every relationship a contact gets points to a group that
exists and whose memory decides it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Protocol, TypeVar

from couchsync.couch import CouchGateway
from couchsync.documents import (
    CONTACTS, GROUPS, MANAGED_GROUP_PREFIX, TAG, Doc, group_ids_of, is_managed, managed_contact_id)
from couchsync.instances import Instance, InstanceDirectory
from couchsync.mirror import (
    Person, group_state, people_keys, person_of, person_of_settings, plan_contact_copies, plan_group_copies)
from couchsync.plan import GroupState, InstanceView, Plan, Write
from couchsync.reader import InstanceReader
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

    def __init__(self, couch: CouchGateway, reader: InstanceReader, writer: PlanWriter, page_size: int) -> None:
        self._couch = couch
        self._reader = reader
        self._writer = writer
        self._page_size = page_size

    def copy(self, organization_id: str, source: Instance | None, target: Instance, members: Iterable[Person] = (),
             *, owner_email: str | None = None, dry_run: bool = False, keep_items: bool = False,
             progress: Progress | None = None) -> CopyReport:
        """Copy the source's managed documents into the target, then a contact for each of `members`.

        `source` is the organization instance (None: the members only); `owner_email` overrides the
        target's settings (a new instance may have none yet).

        Raises:
            CouchError: a page could not be read or written.
        """
        report = CopyReport(target.domain)
        owner = owner_email or self._reader.owner_email(target)
        members = list(members)
        if progress is not None:
            # An upper bound (unmanaged documents count too) that costs two requests, not a scan.
            counted = sum(self._couch.doc_count(source.database(doctype)) for doctype in (GROUPS, CONTACTS)) \
                if source else 0
            progress("total", counted + len(members))
        groups = self._pages(source.database(GROUPS), organization_id) if source else iter(())
        # Memories are read from the target alone once the groups are written there; a dry run wrote
        # none, so it joins the reference's in.
        memories = _JoinedMemories(self._couch, [source, target] if source else [target]) if dry_run \
            else _TargetMemories(self._couch, target)
        # Groups first, all of them written before any contact is planned: their memories decide the
        # contacts' relationships.
        for page in _read_ahead(groups):
            plan_page = partial(self._plan_groups, target, page)
            writes = self._run(target, plan_page, plan_page(False), dry_run, report, keep_items)
            memories.copied(page)
            report.groups += len(page)
            if progress is not None:
                progress("groups", len(page))
            logger.debug("copied %d groups into %s: %d writes", len(page), target.domain, writes)
        # How a page finds the contacts it may match. The first page's lookup brings the view up to date;
        # later pages read it as it is, sparing the indexing of each page just written (the contacts
        # couchsync creates are found by their ids instead). A new instance, with no contact when the
        # copy starts, has nothing to find: its pages are planned over nothing, and only a page that
        # meets a 409 (a person met twice, a worker's contact) is planned again over what its ids find.
        new = not self._couch.holds_documents(target.database(CONTACTS))
        for count, planner, plan in _planned_ahead(self._contact_steps(
                organization_id, source, members, target, owner, memories, new)):
            self._run(target, planner, plan, dry_run, report, keep_items)
            report.contacts += count
            if progress is not None:
                progress("contacts", count)
        return report

    def _run(self, target: Instance, planner: Planner, plan: Plan, dry_run: bool, report: CopyReport,
             keep_items: bool) -> int:
        if dry_run:
            report.add(plan.writes, [refusal.reason for refusal in plan.refusals], written=False,
                       keep_items=keep_items)
            return len(plan.writes)
        written = self._writer.converge(target, planner, first=plan)
        report.add(written.done, written.refusals, written=True, keep_items=keep_items)
        return written.writes

    def _pages(self, db: str, organization_id: str) -> Iterator[list[Doc]]:
        return _batches(self._couch.find(db, managed_selector(organization_id), page_size=self._page_size),
                        self._page_size)

    def _people(self, organization_id: str, source: Instance | None,
                members: Iterable[Person]) -> Iterator[list[Person]]:
        """The reference's contacts as people, page by page, then the members in pages of the same size."""
        if source is not None:
            for page in self._pages(source.database(CONTACTS), organization_id):
                yield [person for person in map(person_of, page) if person is not None]
        yield from _batches(members, self._page_size)

    def _plan_groups(self, target: Instance, page: Sequence[Doc], recover: bool) -> Plan:
        db = target.database(GROUPS)
        targets = self._couch.get_many(db, [doc["_id"] for doc in page])
        superseded = {doc_id: self._couch.ancestors(db, doc_id, doc["_rev"])
                      for doc_id, doc in targets.items()} if recover else None
        return plan_group_copies(page, targets, superseded)

    def _contact_steps(self, organization_id: str, source: Instance | None, members: Iterable[Person],
                       target: Instance, owner: str | None, memories: _Memories,
                       new: bool) -> Iterator[tuple[int, Planner, Callable[[], Plan]]]:
        """(size, planner, first plan) of each page of people."""
        for number, people in enumerate(_read_ahead(self._people(organization_id, source, members))):
            plan = partial(self._plan_people, organization_id, memories, target, owner, people)
            lookup = _IDS if new else _STALE if number else _FRESH
            yield len(people), partial(plan, lookup), partial(plan, _NONE if new else lookup, False)

    def _plan_people(self, organization_id: str, memories: _Memories, target: Instance, owner: str | None,
                     people: Sequence[Person], lookup: str, recover: bool) -> Plan:
        found = {} if lookup in (_IDS, _NONE) else {
            doc["_id"]: doc for doc in self._reader.contacts(target, people_keys(people), stale=lookup == _STALE)}
        if lookup in (_STALE, _IDS):
            derived = [managed_contact_id(organization_id, person.member.email) for person in people]
            found.update(self._couch.get_many(target.database(CONTACTS), derived))
        contacts = list(found.values())
        view = InstanceView(target.domain, owner, contacts=tuple(contacts))
        relevant = {gid for person in people for gid in person.groups or ()}
        relevant |= {gid for doc in contacts for gid in group_ids_of(doc) if gid.startswith(MANAGED_GROUP_PREFIX)}
        return plan_contact_copies(people, organization_id, view, memories.of(sorted(relevant)))


class _Memories(Protocol):
    """The group memories the contacts' relationships follow (see `mirror.related`)."""

    def copied(self, reference: Sequence[Doc]) -> None:
        """The groups' pass is done with these reference groups."""

    def of(self, group_ids: Sequence[str]) -> dict[str, GroupState]:
        """The memories that decide these groups' relationships; a group left out follows the reference's."""


class _JoinedMemories:
    """For a dry run, which wrote no group: each page reads the memories and joins them (the first
    instance winning ties), as the groups' pass would have."""

    def __init__(self, couch: CouchGateway, instances: Sequence[Instance]) -> None:
        self._couch = couch
        self._instances = instances

    def copied(self, reference: Sequence[Doc]) -> None:
        pass

    def of(self, group_ids: Sequence[str]) -> dict[str, GroupState]:
        memories: dict[str, GroupState] = {}
        for instance in self._instances:
            for doc_id, doc in self._couch.get_many(instance.database(GROUPS), group_ids).items():
                if is_managed(doc):
                    state = group_state(doc)
                    memories[doc_id] = memories[doc_id].joined(state) if doc_id in memories else state
        return memories


class _TargetMemories:
    """The target's memories, read only where they can differ from the reference contacts' relationships.

    A group whose memory in the target is the reference's, once copied, needs none: the reference
    contacts' relationships already project it. Only the groups whose memory differs (the target held
    newer events) and those written since (a worker), told by their revisions in one light `_all_docs`
    per page, are read and kept: memory grows with the groups that differ, not with the directory.
    """

    def __init__(self, couch: CouchGateway, target: Instance) -> None:
        self._couch = couch
        self._db = target.database(GROUPS)
        self._revs: dict[str, str] = {}
        self._states: dict[str, GroupState] = {}
        self._lock = threading.Lock()  # the plan-ahead thread and re-plans on the caller's

    def copied(self, reference: Sequence[Doc]) -> None:
        current = self._couch.get_many(self._db, [doc["_id"] for doc in reference])
        with self._lock:
            for doc in reference:
                copy = current.get(doc["_id"])
                if copy is None:
                    continue
                self._revs[doc["_id"]] = copy["_rev"]
                if not is_managed(copy) or group_state(copy) != group_state(doc):
                    self._states[doc["_id"]] = group_state(copy)

    def of(self, group_ids: Sequence[str]) -> dict[str, GroupState]:
        revs = self._couch.revisions(self._db, group_ids)
        with self._lock:
            changed = [gid for gid in group_ids if revs.get(gid) != self._revs.get(gid)]
        docs = self._couch.get_many(self._db, changed)
        with self._lock:
            for gid, doc in docs.items():
                self._revs[gid] = doc["_rev"]
                if is_managed(doc):
                    self._states[gid] = group_state(doc)
            return {gid: self._states[gid] for gid in group_ids if gid in self._states}


def members_as_people(directory: InstanceDirectory, members: Sequence[Instance], pool: Executor) -> list[Person]:
    """The owners of these member instances, from their settings, read at once (one request each: they
    are the organization's size, not the directory's); those whose settings name no email left out."""
    people = pool.map(lambda instance: person_of_settings(instance.domain, directory.settings(instance)), members)
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
