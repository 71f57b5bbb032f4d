"""Reconciler: finds and repairs drift between an organization's instances and its directory state.

The directory state is the reference (see `couchsync.mirror`). For each instance of the organization
the reconciler lists what is missing or different (what a bootstrap would write) and what is extra: a
managed group the state records as deleted, a managed contact for nobody the instance should know. A
managed group the state does not know at all is reported (the state is contradicted), never deleted.
Deletions are counted before anything is written; beyond the threshold the instance is refused as a
whole, since mass deletion usually means the state itself was lost (directory-sync tools guard
against it the same way). Unmanaged documents are never read as drift nor touched.

Concurrency with the worker: every write is a projection over a fresh read, as the worker's are, and
each extra is checked against the state again just before it is deleted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from couchsync.identity import person_key
from couchsync.couch import CouchGateway
from couchsync.documents import CONTACTS, GROUPS, Doc, is_managed, lookup_keys, managed_tag
from couchsync.errors import ConfigError, CouchsyncError, UnknownInstance
from couchsync.instances import Instance, InstanceDirectory
from couchsync.mirror import EXTRA, Person, is_extra_contact, plan_removals
from couchsync.onboarding import DirectoryCopy, managed_selector, members_as_people
from couchsync.plan import InstanceView, Plan, is_own_contact
from couchsync.reader import InstanceReader
from couchsync.state import PersonState, person_state_id
from couchsync.state_store import StateStore
from couchsync.writer import PlanWriter

logger = logging.getLogger(__name__)

OK, DRIFT, REPAIRED, REFUSED, ERROR = "ok", "drift", "repaired", "refused", "error"
# A managed group an instance holds that the state does not know at all: the state is contradicted
# (lost, or never told), so it is reported and left; only a recorded deletion deletes a group.
UNKNOWN_GROUP = "unknown to the state: group"


@dataclass(frozen=True, slots=True)
class DeletionLimit:
    """The most managed documents a reconcile may delete in one instance: a count, or a percentage of
    the instance's managed documents."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> DeletionLimit:
        """`N` or `P%`.

        Raises:
            ConfigError: neither.
        """
        match = re.fullmatch(r"\s*(\d+)\s*(%?)\s*", text)
        if not match or (match.group(2) and int(match.group(1)) > 100):
            raise ConfigError(f"--max-deletions takes a count (50) or a percentage (10%), not {text!r}")
        number = int(match.group(1))
        return cls(percent=float(number)) if match.group(2) else cls(count=number)

    def allowed(self, managed: int) -> int:
        """How many deletions an instance holding `managed` managed documents may have."""
        if self.count is not None:
            return self.count
        return int(managed * (self.percent or 0) / 100)

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


@dataclass
class InstanceResult:
    """What reconciling one member instance found and did."""

    domain: str
    status: str = OK
    reason: str | None = None
    items: list[tuple[str, str]] = field(default_factory=list)  # (drift label, document id)
    refusals: list[str] = field(default_factory=list)

    def count(self, drift: str) -> int:
        return sum(1 for label, _ in self.items if label.startswith(drift))

    def as_json(self) -> dict[str, object]:
        return {"domain": self.domain, "status": self.status, "reason": self.reason,
                "missing": self.count("missing"), "different": self.count("different"), "extra": self.count(EXTRA),
                "unknown": self.count(UNKNOWN_GROUP),
                "items": [{"drift": label, "id": doc_id} for label, doc_id in self.items],
                "refusals": self.refusals}


@dataclass(frozen=True, slots=True)
class _Extras:
    """An instance's managed documents the state does not account for."""

    groups: tuple[Doc, ...]           # live here, deleted in the state (a recorded deletion): deleted
    contacts: tuple[Doc, ...]         # for nobody the instance should know: deleted
    managed: int                      # managed documents the instance holds, for the percentage
    unknown: tuple[Doc, ...] = ()     # live here, absent from the state: reported, never deleted

    @property
    def deletions(self) -> int:
        return len(self.groups) + len(self.contacts)


@dataclass(frozen=True, slots=True)
class _Reference:
    """What the state says every instance of the organization should hold."""

    groups: frozenset[str]   # ids of the managed groups alive in the state
    people: frozenset[str]   # lower-case emails of everyone who should have a contact
    deleted: frozenset[str] = frozenset()  # ids of the managed groups the state records as deleted


class Reconciler:
    """Reconciles the instances of an organization, `concurrency` at a time."""

    def __init__(self, couch: CouchGateway, directory: InstanceDirectory, states: StateStore,
                 instances_of: Callable[[str], list[Instance]], reader: InstanceReader, writer: PlanWriter,
                 copier: DirectoryCopy, *, page_size: int, concurrency: int) -> None:
        self._couch = couch
        self._directory = directory
        self._states = states
        self._instances_of = instances_of
        self._reader = reader
        self._writer = writer
        self._copier = copier
        self._page_size = page_size
        self._concurrency = concurrency

    def reconcile(self, organization_id: str, *, domain: str | None = None, dry_run: bool = False,
                  limit: DeletionLimit = DeletionLimit(percent=10), force: bool = False) -> list[InstanceResult]:
        """Compare (and unless `dry_run`, repair) the organization's instances, or only `domain`.

        Raises:
            UnknownOrganization: no instance.
            UnknownInstance: `domain` is not an instance of the organization.
        """
        instances = self._instances_of(organization_id)
        targets = sorted((instance for instance in instances
                          if domain is None or instance.domain == domain.strip().lower()), key=lambda i: i.domain)
        if domain is not None and not targets:
            raise UnknownInstance(f"{domain!r} is not an instance of organization {organization_id!r}")
        members = [instance for instance in instances if not instance.is_organization_instance]
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="couchsync-reconcile") as pool:
            people = members_as_people(self._directory, members, pool)
            reference = self._reference(organization_id, instances, people)

            def one(target: Instance) -> InstanceResult:
                others = [person for person in people if person.state.email not in self._own_emails(target)]
                return self._instance(target, others, reference, dry_run, limit, force)
            return list(pool.map(one, targets))

    def _own_emails(self, target: Instance) -> set[str]:
        owner = self._reader.owner_email(target)
        return {person_key(owner)} if owner else set()

    def _reference(self, organization_id: str, instances: Sequence[Instance],
                   people: Sequence[Person]) -> _Reference:
        """The groups alive in the state, and everyone who should have a contact: the state's people, the
        members, and the organization instance's owner (who may be in groups)."""
        states = [stored.state for stored in self._states.groups(organization_id)]
        groups = frozenset(state.group_id for state in states if state.alive)
        deleted = frozenset(state.group_id for state in states if state.known and not state.alive)
        emails = {s.state.email for page in self._states.people(organization_id) for s in page}
        emails |= {person.state.email for person in people}
        for instance in instances:
            if instance.is_organization_instance:
                emails |= self._own_emails(instance)
        logger.debug("state of %s: %d groups, %d people", organization_id, len(groups), len(emails))
        return _Reference(groups, frozenset(emails - {""}), deleted)

    def _managed(self, instance: Instance, doctype: str) -> Iterator[Doc]:
        return self._couch.find(instance.database(doctype), managed_selector(instance.org_id),
                                page_size=self._page_size)

    def _instance(self, target: Instance, people: Sequence[Person], reference: _Reference, dry_run: bool,
                  limit: DeletionLimit, force: bool) -> InstanceResult:
        result = InstanceResult(target.domain)
        try:
            extras = self._extras(target, reference)
            allowed = limit.allowed(extras.managed)
            if extras.deletions > allowed and not force:
                result.status, result.reason = REFUSED, (
                    f"would delete {extras.deletions} of its {extras.managed} managed documents, more than "
                    f"--max-deletions {limit} allows ({allowed}): nothing was changed; check the directory "
                    "state, then rerun with a higher --max-deletions or --force")
                result.items = self._extra_items(extras)
                return result
            copied = self._copier.copy(target.org_id, target, people, dry_run=dry_run, keep_items=True)
            result.items, result.refusals = copied.items, copied.refusals
            result.items += self._extra_items(extras) if dry_run else self._remove(target, extras) + [
                (UNKNOWN_GROUP, doc["_id"]) for doc in extras.unknown]
        except CouchsyncError as exc:
            logger.warning("reconcile of %s failed: %s", target.domain, exc)
            result.status, result.reason = ERROR, str(exc)
            return result
        result.status = OK if not result.items else DRIFT if dry_run or extras.unknown else REPAIRED
        logger.info("reconcile %s: %s, %d drift", target.domain, result.status, len(result.items))
        return result

    def _extras(self, target: Instance, reference: _Reference) -> _Extras:
        view = InstanceView(target.domain, self._reader.owner_email(target))
        held = list(self._managed(target, GROUPS))
        # Absence is no deletion: a group the state lacks (its memory lost, or the organization instance
        # holding what the state never heard of) is reported for a person to look at, never deleted.
        groups = [doc for doc in held if doc["_id"] in reference.deleted]
        unknown = [doc for doc in held if doc["_id"] not in reference.groups | reference.deleted]
        managed = len(held)
        contacts: list[Doc] = []
        for doc in self._managed(target, CONTACTS):
            managed += 1
            if is_extra_contact(doc, reference.people, view):
                contacts.append(doc)
        return _Extras(tuple(groups), tuple(contacts), managed, tuple(unknown))

    @staticmethod
    def _extra_items(extras: _Extras) -> list[tuple[str, str]]:
        return ([(f"{EXTRA} group", doc["_id"]) for doc in extras.groups]
                + [(UNKNOWN_GROUP, doc["_id"]) for doc in extras.unknown]
                + [(f"{EXTRA} contact", doc["_id"]) for doc in extras.contacts])

    def _remove(self, target: Instance, extras: _Extras) -> list[tuple[str, str]]:
        """Delete the extras the state still does not account for; the deletions made."""
        if not extras.groups and not extras.contacts:
            return []
        org = target.org_id
        written = self._writer.converge(target, lambda _: self._plan_removals(org, target, extras))
        return [(write.summary, write.doc["_id"]) for write in written.done]

    def _plan_removals(self, organization_id: str, target: Instance, extras: _Extras) -> Plan:
        """Removals over a fresh read of the state (a worker may have given them since) and of the instance."""
        view = InstanceView(target.domain, self._reader.owner_email(target))
        deleted = {s.state.group_id for s in self._states.groups(organization_id)
                   if s.state.known and not s.state.alive}
        known = self._states.read([person_state_id(organization_id, str(managed_tag(doc).get("email") or ""))
                                   for doc in extras.contacts])
        emails = {stored.state.email for stored in known.values() if isinstance(stored.state, PersonState)}
        group_ids = [doc["_id"] for doc in extras.groups if doc["_id"] in deleted]
        groups = [doc for doc in self._reader.documents(target, GROUPS, group_ids, organization_id).values()
                  if is_managed(doc)]
        current = self._reader.documents(target, CONTACTS, [doc["_id"] for doc in extras.contacts], organization_id)
        doomed = [doc for doc in current.values() if is_managed(doc) and (
            is_own_contact(doc, view) or person_key(str(managed_tag(doc).get("email") or "")) not in emails)]
        related = self._reader.contacts(target, lookup_keys((), (), [doc["_id"] for doc in groups]), organization_id)
        return plan_removals(groups, doomed, related)
