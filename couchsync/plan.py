"""The pure core: (event, what one instance holds) → the writes to make there, and the refusals.

A managed group's document is the instance's memory of the directory. Beside the group's fields it
keeps, in `twakeDirectory`, the stamp (see `couchsync.events`) of the newest event that set each of
them, and one entry per member email: the stamp of the newest addition or removal, and which it was.
Every event is merged into that memory register by register, the newer stamp winning, so merging is
idempotent and order-independent; a deleted group stays a CouchDB tombstone that keeps the memory, so a
late event cannot bring back what a newer one removed. Contacts' group relationships are then a
projection of that memory. Nothing here does I/O, reads a clock or logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from couchsync.documents import (
    CONTACTS, GROUPS, SORT_INDEX, TAG, ContactLookup, Doc, cozy_hosts_of, cozy_url, group_ids_of, host_of,
    is_live, is_managed, managed_contact_id, managed_tag, managed_group_id, match_contact, with_group)
from couchsync.events import GroupEvent, GroupEventKind, Member

GROUP_VALUES = ("name", "description", "color", "createdAt")
EXISTS = "exists"    # stamp key of the group's existence register
CLEARED = "cleared"  # stamp of the newest deletion: memberships older than it are void


@dataclass(frozen=True, slots=True)
class Write:
    """Put this document (with its current `_rev`, if any) into the instance's database of `doctype`.

    A plan's writes are in the order they must reach CouchDB.
    """

    doctype: str
    doc: Doc
    summary: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A change couchsync will not make, and why."""

    doc_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Basis:
    """The document a plan's writes were derived from, and its revision when read (None: absent)."""

    doctype: str
    doc_id: str
    rev: str | None


@dataclass(frozen=True, slots=True)
class Plan:
    """The writes and refusals for one event in one instance.

    `basis`: the document the writes were derived from (a group's memory). Reads are not a snapshot:
    a write checked only by its own revision can carry a projection of a memory that changed since,
    so the writer plans again when the basis moved under the writes (see `writer.PlanWriter`).
    """

    writes: tuple[Write, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    basis: Basis | None = None


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What planning needs of one instance: its owner, the group's document(s), the contacts looked up."""

    domain: str
    owner_email: str | None = None
    group: Doc | None = None
    contacts: tuple[Doc, ...] = ()
    # Earlier revisions of the group's document that a write replaced unseen (see couchsync.sync): their
    # memory is merged back in.
    superseded: tuple[Doc, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupState:
    """A managed group's memory (see the module docstring)."""

    organization_id: str
    external_id: str
    alive: bool = False
    values: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)
    members: dict[str, tuple[str, bool]] = field(default_factory=dict)

    @classmethod
    def from_doc(cls, doc: Doc | None, organization_id: str, external_id: str) -> GroupState:
        """The state a group document holds; an empty one for no document or an unmanaged tombstone."""
        if doc is None or not is_managed(doc):
            return cls(organization_id, external_id)
        tag = doc[TAG]
        return cls(organization_id, external_id, alive=is_live(doc),
                   values={key: doc[key] for key in GROUP_VALUES if isinstance(doc.get(key), str)},
                   stamps=dict(tag.get("stamps") or {}),
                   members={email: (entry[0], bool(entry[1]))
                            for email, entry in (tag.get("members") or {}).items()})

    def membership(self, email: str) -> bool | None:
        """Whether the email is a member now; None when no event ever named it."""
        entry = self.members.get(email.strip().lower())
        if entry is None:
            return None
        stamp, present = entry
        return present and stamp > self.stamps.get(CLEARED, "")

    def joined(self, other: GroupState) -> GroupState:
        """Both memories in one, register by register, the newer stamp winning (commutative, idempotent)."""
        stamps, values, members = dict(self.stamps), dict(self.values), dict(self.members)
        alive = other.alive if other.stamps.get(EXISTS, "") > self.stamps.get(EXISTS, "") else self.alive
        for key, stamp in other.stamps.items():
            if stamp > stamps.get(key, ""):
                stamps[key] = stamp
                if key in other.values:
                    values[key] = other.values[key]
        for email, (stamp, present) in other.members.items():
            if stamp > members.get(email, ("", False))[0]:
                members[email] = (stamp, present)
        return replace(self, alive=alive, values=values, stamps=stamps, members=members)

    def merged(self, event: GroupEvent) -> GroupState:
        """This state with one event merged in: each register keeps the newer stamp."""
        stamp = event.stamp
        stamps, values, members = dict(self.stamps), dict(self.values), dict(self.members)
        alive = self.alive
        kind = event.kind
        if kind in (GroupEventKind.CREATED, GroupEventKind.DELETED) and stamp > stamps.get(EXISTS, ""):
            stamps[EXISTS], alive = stamp, kind is GroupEventKind.CREATED
        if kind is GroupEventKind.DELETED and stamp > stamps.get(CLEARED, ""):
            stamps[CLEARED] = stamp
        for name, value in event.fields:
            if stamp > stamps.get(name, ""):
                stamps[name], values[name] = stamp, value
        present = kind is not GroupEventKind.MEMBERS_REMOVED
        for member in event.members:
            email = member.email.lower()
            if stamp > members.get(email, ("", False))[0]:
                members[email] = (stamp, present)
        return replace(self, alive=alive, values=values, stamps=stamps, members=members)

    def to_doc(self, base: Doc | None) -> Doc:
        """The group document for this state, on top of the current one (`_rev` and foreign fields kept)."""
        doc: Doc = {key: value for key, value in (base or {}).items()
                    if key not in GROUP_VALUES and key != TAG and key != "_deleted"}
        doc["_id"] = managed_group_id(self.organization_id, self.external_id)
        doc.update(self.values)
        tag: Doc = {"managed": True, "kind": "group", "organizationId": self.organization_id,
                    "externalId": self.external_id}
        # A group the stack made before couchsync keeps no memory: none is added until an event brings one.
        if self.stamps:
            tag["stamps"] = dict(sorted(self.stamps.items()))
        if self.members:
            tag["members"] = {email: [stamp, present] for email, (stamp, present) in sorted(self.members.items())}
        doc[TAG] = tag
        if not self.alive:
            doc["_deleted"] = True  # a tombstone that keeps the memory
        return doc


def changed(new: Doc, old: Doc | None) -> bool:
    """Whether writing `new` over `old` would change anything but the revision."""
    if old is None:
        return True
    return {k: v for k, v in new.items() if k != "_rev"} != {k: v for k, v in old.items() if k != "_rev"}


def plan_group_event(event: GroupEvent, view: InstanceView) -> Plan:
    """The writes that bring one instance up to date with a b2b.group.* event."""
    group_id = managed_group_id(event.organization_id, event.group_id)
    if is_live(view.group) and not is_managed(view.group):
        return Plan(refusals=(Refusal(group_id, "an unmanaged document has the managed group id"),))
    before = GroupState.from_doc(view.group, event.organization_id, event.group_id)
    for earlier in view.superseded:
        before = before.joined(GroupState.from_doc(earlier, event.organization_id, event.group_id))
    after = before.merged(event)
    group_doc = after.to_doc(view.group)
    group = [Write(GROUPS, group_doc, _group_summary(before, after))] if changed(group_doc, view.group) else []
    contacts, refusals = _plan_contacts(event, group_id, after, view)
    # Writes go in this order. A living group is written before the contacts that point to it; a
    # dying one after they let go of it, so that a crash in between leaves no dangling relationship.
    writes = group + contacts if after.alive else contacts + group
    return Plan(tuple(writes), tuple(refusals), Basis(GROUPS, group_id, (view.group or {}).get("_rev")))


def _group_summary(before: GroupState, after: GroupState) -> str:
    if after.alive and not before.alive:
        return "create group"
    if before.alive and not after.alive:
        return "delete group"
    return "update group" if after.alive else "remember group"


def _plan_contacts(event: GroupEvent, group_id: str, after: GroupState,
                   view: InstanceView) -> tuple[list[Write], list[Refusal]]:
    contacts = {doc["_id"]: doc for doc in view.contacts if is_live(doc)}
    planned: dict[str, Doc] = dict(contacts)
    refusals: list[Refusal] = []
    if event.kind in (GroupEventKind.CREATED, GroupEventKind.MEMBERS_ADDED):
        for member in event.members:
            if is_owner(member.email, member.workplace_fqdn, view):
                continue
            match = match_contact(member.email, member.workplace_fqdn, planned.values(),
                                  event.organization_id)
            if match.refusal:
                refusals.append(Refusal(None, match.refusal))
                continue
            doc = upsert_contact(match.contact, member, event.organization_id, event.stamp)
            planned[doc["_id"]] = doc
    for contact_id, doc in planned.items():
        planned[contact_id] = _project(doc, group_id, after, view)
    writes = [Write(CONTACTS, doc, "create contact" if contact_id not in contacts else "update contact")
              for contact_id, doc in planned.items() if changed(doc, contacts.get(contact_id))]
    return writes, refusals


def is_owner(email: str | None, workplace_fqdn: str | None, view: InstanceView) -> bool:
    """Whether the person owns this instance (a member is never added to their own instance)."""
    if host_of(workplace_fqdn) == view.domain.lower():
        return True
    return bool(email and view.owner_email and email.strip().lower() == view.owner_email.strip().lower())


def _project(contact: Doc, group_id: str, after: GroupState, view: InstanceView) -> Doc:
    """The contact with its relationship to the group as the group's memory says, if it says."""
    tag = managed_tag(contact)
    if tag.get("organizationId") != after.organization_id:
        return contact
    email = tag.get("email") or ""
    if is_owner(email, None, view) or view.domain.lower() in cozy_hosts_of(contact):
        return contact
    wanted = after.membership(email) if after.alive else False
    if wanted is None or (group_id in group_ids_of(contact)) == wanted:
        return contact
    return with_group(contact, group_id, wanted)


def plan_profile(member: Member, organization_id: str, stamp: str, view: InstanceView) -> Plan:
    """The write that gives one instance a person's managed contact, or brings it to this profile.

    `view.contacts` holds the instance's contacts looked up by the person's email and Cozy host.
    """
    if is_owner(member.email, member.workplace_fqdn, view):
        return Plan()
    match = match_contact(member.email, member.workplace_fqdn, view.contacts, organization_id)
    if match.refusal:
        return Plan(refusals=(Refusal(None, match.refusal),))
    doc = upsert_contact(match.contact, member, organization_id, stamp)
    if not changed(doc, match.contact):
        return Plan()
    return Plan((Write(CONTACTS, doc, "create contact" if match.contact is None else "update contact"),))


def display_name(member: Member) -> str:
    """`name`, else `firstName lastName`, else `username`, else the email's local part."""
    if member.name and member.name.strip():
        return member.name.strip()
    full = " ".join(part.strip() for part in (member.first_name, member.last_name) if part and part.strip())
    if full:
        return full
    if member.username and member.username.strip():
        return member.username.strip()
    return member.email.split("@", 1)[0]


def upsert_contact(contact: Doc | None, member: Member, organization_id: str, stamp: str, *,
                   reassert: bool = False) -> Doc:
    """The member's managed contact: a new one, an adopted external one, or a newer profile.

    Only the fields couchsync owns change; a profile older than the one applied is left alone, and so
    is the same one unless `reassert` (a copy from the organization instance puts its profile back
    over a hand edit, which never comes with a stamp of its own).
    """
    if contact is not None and is_managed(contact):
        applied = contact[TAG].get("stamp", "")
        if stamp < applied or (stamp == applied and not reassert):
            return contact
    doc: Doc = dict(contact) if contact else {
        "_id": managed_contact_id(organization_id, member.email),
        "relationships": {"groups": {"data": []}},
    }
    name = display_name(member)
    url = cozy_url(member.workplace_fqdn)
    # The entries a previous profile added are replaced, not accumulated: the newest profile wins
    # whatever order profiles arrive in.
    previous = managed_tag(doc)
    doc["fullname"] = doc["displayName"] = name
    doc["email"] = _with_entry(doc.get("email"), "address", member.email, replaces=previous.get("email"))
    cozy = _with_entry(doc.get("cozy"), "url", url, replaces=cozy_url(previous.get("workplaceFqdn")))
    doc.pop("cozy", None)
    if cozy:
        doc["cozy"] = cozy
    # Group events carry no phone: a profile without one keeps the number an earlier one gave.
    phone = member.phone or previous.get("phone")
    if member.phone:
        doc["phone"] = _with_entry(doc.get("phone"), "number", member.phone, replaces=previous.get("phone"))
    doc["metadata"] = {**(doc.get("metadata") or {}), "external": True}
    doc["trustedForSharing"] = True
    # The stack's own b2b contacts index by Cozy URL (the spec's example); without one, by email.
    doc["indexes"] = {**(doc.get("indexes") or {}), SORT_INDEX: url or member.email.lower()}
    doc[TAG] = {"managed": True, "kind": "contact", "organizationId": organization_id,
                "username": member.username, "email": member.email, "workplaceFqdn": member.workplace_fqdn,
                "stamp": stamp}
    if phone:
        doc[TAG]["phone"] = phone
    return doc


def _with_entry(entries: Any, key: str, value: str | None, *, replaces: str | None) -> list[dict[str, Any]]:
    """The `{key: ..., "primary": ...}` entries with `value` instead of the one couchsync added before.

    `replaces` (the value of the previous managed profile) is dropped when it differs from `value`;
    an entry equal to `value` but for case is kept as the user wrote it.
    """
    current = [dict(entry) for entry in entries or () if isinstance(entry, dict)]
    dropped = [entry for entry in current if replaces is not None and replaces != value
               and entry.get(key) == replaces]
    kept = [entry for entry in current if entry not in dropped]
    wanted = (value or "").strip().lower()
    if not wanted or any(str(entry.get(key) or "").strip().lower() == wanted for entry in kept):
        return kept
    primary = any(entry.get("primary") for entry in dropped) or not kept
    return kept + [{key: value, "primary": primary}]


def lookup_for(event: GroupEvent, group_doc: Doc | None) -> ContactLookup:
    """The contacts an event may change in an instance.

    The event's members always; when the group may come to life or die, also every member its
    memory names and every contact related to it, whose relationships follow its existence.
    """
    if event.kind is GroupEventKind.UPDATED:
        return ContactLookup(event.organization_id)
    memory = GroupState.from_doc(group_doc, event.organization_id, event.group_id)
    people = [(member.email, host_of(member.workplace_fqdn)) for member in event.members]
    groups: list[str] = []
    if event.kind is GroupEventKind.DELETED:
        # Even over a tombstone: a deletion interrupted before its contacts were written is finished.
        groups.append(managed_group_id(event.organization_id, event.group_id))
    if event.kind is GroupEventKind.CREATED and not is_live(group_doc):
        people += [(email, None) for email in memory.members]
    # Whoever the memory names was given a contact by the first addition that named them.
    return ContactLookup(event.organization_id, tuple(dict.fromkeys(people)), tuple(groups),
                         known=frozenset(memory.members))
