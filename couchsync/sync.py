"""The use cases: apply an event to every instance of its organization (read → plan → write).

Instances are handled concurrently (bounded by `SyncSettings.concurrency`), each on its own: a
failure in one is reported with the instance and does not stop the others. A 409 makes the instance
be read and planned again, since the plan merges rather than overwrites.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cachetools import TTLCache

from couchsync import design_docs
from couchsync.config import SyncSettings
from couchsync.couch import CouchGateway, WriteResult
from couchsync.design_docs import LOOKUP_DDOC, LOOKUP_VIEW, DesignDocs
from couchsync.documents import CONTACTS, GROUPS, Doc, managed_group_id
from couchsync.errors import (
    AccessDenied, CouchError, CouchsyncError, DocumentConflict, InstancesFailed, InstancesUnavailable, InvalidEvent,
    NotFound, UnknownOrganization)
from couchsync.events import Event, GroupEvent, parse_event
from couchsync.instances import Instance, InstanceDirectory
from couchsync.plan import InstanceView, Plan, lookup_keys_for, plan_group_event

logger = logging.getLogger(__name__)

REPLAN_PAUSE = 0.02  # seconds, times the attempt: the most a re-plan after a 409 waits
OWNER_CACHE_SECONDS = 600  # an instance's owner email changes rarely; re-read it every 10 minutes


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
        self._owners: TTLCache[str, str | None] = TTLCache(maxsize=100_000, ttl=OWNER_CACHE_SECONDS)
        self._owners_lock = threading.Lock()

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
            InvalidEvent: an event this version does not handle.
            CouchError: the global database could not be read.
        """
        if not isinstance(event, GroupEvent):
            raise InvalidEvent("not handled by this version of couchsync", routing_key=event.routing_key)
        started = time.monotonic()
        instances = self._directory.instances_of(event.organization_id)
        if not instances:
            raise UnknownOrganization(f"organization {event.organization_id!r} has no instance")
        reports = tuple(self._pool.map(lambda instance: self._apply_to_instance(event, instance), instances))
        report = EventReport(event.routing_key, event.organization_id, event.group_id, reports,
                             time.monotonic() - started)
        logger.debug("%s %s/%s: %d instances, %d writes, %d refusals, %d failed in %.3fs",
                     event.routing_key, event.organization_id, event.group_id, len(reports),
                     report.writes, len(report.refusals), len(report.failures), report.seconds)
        return report

    def handle(self, routing_key: str, body: bytes) -> dict[str, object]:
        """Apply one message's event everywhere; its log fields (what the worker gives the consumer).

        Raises:
            InvalidEvent, UnknownOrganization: never applicable as it is.
            InstancesFailed: failed in some instances (InstancesUnavailable: trying again may help).
            CouchError: the global database could not be read.
        """
        report = self.apply(parse_event(routing_key, body))
        report.raise_for_failures()
        return report.fields()

    def _apply_to_instance(self, event: GroupEvent, instance: Instance) -> InstanceReport:
        writes = 0
        refusals: list[str] = []
        recover = False
        try:
            for attempt in range(1, self._settings.max_attempts + 1):
                plan = plan_group_event(event, self._read(event, instance, recover))
                results = self._write(instance, plan)
                writes += sum(1 for result in results if result.ok)
                replaced = _replaced_unseen(plan, results)
                recover = recover or replaced
                if not any(result.conflict for result in results) and not replaced:
                    refusals += [refusal.reason for refusal in plan.refusals]
                    refusals += [f"CouchDB refused {r.doc_id}: {r.reason}" for r in results
                                 if not r.ok and r.error == "forbidden"]
                    _raise_unexpected(instance, results)
                    return InstanceReport(instance.domain, writes, tuple(refusals), attempts=attempt)
                logger.debug("conflict in %s, planning %s again", instance.domain, event.routing_key)
                # Writers of the same group document re-plan at once and collide again: spread them out.
                time.sleep(random.uniform(0, REPLAN_PAUSE * attempt))
            raise DocumentConflict(f"still conflicting after {self._settings.max_attempts} attempts",
                                   db=instance.prefix)
        except CouchsyncError as exc:
            logger.warning("%s failed in %s: %s", event.routing_key, instance.domain, exc)
            return InstanceReport(instance.domain, writes, tuple(refusals), error=str(exc),
                                  retryable=exc.retryable)

    def _read(self, event: GroupEvent, instance: Instance, recover: bool = False) -> InstanceView:
        """What planning needs; with `recover`, also the group's earlier revisions (see _replaced_unseen)."""
        group_id = managed_group_id(event.organization_id, event.group_id)
        group = self._couch.get_many(instance.database(GROUPS), [group_id]).get(group_id)
        superseded = tuple(self._couch.ancestors(instance.database(GROUPS), group_id, group["_rev"])
                           if recover and group else ())
        keys = lookup_keys_for(event, group)
        if not keys:
            return InstanceView(instance.domain, group=group, superseded=superseded)
        contacts = self._lookup(instance.database(CONTACTS), keys)
        return InstanceView(instance.domain, self._owner_email(instance), group, tuple(contacts), superseded)

    def _lookup(self, db: str, keys: Sequence[list[str]]) -> list[Doc]:
        try:
            return self._couch.view(db, LOOKUP_DDOC, LOOKUP_VIEW, keys)
        except NotFound:
            # The database exists without our view (a new instance): install it, once.
            design_docs.ensure(self._couch, db, LOOKUP_DDOC, self._design.lookup)
            return self._couch.view(db, LOOKUP_DDOC, LOOKUP_VIEW, keys)

    def _owner_email(self, instance: Instance) -> str | None:
        with self._owners_lock:
            if instance.domain in self._owners:
                return self._owners[instance.domain]
        email = self._directory.owner_email(instance)
        with self._owners_lock:
            self._owners[instance.domain] = email
        return email

    def _write(self, instance: Instance, plan: Plan) -> list[WriteResult]:
        """One bulk write per database, in the plan's order; a conflict stops the rest (re-planned)."""
        results: list[WriteResult] = []
        for doctype, writes in itertools.groupby(plan.writes, key=lambda write: write.doctype):
            results += self._couch.bulk_write(instance.database(doctype), [write.doc for write in writes])
            if any(result.conflict for result in results):
                break
        return results


def _replaced_unseen(plan: Plan, results: Sequence[WriteResult]) -> bool:
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
