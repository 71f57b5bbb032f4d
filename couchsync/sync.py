"""The use cases of events: merge an event into the directory state, then project it everywhere.

An event is merged into the organization's state (`couchsync.state_store`) with one compare-and-set
write, then projected into every instance of the organization concurrently (bounded by
`SyncSettings.concurrency`), each on its own: a failure in one is reported with the instance and does
not stop the others. A 409, or a state that moved under a projection's writes, makes the instance be
read and projected again. What a CouchDB cluster let concurrent writers leave conflicted is read again
later and repaired by the same projections (`settle`, `repair`; see `couchsync.settle`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from couchsync.config import SyncSettings
from couchsync.couch import CouchGateway
from couchsync.design_docs import DesignDocs, Target, create_protected, ensure
from couchsync.documents import CONTACTS, GROUPS, ContactLookup, Doc
from couchsync.errors import (
    CouchError, CouchsyncError, InstancesFailed, InstancesUnavailable, UnknownInstance, UnknownOrganization)
from couchsync.events import Event, GroupEvent, UserCreated, parse_event
from couchsync.instances import Instance, InstanceDirectory
from couchsync.onboarding import CopyReport, DirectoryCopy, Progress, managed_selector, members_as_people
from couchsync.memory import MISSING, PURGED, RECREATED
from couchsync.plan import GroupChange, InstanceView, Plan, group_changes, plan_group_changes, plan_profile
from couchsync.reader import InstanceReader
from couchsync.state import GroupState, PersonState, State, group_state_id, person_state_id, seed
from couchsync.settle import Repair, Settling, joined_repairs, repairs_of, unsettled
from couchsync.state_store import SeedCheck, StateStore, Stored
from couchsync.writer import Planner, PlanWriter

logger = logging.getLogger(__name__)

MAX_LOGGED_REFUSALS = 20  # refusals of one event logged one by one (all are counted)
MAX_LOGGED_TEXT = 300  # characters of a domain or reason in a log line
W_SEEDED = {MISSING: "has no marker (new, or its database was deleted)",
            RECREATED: "is in another database than the one it was seeded in",
            PURGED: "lost documents to a purge since it was seeded"}


@dataclass(frozen=True, slots=True)
class InstanceReport:
    """What one event did in one instance."""

    domain: str
    writes: int = 0
    refusals: tuple[str, ...] = ()
    error: str | None = None
    retryable: bool = False
    attempts: int = 1
    requests: int = 0  # `_bulk_docs` requests to the instance's databases


@dataclass(frozen=True, slots=True)
class EventReport:
    """What one event did in every instance of its organization."""

    routing_key: str
    organization_id: str
    subject: str
    instances: tuple[InstanceReport, ...]
    seconds: float
    # Events of a batch that failed on their own (their position, the error), e.g. a group whose state
    # CouchDB refused, or a stale event: the others were applied.
    condemned: tuple[tuple[int, CouchsyncError], ...] = ()

    @property
    def writes(self) -> int:
        return sum(report.writes for report in self.instances)

    @property
    def refusals(self) -> list[tuple[str, str]]:
        return [(report.domain, reason) for report in self.instances for reason in report.refusals]

    @property
    def failures(self) -> list[InstanceReport]:
        return [report for report in self.instances if report.error is not None]

    @property
    def retryable(self) -> bool:
        """Whether trying the event again may help: some instance failed, and only for passing reasons."""
        return bool(self.failures) and all(report.retryable for report in self.failures)

    def raise_for_failures(self) -> None:
        """Raise when some instance failed: InstancesUnavailable when trying again may help.

        Raises:
            InstancesFailed: the instances and their errors (the first three).
        """
        failures = self.failures
        if not failures:
            return
        named = "; ".join(f"{report.domain}: {report.error}" for report in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        error = InstancesUnavailable if self.retryable else InstancesFailed
        raise error(f"failed in {len(failures)} of {len(self.instances)} instances: {named}{more}")

    def fields(self) -> dict[str, object]:
        """The event's log fields (no document content, no secret; the consumer adds the duration)."""
        return {"routing_key": self.routing_key, "organization": self.organization_id, "subject": self.subject,
                "instances": len(self.instances), "writes": self.writes,
                "bulk_writes": sum(report.requests for report in self.instances),
                "unchanged": sum(1 for r in self.instances if r.writes == 0 and r.error is None),
                "refusals": len(self.refusals), "failed": len(self.failures)}


class Synchronizer:
    """Applies events through a CouchGateway; call `close()` (or use `with`) when done."""

    def __init__(self, couch: CouchGateway, directory: InstanceDirectory, design: DesignDocs,
                 settings: SyncSettings, protection: Doc | None = None, settling: Settling | None = None, *,
                 state_target: Target | None = None, on_seeded: Callable[[str], None] | None = None) -> None:
        self._couch = couch
        self.settling = settling or Settling(0)
        self._protection = protection  # installed in an instance before a bootstrap copies into it
        self.directory = self._directory = directory
        self._design = design
        self._settings = settings
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="couchsync-instance")
        self._seeding = threading.Lock()
        self._on_seeded = on_seeded or (lambda reason: None)
        # The state database is only ever made with its protection: made bare, any admin could write it.
        create = functools.partial(create_protected, couch, state_target) if state_target else None
        self.states = StateStore(couch, settings.state_db, max_attempts=settings.max_attempts,
                                 page_size=settings.page_size, settling=self.settling, create=create)
        self.reader = InstanceReader(couch, directory, design)
        self.writer = PlanWriter(couch, self.states, settings.max_attempts, self.settling)
        self.copier = DirectoryCopy(couch, self.states, self.reader, self.writer, settings.page_size)

    def __enter__(self) -> Synchronizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the instance threads."""
        self._pool.shutdown(wait=True)

    def apply(self, event: Event) -> EventReport:
        """Apply an event to every instance of its organization.

        Raises:
            UnknownOrganization: the organization has no usable instance.
            UnknownInstance: a user.created names an instance the organization does not (yet) have.
            CouchError: the global database or the directory state could not be read or written.
        """
        if isinstance(event, GroupEvent):
            report = self.apply_batch([event])
            for _, error in report.condemned:
                raise error
            return report
        started = time.monotonic()
        organization_id = self._organization_of(event)
        reports = self._onboard(event, organization_id)
        return self._report(event.routing_key, organization_id, event.domain, reports, started)

    def apply_batch(self, events: Sequence[GroupEvent]) -> EventReport:
        """Apply group events of one organization together: merged into the state at once, then projected
        once per instance (one `_bulk_docs` per database for the whole batch). The result is the one of
        applying them one by one, in any order (the merge is commutative and the projection idempotent).
        An event that fails on its own (its group's state refused by CouchDB, a stale event) is in the
        report's `condemned`, not merged nor projected; the others are applied.

        Raises:
            ValueError: the events are of several organizations, or none.
            UnknownOrganization: the organization has no usable instance.
            CouchError: the global database or the directory state could not be read or written.
        """
        organizations = {event.organization_id for event in events}
        if len(organizations) != 1:
            raise ValueError(f"a batch is of one organization, not {len(organizations)}")
        started = time.monotonic()
        organization_id = events[0].organization_id
        instances = self.instances_of(organization_id)
        since = self.states.checkpoint()  # before the merge reads the states the projection starts from
        merged = self.states.merge_events(events, self._settings.state_horizon)
        failed = merged.failed
        applied = [event for position, event in enumerate(events) if position not in failed]
        reports: tuple[InstanceReport, ...] = ()
        if applied:
            projection = _GroupProjection(self, organization_id, [event.group_id for event in applied],
                                          lambda states: group_changes(applied, states), merged.states, since,
                                          merged.created)
            basis = projection.basis
            # The changes up to now (the merge's own writes: thousands for a big event) are read while the
            # instances are written; the check after them then reads only what came later.
            seen = self._pool.submit(self.states.changes, [state_id for state_id, _ in basis], projection.since)
            reports = tuple(self._pool.map(lambda instance: self._converge(
                instance, projection.planner(instance), basis_checked_after=True), instances))
            # Whether the states moved under the writes (another writer merged meanwhile) is asked once for
            # the batch, not once per instance: when they did, every instance is projected again afresh.
            if self.states.moved(basis, projection.since, seen.result()):
                projection.refresh()
                again = self._pool.map(lambda instance: self._converge(instance, projection.planner(instance)),
                                       instances)
                reports = tuple(map(_followed_by, reports, again))
        routing_key = events[0].routing_key if len(events) == 1 else f"batch of {len(events)}"
        subject = ",".join(dict.fromkeys(event.group_id for event in events))
        report = self._report(routing_key, organization_id, subject, reports, started)
        return replace(report, condemned=tuple(sorted(failed.items(), key=lambda item: item[0])))

    @staticmethod
    def _report(routing_key: str, organization_id: str, subject: str, reports: tuple[InstanceReport, ...],
                started: float) -> EventReport:
        report = EventReport(routing_key, organization_id, subject, reports, time.monotonic() - started)
        logger.debug("%s %s/%s: %d instances, %d writes, %d refusals, %d failed in %.3fs",
                     routing_key, organization_id, subject[:MAX_LOGGED_TEXT], len(reports),
                     report.writes, len(report.refusals), len(report.failures), report.seconds)
        return report

    def bootstrap(self, domain: str, *, owner_email: str | None = None, dry_run: bool = False,
                  progress: Progress | None = None) -> CopyReport:
        """Give an instance its organization's directory, as the state holds it, and a managed contact for
        each member of the organization.

        Raises:
            UnknownInstance: no usable instance has the domain, or it belongs to no organization.
            CouchError: a page could not be read or written.
        """
        instance = self._directory.instance(domain)
        if instance is None or not instance.org_id:
            raise UnknownInstance(f"no usable instance of an organization has the domain {domain!r}")
        return self._bootstrap(instance, self.instances_of(instance.org_id), owner_email=owner_email,
                               dry_run=dry_run, progress=progress)

    def instances_of(self, organization_id: str) -> list[Instance]:
        """The organization's instances, its state taken over first if it never was (see `take_over`).

        Raises:
            UnknownOrganization: it has none.
        """
        instances = self._directory.instances_of(organization_id)
        if not instances:
            raise UnknownOrganization(f"organization {organization_id!r} has no instance")
        # Checked each time, not remembered: the state may be lost under a running worker (`couchsync.memory`).
        if self.states.seed_check(organization_id).reason is not None:
            # Events of one organization arrive together: one of them seeds, the others wait for it (seeding
            # twice would change nothing, but would read the organization instance once per event).
            with self._seeding:
                check = self.states.seed_check(organization_id)
                if check.reason is not None:
                    self.take_over(organization_id, instances, check)
        return instances

    def take_over(self, organization_id: str, instances: Sequence[Instance], check: SeedCheck) -> None:
        """Seed the organization's state from its organization instance's managed documents.

        A directory the stack's own consumer (or an earlier couchsync) wrote has no state of couchsync's,
        and a lost state is no directory: either is taken at the lowest stamp, so that every event applies
        on top and whatever the state still holds wins. Seeding twice changes nothing.
        """
        source = next((instance for instance in instances if instance.is_organization_instance), None)
        if source is not None:
            selector = managed_selector(organization_id)
            groups = self._couch.find(source.database(GROUPS), selector, page_size=self._settings.page_size)
            contacts = self._couch.find(source.database(CONTACTS), selector, page_size=self._settings.page_size)
            group_states, people = seed(organization_id, groups, contacts)
            # A person the state still has keeps their profile as it is: a seeded `name` (the contact's
            # full name) would otherwise shadow a first and last name that no event ever sent as one.
            size = self._settings.page_size
            known = {state_id for start in range(0, len(people), size)
                     for state_id in self.states.read([person.state_id for person in people[start:start + size]])}
            people = [person for person in people if person.state_id not in known]
            states: list[GroupState | PersonState] = [*group_states, *people]
            for start in range(0, len(states), self._settings.page_size):
                self.states.merge(states[start:start + self._settings.page_size])
        self.states.mark_seeded(organization_id, source.domain if source else None, check)
        logger.warning("directory state of %s %s: seeded again from %s (deletions older than the loss are "
                       "forgotten)", organization_id, W_SEEDED[check.reason or MISSING],
                       source.domain if source else "nothing")
        self._on_seeded(check.reason or MISSING)

    def _organization_of(self, event: UserCreated) -> str:
        """The organization of a new user: named by the event, else found by the organization's domain."""
        if event.organization_id:
            return event.organization_id
        organization_id = self._directory.organization_of_domain(event.organization_domain or "")
        if organization_id is None:
            raise UnknownOrganization(f"no organization has the domain {event.organization_domain!r}")
        return organization_id

    def _onboard(self, event: UserCreated, organization_id: str) -> tuple[InstanceReport, ...]:
        """user.created: the new user's contact everywhere else, and the directory in the new instance."""
        instances = self.instances_of(organization_id)
        new = next((instance for instance in instances if instance.domain == event.domain), None)
        if new is None:
            raise UnknownInstance(f"organization {organization_id!r} has no usable instance {event.domain!r} (yet)")
        person = PersonState.of(organization_id, event.member, event.stamp)
        self.states.merge([person])
        others = [instance for instance in instances if instance is not new]
        fanned = self._pool.map(lambda instance: self._converge(
            instance, lambda _: self._plan_person(instance, person.state_id)), others)
        try:
            # The settings of a new instance may not name its owner yet; the event does.
            copied = self._bootstrap(new, instances, owner_email=event.email)
            mine = InstanceReport(new.domain, copied.written, tuple(copied.refusals))
        except CouchsyncError as exc:
            logger.warning("bootstrap of %s failed: %s", new.domain, exc)
            mine = InstanceReport(new.domain, error=str(exc), retryable=exc.retryable)
        return (*fanned, mine)

    def _plan_person_at(self, instance: Instance, state_id: str, attempt: int) -> Plan:
        """`_plan_person` as a Planner: every attempt reads afresh."""
        return self._plan_person(instance, state_id)

    def _plan_person(self, instance: Instance, state_id: str) -> Plan:
        """A person's contact in one instance, their memberships as the organization's groups say."""
        stored = self.states.read([state_id]).get(state_id)
        if stored is None or not isinstance(stored.state, PersonState):
            return Plan()  # nobody the state knows (a repair of a contact seeded from settings)
        person = stored.state
        groups = list(self.states.groups(person.organization_id))
        lookup = ContactLookup(person.organization_id, ((person.email, person.member.workplace_fqdn),))
        view = InstanceView(instance.domain, self.reader.owner_email(instance),
                            contacts=tuple(self.reader.find(instance, lookup)))
        plan = plan_profile(person, {group.state.group_id: group.state for group in groups}, view)
        basis = [(state_id, stored.rev)] + [(group.state.state_id, group.rev) for group in groups]
        return replace(plan, basis=tuple(basis))

    def _bootstrap(self, target: Instance, instances: Sequence[Instance], *, owner_email: str | None,
                   dry_run: bool = False, progress: Progress | None = None) -> CopyReport:
        if self._protection is not None and not dry_run:
            self._protect(target)
        members = [instance for instance in instances
                   if not instance.is_organization_instance and instance.domain != target.domain]
        people = members_as_people(self._directory, members, self._pool)
        return self.copier.copy(target.org_id, target, people, owner_email=owner_email, dry_run=dry_run,
                                progress=progress)

    def _protect(self, instance: Instance) -> None:
        """Install the protection and the lookup view in a new instance before its directory is copied: a
        database the stack has just created must not take forged managed documents meanwhile.

        Raises:
            CouchError: a database could not be created or given its design documents.
        """
        assert self._protection is not None
        for target in self._design.instance_targets(instance.prefix, self._protection):
            self._couch.create_database(target.db)  # one that exists is fine
            for name, body in target.ddocs:
                ensure(self._couch, target.db, name, body)

    def settle(self, *, everything: bool = False) -> int:
        """Read again what was written `settling.delay` seconds ago (`everything`: all that waits), and
        repair what a cluster left conflicted (see `couchsync.settle`); the conflicted documents found.

        A place that cannot be read is read again at the next call; a repair that fails for a passing
        reason is made again `delay` seconds later.
        """
        with self.settling.checking():
            return self._settle(everything)

    def _settle(self, everything: bool) -> int:
        repairs = self.settling.repairs(everything=everything)
        found = 0
        # One place after the other, on the caller's thread: after a burst the checks trail it by a few
        # seconds rather than compete with the events for CouchDB.
        for (instance, doctype), written in self.settling.due(everything=everything).items():
            db = self.states.db if instance is None else instance.database(doctype)
            try:
                conflicted = unsettled(self._couch.leaves(db, list(written)), written)
            except CouchsyncError as exc:
                logger.warning("cannot read %s again to look for conflicts: %s", db, exc)
                self.settling.written(instance, doctype, [i for i, d in written.items() if not d],
                                      [i for i, d in written.items() if d])
                continue
            found += len(conflicted)
            repairs += repairs_of((instance, doctype), conflicted)
        for repair in joined_repairs(repairs):
            try:
                report = self.repair(repair)
                report.raise_for_failures()
            except (CouchError, InstancesUnavailable) as exc:  # passing: conflicts with other writers, a node down
                logger.warning("repair of %s after a conflict failed (made again in %gs): %s",
                               repair.organization_id, self.settling.delay, exc)
                self.settling.failed(repair)
            except CouchsyncError as exc:
                logger.warning("repair of %s after a conflict failed (left to reconcile): %s",
                               repair.organization_id, exc)
            else:
                logger.info("conflict merged: %s, %d writes in %d instances", repair, report.writes,
                            len(report.instances))
        return found

    def repair(self, repair: Repair) -> EventReport:
        """Project groups and people again from the state, in one instance or all of the organization's: the
        state's leaves joined on the way, each instance document merged (see `couchsync.settle`).

        Raises:
            UnknownOrganization: the organization has no usable instance.
            CouchError: the directory state could not be read or written.
        """
        started = time.monotonic()
        org = repair.organization_id
        instances = [instance for instance in self.instances_of(org)
                     if repair.domain is None or instance.domain == repair.domain]
        # Each group as a whole: its document, everyone it remembers, every contact related to it.
        groups = _GroupProjection(self, org, sorted(repair.groups), lambda states: [
            GroupChange(state, frozenset(state.members), related=True) for state in states.values()], {}, None) \
            if repair.groups else None
        people = [person_state_id(org, email) for email in sorted(repair.emails)]

        def one(instance: Instance) -> InstanceReport:
            reports = [self._converge(instance, groups.planner(instance))] if groups else []
            reports += [self._converge(instance, functools.partial(self._plan_person_at, instance, state_id))
                        for state_id in people]
            return _joined_reports(instance.domain, reports)
        return self._report("repair", org, ",".join(sorted(repair.groups | repair.emails)),
                            tuple(self._pool.map(one, instances)), started)

    def partition_key(self, routing_key: str, body: bytes) -> str | None:
        """The organization whose partition a message goes to (see `couchsync.partitions`); None for one that
        is not a valid event. A user.created naming its organization by domain only is resolved as `apply`
        does (a read of CouchDB), so that it lands beside its organization's group events; a domain no
        organization has (yet) routes by the domain: the event fails there and its retry is routed again.

        Raises:
            CouchsyncError: CouchDB could not be read (settled like a failed attempt, or a pause).
        """
        try:
            event = parse_event(routing_key, body, not_after=self._settings.not_after())
        except CouchsyncError:
            return None
        if isinstance(event, GroupEvent):
            return event.organization_id
        try:
            return self._organization_of(event)
        except UnknownOrganization:
            return f"domain:{event.organization_domain}"

    def _converge(self, instance: Instance, planner: Planner, *, basis_checked_after: bool = False) -> InstanceReport:
        """Bring one instance to the planner's plan; a failure is reported, not raised."""
        try:
            written = self.writer.converge(instance, planner, basis_checked_after=basis_checked_after)
        except CouchsyncError as exc:
            logger.warning("failed in %s: %s", instance.domain, exc)
            return InstanceReport(instance.domain, error=str(exc), retryable=exc.retryable)
        return InstanceReport(instance.domain, written.writes, written.refusals, attempts=written.attempts,
                              requests=written.requests)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The states one projection of group events is made from."""

    groups: dict[str, Stored[GroupState]]  # by managed group id
    people: dict[str, Stored[PersonState]]  # by lower-case email
    changes: tuple[GroupChange, ...]  # what the groups ask of each instance
    since: str | None  # the state database's checkpoint before these states were read

    @property
    def basis(self) -> tuple[tuple[str, str], ...]:
        pairs = [(stored.state.state_id, stored.rev) for stored in self.groups.values()]
        pairs += [(stored.state.state_id, stored.rev) for stored in self.people.values()]
        return tuple((state_id, rev) for state_id, rev in pairs if rev)


class _GroupProjection:
    """Groups of one organization projected from their states into each instance (see `planner`):
    `changes` says, from the groups' states, what each group asks of an instance."""

    def __init__(self, sync: Synchronizer, organization_id: str, external_ids: Sequence[str],
                 changes: Callable[[Mapping[str, GroupState]], list[GroupChange]],
                 merged: Mapping[str, Stored[State]], since: str | None, created: frozenset[str] = frozenset()) -> None:
        """`merged`: states as a merge just wrote them (not read again; none: every state is read), `since`
        a checkpoint taken before that merge read them, `created` the states it wrote where none was
        (groups and people new to the state: the first plans read neither the documents of those groups it
        knows alive nor the people's own contacts, which couchsync never made; one someone else made is met
        by a 409, and the plan made again reads it, see `_written_unread` and `ContactLookup`)."""
        self._sync = sync
        self._organization_id = organization_id
        self._external_ids = list(dict.fromkeys(external_ids))
        self._changes = changes
        self._snapshot = self.read(merged, since)
        self._created = created

    @property
    def basis(self) -> tuple[tuple[str, str], ...]:
        """The states the first plans are projected from."""
        return self._snapshot.basis

    @property
    def since(self) -> str | None:
        return self._snapshot.since

    def refresh(self) -> None:
        """Read the states again: the first plans from now on are projected from them."""
        self._snapshot = self.read()
        self._created = frozenset()

    def read(self, known: Mapping[str, Stored[State]] | None = None, since: str | None = None) -> _Snapshot:
        """The groups' states and the profiles of everyone their changes name, read afresh but for those
        `known` (with `since`, a checkpoint taken before they were read)."""
        known = known or {}
        if not known:
            since = self._sync.states.checkpoint()
        org = self._organization_id
        state_ids = [group_state_id(org, external_id) for external_id in self._external_ids]
        found = self._known_or_read(state_ids, known)
        groups: dict[str, Stored[GroupState]] = {}
        for external_id, state_id in zip(self._external_ids, state_ids):
            stored = found.get(state_id)
            if stored is not None and isinstance(stored.state, GroupState):
                groups[stored.state.group_id] = Stored(stored.state, stored.rev)
            else:
                empty = GroupState(org, external_id)
                groups[empty.group_id] = Stored(empty, "")
        changes = self._changes({group_id: stored.state for group_id, stored in groups.items()})
        ids = {person_state_id(org, email): email for change in changes for email in change.named}
        people = {ids[state_id]: stored for state_id, stored in self._known_or_read(list(ids), known).items()}
        return _Snapshot(groups, {email: Stored(stored.state, stored.rev) for email, stored in people.items()
                                  if isinstance(stored.state, PersonState)}, tuple(changes), since)

    def _known_or_read(self, state_ids: Sequence[str], known: Mapping[str, Stored[State]]) -> dict[str, Stored[State]]:
        found = {state_id: known[state_id] for state_id in state_ids if state_id in known}
        return {**found, **self._sync.states.read([state_id for state_id in state_ids if state_id not in known])}

    def planner(self, instance: Instance) -> Planner:
        """Plans for one instance: the first from the state the merge left, later ones from a fresh read."""
        def plan(attempt: int) -> Plan:
            if attempt == 1:
                return self._plan(instance, self._snapshot, self._created)
            return self._plan(instance, self.read(), frozenset())  # a 409: strangers' own contacts read too
        return plan

    def _plan(self, instance: Instance, snapshot: _Snapshot, created: frozenset[str]) -> Plan:
        org, reader = self._organization_id, self._sync.reader
        groups = reader.documents(instance, GROUPS, [group_id for group_id, stored in snapshot.groups.items()
                                                     if not _written_unread(stored.state, created)], org)
        changes = snapshot.changes
        named = sorted(set().union(*(change.named for change in changes)))
        people = {email: stored.state for email, stored in snapshot.people.items()}
        lookup = ContactLookup(org, tuple((email, people[email].member.workplace_fqdn if email in people else None)
                                          for email in named),
                               tuple(change.state.group_id for change in changes if change.related),
                               frozenset(email for email in named if person_state_id(org, email) in created))
        view = InstanceView(instance.domain, groups=groups) if not lookup else InstanceView(
            instance.domain, reader.owner_email(instance), groups, tuple(reader.find(instance, lookup)))
        plan = plan_group_changes(changes, people, view)
        return replace(plan, basis=snapshot.basis, since=snapshot.since)


def _written_unread(state: GroupState, created: frozenset[str]) -> bool:
    """Whether a first plan writes the group's document without reading it: a group new to the state that
    the state knows alive. Its document is written everywhere, so one that someone else made is met by a
    409 (and read by the plan made again); a group the state does not know alive is read, since where its
    document is present decides whether members are related to it (`GroupState.relation`), and a deletion
    must find it."""
    return state.state_id in created and state.known and state.alive


def _followed_by(first: InstanceReport, second: InstanceReport) -> InstanceReport:
    """An instance converged twice (the states moved under the first): the writes of both, the outcome
    (refusals, error) of the second."""
    return replace(second, writes=first.writes + second.writes, attempts=first.attempts + second.attempts,
                   requests=first.requests + second.requests)


def _joined_reports(domain: str, reports: Sequence[InstanceReport]) -> InstanceReport:
    """Several convergences of one instance reported as one (the first error, if any)."""
    failed = next((report for report in reports if report.error is not None), None)
    return InstanceReport(domain, sum(r.writes for r in reports), tuple(x for r in reports for x in r.refusals),
                          failed.error if failed else None, failed.retryable if failed else False,
                          max((r.attempts for r in reports), default=1), sum(r.requests for r in reports))
