"""The use cases: apply an event to every instance of its organization (read → plan → write).

Instances are handled concurrently (bounded by `SyncSettings.concurrency`), each on its own: a
failure in one is reported with the instance and does not stop the others. A 409 makes the instance
be read and planned again, since the plan merges rather than overwrites.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from couchsync.config import SyncSettings
from couchsync.couch import CouchGateway
from couchsync.design_docs import DesignDocs
from couchsync.documents import GROUPS, ContactLookup, host_of, managed_group_id
from couchsync.errors import CouchsyncError, InstancesFailed, InstancesUnavailable, UnknownInstance, UnknownOrganization
from couchsync.events import Event, GroupEvent, Member, UserCreated, parse_event
from couchsync.instances import Instance, InstanceDirectory
from couchsync.onboarding import CopyReport, DirectoryCopy, Progress, members_as_people
from couchsync.plan import InstanceView, lookup_for, plan_group_event, plan_profile
from couchsync.reader import InstanceReader
from couchsync.writer import Planner, PlanWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InstanceReport:
    """What one event did in one instance."""

    domain: str
    writes: int = 0
    refusals: tuple[str, ...] = ()
    error: str | None = None
    retryable: bool = False
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class EventReport:
    """What one event did in every instance of its organization."""

    routing_key: str
    organization_id: str
    subject: str
    instances: tuple[InstanceReport, ...]
    seconds: float

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
                "unchanged": sum(1 for r in self.instances if r.writes == 0 and r.error is None),
                "refusals": len(self.refusals), "failed": len(self.failures)}


class Synchronizer:
    """Applies events through a CouchGateway; call `close()` (or use `with`) when done."""

    def __init__(self, couch: CouchGateway, directory: InstanceDirectory, design: DesignDocs,
                 settings: SyncSettings) -> None:
        self._couch = couch
        self._directory = directory
        self._design = design
        self._settings = settings
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="couchsync-instance")
        self._reader = InstanceReader(couch, directory, design)
        self._writer = PlanWriter(couch, settings.max_attempts)
        self._copier = DirectoryCopy(couch, self._reader, self._writer, settings.page_size)

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
            CouchError: the global database could not be read.
        """
        started = time.monotonic()
        if isinstance(event, UserCreated):
            organization_id, subject = self._organization_of(event), event.domain
            reports = self._onboard(event, organization_id)
        else:
            organization_id, subject = event.organization_id, event.group_id
            instances = self._instances_of(organization_id)
            reports = tuple(self._pool.map(lambda instance: self._apply_to_instance(event, instance), instances))
        report = EventReport(event.routing_key, organization_id, subject, reports, time.monotonic() - started)
        logger.debug("%s %s/%s: %d instances, %d writes, %d refusals, %d failed in %.3fs",
                     event.routing_key, organization_id, subject, len(reports),
                     report.writes, len(report.refusals), len(report.failures), report.seconds)
        return report

    def bootstrap(self, domain: str, *, owner_email: str | None = None, dry_run: bool = False,
                  progress: Progress | None = None) -> CopyReport:
        """Give an instance its organization's directory: the organization instance's managed groups and
        contacts, and a managed contact for each member of the organization.

        Raises:
            UnknownInstance: no usable instance has the domain, or it belongs to no organization.
            CouchError: a page could not be read or written.
        """
        instance = self._directory.instance(domain)
        if instance is None or not instance.org_id:
            raise UnknownInstance(f"no usable instance of an organization has the domain {domain!r}")
        return self._bootstrap(instance, self._instances_of(instance.org_id), owner_email=owner_email,
                               dry_run=dry_run, progress=progress)

    def _instances_of(self, organization_id: str) -> list[Instance]:
        instances = self._directory.instances_of(organization_id)
        if not instances:
            raise UnknownOrganization(f"organization {organization_id!r} has no instance")
        return instances

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
        instances = self._instances_of(organization_id)
        new = next((instance for instance in instances if instance.domain == event.domain), None)
        if new is None:
            raise UnknownInstance(f"organization {organization_id!r} has no usable instance {event.domain!r} (yet)")
        others = [instance for instance in instances if instance is not new]
        member = event.member
        fanned = self._pool.map(lambda instance: self._converge(instance, lambda _: plan_profile(
            member, organization_id, event.stamp, self._read_person(instance, organization_id, member))), others)
        try:
            # The settings of a new instance may not name its owner yet; the event does.
            copied = self._bootstrap(new, instances, owner_email=event.email)
            mine = InstanceReport(new.domain, copied.written, tuple(copied.refusals))
        except CouchsyncError as exc:
            logger.warning("bootstrap of %s failed: %s", new.domain, exc)
            mine = InstanceReport(new.domain, error=str(exc), retryable=exc.retryable)
        return (*fanned, mine)

    def _bootstrap(self, target: Instance, instances: Sequence[Instance], *, owner_email: str | None,
                   dry_run: bool = False, progress: Progress | None = None) -> CopyReport:
        source = next((instance for instance in instances if instance.is_organization_instance), None)
        members = [instance for instance in instances
                   if not instance.is_organization_instance and instance.domain != target.domain]
        people = members_as_people(self._directory, members, self._pool)
        report = self._copier.copy(target.org_id, None if source == target else source, target, people,
                                   owner_email=owner_email, dry_run=dry_run, progress=progress)
        if source is None:
            report.refusals.append(f"organization {target.org_id!r} has no organization instance: "
                                   "its groups and contacts were not copied")
        return report

    def _read_person(self, instance: Instance, organization_id: str, member: Member) -> InstanceView:
        lookup = ContactLookup(organization_id, ((member.email, host_of(member.workplace_fqdn)),))
        contacts = self._reader.find(instance, lookup)
        return InstanceView(instance.domain, self._reader.owner_email(instance), contacts=tuple(contacts))

    def handle(self, routing_key: str, body: bytes) -> dict[str, object]:
        """Apply one message's event everywhere; its log fields (what the worker gives the consumer).

        Raises:
            InvalidEvent, UnknownOrganization: never applicable as it is.
            InstancesFailed: failed in some instances (InstancesUnavailable: trying again may help).
            CouchError: the global database could not be read.
        """
        report = self.apply(parse_event(routing_key, body, not_after=self._settings.not_after()))
        report.raise_for_failures()
        return report.fields()

    def _apply_to_instance(self, event: GroupEvent, instance: Instance) -> InstanceReport:
        return self._converge(instance, lambda recover: plan_group_event(event, self._read(event, instance, recover)))

    def _converge(self, instance: Instance, planner: Planner) -> InstanceReport:
        """Bring one instance to the planner's plan; a failure is reported, not raised."""
        try:
            written = self._writer.converge(instance, planner)
        except CouchsyncError as exc:
            logger.warning("failed in %s: %s", instance.domain, exc)
            return InstanceReport(instance.domain, error=str(exc), retryable=exc.retryable)
        return InstanceReport(instance.domain, written.writes, written.refusals, attempts=written.attempts)

    def _read(self, event: GroupEvent, instance: Instance, recover: bool = False) -> InstanceView:
        """What planning needs; with `recover`, also the group's earlier revisions (see writer.replaced_unseen)."""
        group_id = managed_group_id(event.organization_id, event.group_id)
        group = self._couch.get_many(instance.database(GROUPS), [group_id]).get(group_id)
        superseded = tuple(self._couch.ancestors(instance.database(GROUPS), group_id, group["_rev"])
                           if recover and group else ())
        lookup = lookup_for(event, group)
        if not lookup:
            return InstanceView(instance.domain, group=group, superseded=superseded)
        contacts = self._reader.find(instance, lookup)
        return InstanceView(instance.domain, self._reader.owner_email(instance), group, tuple(contacts), superseded)
