"""Reconciler: finds and repairs drift between an organization's member instances and its reference.

The organization instance is the reference (see `couchsync.mirror`). For each member instance the
reconciler lists what is missing or different (what a bootstrap would write) and what is extra: a
managed group the reference does not have, a managed contact for nobody the instance should know.
Deletions are counted before anything is written; beyond the threshold the instance is refused as a
whole, since mass deletion usually means the reference itself was lost (directory-sync tools guard
against it the same way). Unmanaged documents are never read as drift nor touched.

Concurrency with the worker: every write is a plan merged over a fresh read, as the worker's are, and
each extra is checked against the reference again just before it is deleted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from couchsync.couch import CouchGateway
from couchsync.documents import CONTACTS, GROUPS, Doc, is_live, is_managed, lookup_keys, managed_tag
from couchsync.errors import ConfigError, CouchsyncError, UnknownInstance, UnknownOrganization
from couchsync.instances import Instance, InstanceDirectory
from couchsync.mirror import (
    EXTRA, Person, is_extra_contact, is_own_contact, plan_group_copies, plan_removals)
from couchsync.onboarding import DirectoryCopy, managed_selector, members_as_people
from couchsync.plan import InstanceView, Plan
from couchsync.reader import InstanceReader
from couchsync.writer import PlanWriter

logger = logging.getLogger(__name__)

OK, DRIFT, REPAIRED, REFUSED, ERROR = "ok", "drift", "repaired", "refused", "error"


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
                "items": [{"drift": label, "id": doc_id} for label, doc_id in self.items],
                "refusals": self.refusals}


@dataclass(frozen=True, slots=True)
class _Extras:
    """An instance's managed documents the reference does not account for."""

    groups: tuple[Doc, ...]           # live here, unknown to the reference: deleted
    forgotten: tuple[Doc, ...]        # deleted in the reference (a tombstone with its memory): joined
    contacts: tuple[Doc, ...]         # for nobody the instance should know: deleted
    managed: int                      # managed documents the instance holds, for the percentage

    @property
    def deletions(self) -> int:
        return len(self.groups) + len(self.forgotten) + len(self.contacts)


class Reconciler:
    """Reconciles the member instances of an organization, `concurrency` at a time."""

    def __init__(self, couch: CouchGateway, directory: InstanceDirectory, reader: InstanceReader,
                 writer: PlanWriter, copier: DirectoryCopy, *, page_size: int, concurrency: int) -> None:
        self._couch = couch
        self._directory = directory
        self._reader = reader
        self._writer = writer
        self._copier = copier
        self._page_size = page_size
        self._concurrency = concurrency

    def reconcile(self, organization_id: str, *, domain: str | None = None, dry_run: bool = False,
                  limit: DeletionLimit = DeletionLimit(percent=10), force: bool = False) -> list[InstanceResult]:
        """Compare (and unless `dry_run`, repair) the organization's member instances, or only `domain`.

        Raises:
            UnknownOrganization: no instance, or no organization instance to compare with.
            UnknownInstance: `domain` is not a member instance of the organization.
        """
        instances = self._directory.instances_of(organization_id)
        source = next((instance for instance in instances if instance.is_organization_instance), None)
        if source is None:
            raise UnknownOrganization(f"organization {organization_id!r} has no organization instance to "
                                      "compare with")
        members = [instance for instance in instances if not instance.is_organization_instance]
        targets = sorted((instance for instance in members
                          if domain is None or instance.domain == domain.strip().lower()), key=lambda i: i.domain)
        if domain is not None and not targets:
            raise UnknownInstance(f"{domain!r} is not a member instance of organization {organization_id!r}")
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="couchsync-reconcile") as pool:
            people = members_as_people(self._directory, members, pool)
            groups, expected = self._reference(source, people)

            def one(target: Instance) -> InstanceResult:
                return self._instance(source, target, people, groups, expected, dry_run, limit, force)
            return list(pool.map(one, targets))

    def _reference(self, source: Instance, people: Sequence[Person]) -> tuple[frozenset[str], frozenset[str]]:
        """The ids of the reference's live managed groups, and the emails of everyone who should have a
        contact: the reference's contacts, the members, and the organization instance's owner (who can
        have no contact in the reference, and may be in groups)."""
        org = source.org_id
        groups = frozenset(doc["_id"] for doc in self._managed(source, GROUPS))
        emails = {str(managed_tag(doc).get("email") or "").strip().lower() for doc in self._managed(source, CONTACTS)}
        emails |= {person.member.email.strip().lower() for person in people}
        owner = self._reader.owner_email(source)
        if owner:
            emails.add(owner.strip().lower())
        logger.debug("reference of %s: %d groups, %d people", org, len(groups), len(emails))
        return groups, frozenset(emails - {""})

    def _managed(self, instance: Instance, doctype: str) -> Iterator[Doc]:
        return self._couch.find(instance.database(doctype), managed_selector(instance.org_id),
                                page_size=self._page_size)

    def _instance(self, source: Instance, target: Instance, people: Sequence[Person], groups: frozenset[str],
                  expected: frozenset[str], dry_run: bool, limit: DeletionLimit, force: bool) -> InstanceResult:
        result = InstanceResult(target.domain)
        try:
            extras = self._extras(source, target, groups, expected)
            allowed = limit.allowed(extras.managed)
            if extras.deletions > allowed and not force:
                result.status, result.reason = REFUSED, (
                    f"would delete {extras.deletions} of its {extras.managed} managed documents, more than "
                    f"--max-deletions {limit} allows ({allowed}): nothing was changed; check the organization "
                    "instance, then rerun with a higher --max-deletions or --force")
                result.items = self._extra_items(extras)
                return result
            copied = self._copier.copy(source.org_id, source, target, people, dry_run=dry_run, keep_items=True)
            result.items, result.refusals = copied.items, copied.refusals
            result.items += self._extra_items(extras) if dry_run else self._remove(source, target, extras)
        except CouchsyncError as exc:
            logger.warning("reconcile of %s failed: %s", target.domain, exc)
            result.status, result.reason = ERROR, str(exc)
            return result
        result.status = OK if not result.items else DRIFT if dry_run else REPAIRED
        logger.info("reconcile %s: %s, %d drift", target.domain, result.status, len(result.items))
        return result

    def _extras(self, source: Instance, target: Instance, groups: frozenset[str], expected: frozenset[str]) -> _Extras:
        view = InstanceView(target.domain, self._reader.owner_email(target))
        managed = 0
        unknown: list[Doc] = []
        for doc in self._managed(target, GROUPS):
            managed += 1
            if doc["_id"] not in groups:
                unknown.append(doc)
        contacts: list[Doc] = []
        for doc in self._managed(target, CONTACTS):
            managed += 1
            if is_extra_contact(doc, expected, view):
                contacts.append(doc)
        tombstones = {doc_id: doc for doc_id, doc in self._couch.get_many(
            source.database(GROUPS), [doc["_id"] for doc in unknown]).items() if is_managed(doc)}
        # Deleted in the reference: extra here only if that deletion is newer than what this instance holds.
        joined = plan_group_copies(tombstones.values(), {doc["_id"]: doc for doc in unknown})
        dying = {write.doc["_id"] for write in joined.writes if not is_live(write.doc)}
        forgotten = tuple(doc for doc_id, doc in tombstones.items() if doc_id in dying)
        extra = tuple(doc for doc in unknown if doc["_id"] not in tombstones)
        return _Extras(extra, forgotten, tuple(contacts), managed)

    @staticmethod
    def _extra_items(extras: _Extras) -> list[tuple[str, str]]:
        return ([(f"{EXTRA} group", doc["_id"]) for doc in (*extras.groups, *extras.forgotten)]
                + [(f"{EXTRA} contact", doc["_id"]) for doc in extras.contacts])

    def _remove(self, source: Instance, target: Instance, extras: _Extras) -> list[tuple[str, str]]:
        """Delete the extras the reference still does not account for; the deletions made."""
        done: list[tuple[str, str]] = []
        if extras.forgotten:
            # Deleted in the reference: the memories are joined, so a group recreated here since stays.
            written = self._writer.converge(target, lambda _: plan_group_copies(
                extras.forgotten, self._couch.get_many(target.database(GROUPS),
                                                       [doc["_id"] for doc in extras.forgotten])))
            done += [(write.summary, write.doc["_id"]) for write in written.done]
        groups, contacts = self._still_extra(source, target, extras)
        if groups or contacts:
            written = self._writer.converge(target, lambda _: self._plan_removals(target, groups, contacts))
            done += [(write.summary, write.doc["_id"]) for write in written.done]
        return done

    def _still_extra(self, source: Instance, target: Instance, extras: _Extras) -> tuple[list[str], list[Doc]]:
        """The extras the reference still lacks: a worker may have given it them since they were listed."""
        view = InstanceView(target.domain, self._reader.owner_email(target))
        present = self._couch.get_many(source.database(GROUPS), [doc["_id"] for doc in extras.groups])
        groups = [doc["_id"] for doc in extras.groups if not is_managed(present.get(doc["_id"]))]
        emails = [str(managed_tag(doc).get("email") or "") for doc in extras.contacts]
        known = {str(managed_tag(doc).get("email") or "").strip().lower()
                 for doc in self._reader.contacts(source, lookup_keys(email for email in emails if email))
                 if is_managed(doc) and is_live(doc)}
        contacts = [doc for doc in extras.contacts if is_own_contact(doc, view)
                    or str(managed_tag(doc).get("email") or "").strip().lower() not in known]
        return groups, contacts

    def _plan_removals(self, target: Instance, group_ids: Sequence[str], contacts: Sequence[Doc]) -> Plan:
        """Removals over a fresh read: the current revisions, and every contact related to a removed group."""
        groups = [doc for doc in self._couch.get_many(target.database(GROUPS), group_ids).values()
                  if is_live(doc) and is_managed(doc)]
        current = self._couch.get_many(target.database(CONTACTS), [doc["_id"] for doc in contacts])
        doomed = [doc for doc in current.values() if is_live(doc) and is_managed(doc)]
        related = self._reader.contacts(target, lookup_keys((), (), [doc["_id"] for doc in groups]))
        return plan_removals(groups, doomed, related)
