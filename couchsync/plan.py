"""The pure core's projection: (the directory state, what one instance holds) → the writes to make there.

The state (`couchsync.state`) says what each managed group and each person should look like; an
instance holds a projection of it: the managed group present with the state's fields or absent, and
each managed contact with the person's profile and relationships following the memberships. A plan
writes only the difference, and resolves a conflicted document it touches (the chosen leaf written,
the others deleted, see `documents.choose_leaf`). Nothing here does I/O, reads a clock or logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from couchsync.documents import (
    CONFLICTS, CONTACTS, GROUPS, MANAGED_GROUP_PREFIX, SORT_INDEX, TAG, ContactIndex, Doc, cozy_hosts_of, cozy_url,
    group_ids_of, host_of, is_live, is_managed, losing_deletions, managed_contact_id, managed_tag, match_contact,
    managed_group_id, with_group, with_groups, without_conflicts)
from couchsync.events import GroupEvent, GroupEventKind, Member
from couchsync.identity import person_key
from couchsync.state import GroupState, PersonState


RESOLVE = "delete conflicting revision"  # the summary of a losing leaf's deletion (a merge)


@dataclass(frozen=True, slots=True)
class Write:
    """Put this document (with its current `_rev`, if any) into the instance's database of `doctype`.

    A plan's writes are in the order they must reach CouchDB.
    """

    doctype: str
    doc: Doc
    summary: str
    merge: bool = False  # the deletion of a losing leaf: a conflict merged (counted)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A change couchsync will not make, and why."""

    doc_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The writes and refusals for one instance.

    `basis`: the state documents (id, revision) the plan was projected from. Reads are not a snapshot:
    a projection written over a newer one would undo it, so the writer projects again when the state
    moved under its writes (see `writer.PlanWriter`). `since`: the state database's sequence before the
    basis was read, when known (then only what changed since is compared).
    """

    writes: tuple[Write, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    basis: tuple[tuple[str, str], ...] = ()
    since: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What planning needs of one instance: its owner, managed groups and the contacts looked up.

    Documents are the leaves `documents.choose_leaf` chose (with `_conflicts`); deleted ones are absent.
    """

    domain: str
    owner_email: str | None = None
    groups: Mapping[str, Doc] | None = None
    contacts: tuple[Doc, ...] = ()


def changed(new: Doc, old: Doc | None) -> bool:
    """Whether writing `new` over `old` would change anything but the revision (or resolve a conflict)."""
    if old is None or old.get(CONFLICTS):
        return True
    ignored = ("_rev", CONFLICTS)
    return {k: v for k, v in new.items() if k not in ignored} != {k: v for k, v in old.items() if k not in ignored}


def put(doctype: str, doc: Doc, old: Doc | None, summary: str) -> list[Write]:
    """The writes that put `doc` over `old`: nothing when unchanged; the other leaves deleted after it."""
    if not changed(doc, old):
        return []
    writes = [Write(doctype, without_conflicts(doc), summary)]
    return writes + [Write(doctype, loser, RESOLVE, merge=True) for loser in losing_deletions(old or {})]


def group_doc(state: GroupState, base: Doc | None) -> Doc:
    """The managed group's document as the stack shapes it, on top of the current one (foreign fields kept)."""
    doc: Doc = {key: value for key, value in (base or {}).items()
                if key not in ("name", "description", "color", "createdAt", TAG, "_deleted")}
    doc["_id"] = state.group_id
    if not is_live(base):
        doc.pop("_rev", None)  # a deleted document comes back by a write without `_rev` (CouchDB 3)
    doc.update(state.fields())
    doc[TAG] = {"managed": True, "kind": "group", "organizationId": state.organization_id,
                "externalId": state.external_id}
    return doc


def plan_group(state: GroupState, base: Doc | None, label: str = "") -> tuple[list[Write], Refusal | None]:
    """The writes that bring an instance's managed group to its state: present, or absent."""
    if is_live(base) and not is_managed(base):
        return [], Refusal(state.group_id, "an unmanaged document has the managed group id")
    if state.alive:
        summary = label or ("update group" if is_live(base) else "create group")
        return put(GROUPS, group_doc(state, base), base, summary), None
    if base is None or not is_live(base) or not state.known:  # only a recorded deletion deletes
        return [], None
    return [Write(GROUPS, {"_id": base["_id"], "_rev": base["_rev"], "_deleted": True}, label or "delete group"),
            *(Write(GROUPS, loser, RESOLVE, merge=True) for loser in losing_deletions(base))], None


@dataclass(frozen=True, slots=True)
class GroupChange:
    """One group's part in a projection after its events.

    `named`: the lower-case emails whose contacts follow the group (the events' members, or everyone the
    state names when the group came to life); `related`: the contacts related to the group follow it too
    (a deletion).
    """

    state: GroupState
    named: frozenset[str] = frozenset()
    related: bool = False


def group_changes(events: Iterable[GroupEvent], states: Mapping[str, GroupState]) -> list[GroupChange]:
    """What events (one, or a batch of one organization's) ask of one instance, group by group.

    `states`: each group's state after the events, by managed group id. A creation names every member
    the state remembers, whether or not the instance holds the group already: another projection may
    have brought the group there first without them (a concurrent `member.added` names only its own
    members), and only the creation is responsible for all of them. A deletion voids older memberships
    even of a group a newer creation keeps alive: the contacts related to it follow it.
    """
    by_group: dict[str, list[GroupEvent]] = {}
    for event in events:
        by_group.setdefault(managed_group_id(event.organization_id, event.group_id), []).append(event)
    changes = []
    for group_id, mine in by_group.items():
        state = states[group_id]
        named = {person_key(member.email) for event in mine for member in event.members}
        kinds = {event.kind for event in mine}
        if GroupEventKind.CREATED in kinds:
            named |= set(state.members)
        related = (state.known and not state.alive) or GroupEventKind.DELETED in kinds
        changes.append(GroupChange(state, frozenset(named), related))
    return changes


def plan_group_event(state: GroupState, people: Mapping[str, PersonState], view: InstanceView, *,
                     named: Iterable[str] = (), related: bool = False) -> Plan:
    """The writes that project one group's state into one instance after an event (see `GroupChange`).

    `people` holds the named persons' profiles; `view.contacts` their contacts.
    """
    return plan_group_changes([GroupChange(state, frozenset(named), related)], people, view)


def plan_group_changes(changes: Iterable[GroupChange], people: Mapping[str, PersonState],
                       view: InstanceView) -> Plan:
    """The writes that project several groups' states into one instance at once (a batch of events):
    each contact is planned once, with every change that concerns it, and written once."""
    living: list[Write] = []
    dying: list[Write] = []
    refusals: list[Refusal] = []
    planned: list[GroupChange] = []
    for change in changes:
        base = (view.groups or {}).get(change.state.group_id)
        group, refusal = plan_group(change.state, base)
        if refusal is not None:
            refusals.append(refusal)  # nothing of that group is written, its people's contacts included
            continue
        (living if change.state.alive else dying).extend(group)
        planned.append(change)
    contacts, contact_refusals = _plan_members(planned, people, view)
    # A living group is written before the contacts that point to it; a dying one after they let go of
    # it, so that a crash in between leaves no dangling relationship.
    return Plan(tuple(living + contacts + dying), tuple(refusals + contact_refusals))


def _plan_members(changes: list[GroupChange], people: Mapping[str, PersonState],
                  view: InstanceView) -> tuple[list[Write], list[Refusal]]:
    contacts = {doc["_id"]: doc for doc in view.contacts if is_live(doc)}
    planned = ContactIndex(contacts.values())  # matching by index: an event may name thousands of people
    refusals: list[Refusal] = []
    for email in sorted(set().union(*(change.named for change in changes))):
        person = people.get(email)
        if person is None:
            continue
        member = person.member
        candidates = planned.candidates(person.organization_id, member.email, member.workplace_fqdn)
        doc, refusal = profile_contact(person, candidates, view)
        if refusal:
            refusals.append(refusal)
        elif doc is not None:
            planned.put(doc)
    writes: list[Write] = []
    for doc in planned.docs():
        for change in changes:
            doc = _followed(doc, change, view)
        old = contacts.get(doc["_id"])
        writes += put(CONTACTS, doc, old, "update contact" if old else "create contact")
    return writes, refusals


def _followed(doc: Doc, change: GroupChange, view: InstanceView) -> Doc:
    """The contact with its relationship to the change's group as the state says, when it follows it."""
    state = change.state
    tag = managed_tag(doc)
    email = person_key(str(tag.get("email") or ""))
    follows = email in change.named or (change.related and state.group_id in group_ids_of(doc))
    if not follows or tag.get("organizationId") != state.organization_id or is_own_contact(doc, view):
        return doc
    wanted = state.relation(email, is_live((view.groups or {}).get(state.group_id)))
    return doc if wanted is None else _related_to(doc, state.group_id, wanted)


def _related_to(contact: Doc, group_id: str, member: bool) -> Doc:
    return contact if (group_id in group_ids_of(contact)) == member else with_group(contact, group_id, member)


def profile_contact(person: PersonState, contacts: Iterable[Doc],
                    view: InstanceView) -> tuple[Doc | None, Refusal | None]:
    """The person's managed contact in an instance with their profile: matched, adopted or new.

    None for the instance's own owner (a member is never added to their own instance).
    """
    member = person.member
    if is_owner(member.email, member.workplace_fqdn, view):
        return None, None
    match = match_contact(member.email, member.workplace_fqdn, contacts, person.organization_id)
    if match.refusal:
        return None, Refusal(None, match.refusal)
    return upsert_contact(match.contact, member, person.organization_id), None


def plan_profile(person: PersonState, groups: Mapping[str, GroupState], view: InstanceView) -> Plan:
    """The write that gives one instance a person's managed contact, their memberships included."""
    doc, refusal = profile_contact(person, view.contacts, view)
    if refusal is not None:
        return Plan(refusals=(refusal,))
    if doc is None:
        return Plan()
    doc = related(doc, groups)
    old = next((contact for contact in view.contacts if contact["_id"] == doc["_id"]), None)
    return Plan(tuple(put(CONTACTS, doc, old, "update contact" if old else "create contact")))


def related(contact: Doc, groups: Mapping[str, GroupState],
            named: Mapping[str, tuple[str, ...]] | None = None) -> Doc:
    """The contact with its relationships to the managed groups the states know as they say.

    A relationship to a managed group no state here knows is left as it is, and so is one to a group
    whose existence the state does not record (see `GroupState.relation`). `named`: `named_by(groups)`,
    when the caller relates many contacts to the same groups.
    """
    email = str(managed_tag(contact).get("email") or "")
    key = person_key(email)
    current = {gid for gid in group_ids_of(contact) if gid.startswith(MANAGED_GROUP_PREFIX)}
    # Only the groups related already and those whose state names the person can change the contact.
    candidates = (set(named.get(key, ())) if named is not None
                  else {gid for gid, state in groups.items() if key in state.members})
    changes: dict[str, bool] = {}
    for group_id in (current | candidates) & groups.keys():
        state = groups[group_id]
        wanted = state.is_member(email)
        if (state.known or not wanted and state.membership(email) is False) and (group_id in current) != wanted:
            changes[group_id] = wanted
    return with_groups(contact, changes) if changes else contact


def named_by(groups: Mapping[str, GroupState]) -> dict[str, tuple[str, ...]]:
    """The groups (by managed id) whose states name each person (by key), as a member or not.

    Tuples, not sets: one entry per person of the organization, and most are named by one group (a tuple
    of one is a fifth of an empty set's size)."""
    named: dict[str, tuple[str, ...]] = {}
    for group_id, state in groups.items():
        for key in state.members:
            named[key] = named.get(key, ()) + (group_id,)
    return named


def is_owner(email: str | None, workplace_fqdn: str | None, view: InstanceView) -> bool:
    """Whether the person owns this instance (a member is never added to their own instance)."""
    if host_of(workplace_fqdn) == view.domain.lower():
        return True
    return bool(email and view.owner_email and person_key(email) == person_key(view.owner_email))


def is_own_contact(contact: Doc, view: InstanceView) -> bool:
    """Whether a contact is of the instance's owner (by Cozy host or email), whom no directory lists."""
    email = str(managed_tag(contact).get("email") or "")
    return view.domain.lower() in cozy_hosts_of(contact) or is_owner(email, None, view)


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


def upsert_contact(contact: Doc | None, member: Member, organization_id: str) -> Doc:
    """The member's managed contact with this profile: a new one, an adopted external one, or updated.

    Only the fields couchsync owns change (see README, "What it writes"); the entries a previous
    profile added are replaced, not accumulated, and the user's other entries stay.
    """
    doc: Doc = dict(contact) if contact else {
        "_id": managed_contact_id(organization_id, member.email),
        "relationships": {"groups": {"data": []}},
    }
    previous = managed_tag(doc)
    name = display_name(member)
    url = cozy_url(member.workplace_fqdn)
    doc["fullname"] = doc["displayName"] = name
    doc["email"] = _with_entry(doc.get("email"), "address", member.email, replaces=previous.get("email"))
    cozy = _with_entry(doc.get("cozy"), "url", url, replaces=cozy_url(previous.get("workplaceFqdn")))
    doc.pop("cozy", None)
    if cozy:
        doc["cozy"] = cozy
    if member.phone:
        doc["phone"] = _with_entry(doc.get("phone"), "number", member.phone, replaces=None)
    doc["metadata"] = {**(doc.get("metadata") or {}), "external": True}
    doc["trustedForSharing"] = True
    # The stack's own b2b contacts index by Cozy URL (the spec's example); without one, by email.
    doc["indexes"] = {**(doc.get("indexes") or {}), SORT_INDEX: url or member.email.lower()}
    doc[TAG] = {"managed": True, "kind": "contact", "organizationId": organization_id,
                "username": member.username, "email": member.email, "workplaceFqdn": host_of(member.workplace_fqdn)}
    return doc


def _with_entry(entries: Any, key: str, value: str | None, *, replaces: str | None) -> list[dict[str, Any]]:
    """The `{key: ..., "primary": ...}` entries with `value` instead of the one couchsync added before.

    `replaces` (the value of the previous managed profile) is couchsync's own entry: it is dropped and
    `value` written as the state has it (its case too), so the result does not depend on the order
    profiles came in; an entry of the user's equal to `value` but for case is kept as they wrote it.
    """
    current = [dict(entry) for entry in entries or () if isinstance(entry, dict)]
    same = person_key if key == "address" else _lower  # an address is compared as the person it names
    wanted = same(value or "")
    gone = same(replaces or "")
    dropped = [entry for entry in current if gone and same(str(entry.get(key) or "")) == gone]
    kept = [entry for entry in current if entry not in dropped]
    if not wanted or any(same(str(entry.get(key) or "")) == wanted for entry in kept):
        return kept
    primary = any(entry.get("primary") for entry in dropped) or not kept
    return kept + [{key: value, "primary": primary}]


def _lower(value: str) -> str:
    return value.strip().lower()
