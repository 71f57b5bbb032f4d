"""The pure core of onboarding and repair: what a member instance's managed documents should be.

The organization instance is the reference. Its managed groups and contacts are copied into a member
instance (a bootstrap adds, a reconcile also removes what the reference does not have), one page at a
time, planned here and written by the caller:

- A group's memory is joined with the one already there, the newer stamp winning each register and
  the organization instance's winning ties: a hand edit in a member instance keeps the stamps it
  found, so it loses to the reference, while an event the organization instance missed is kept.
- A contact gets the reference's profile back (the same stamp re-asserted), and its relationships
  to managed groups follow the memories of the groups in the member instance, falling back to the
  reference contact's own relationships where no memory names the person (groups the stack made
  before couchsync keep none).

Writes are labelled with the drift they repair: `missing`, `different` (with the fields) or `extra`.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from couchsync.documents import (
    CONTACTS, GROUPS, MANAGED_GROUP_PREFIX, TAG, ContactIndex, Doc, cozy_hosts_of, group_ids_of, host_of, is_live,
    is_managed, lookup_keys, managed_tag, match_contact, with_group)
from couchsync.events import Member
from couchsync.plan import GroupState, InstanceView, Plan, Refusal, Write, changed, is_owner, upsert_contact

MISSING, DIFFERENT, EXTRA = "missing", "different", "extra"
SETTINGS_STAMP = ""  # a profile read from an instance's settings: any event's profile is newer


@dataclass(frozen=True, slots=True)
class Person:
    """Someone the instance should have a managed contact for, with the profile to give it.

    `groups` are the managed groups the reference contact is related to (the fallback where no
    group memory names the person); None for a person the reference has no contact for (a member
    known from their settings), whose relationships then only follow the memories.
    """

    member: Member
    stamp: str
    groups: frozenset[str] | None = None


def repair(doctype: str, doc: Doc, old: Doc | None, what: str) -> Write:
    """The write of `doc` over `old`, labelled with the drift it repairs (`missing group`, ...)."""
    if not is_live(old) or (old is not None and not is_managed(old)):
        return Write(doctype, doc, f"{MISSING} {what}")
    if not is_live(doc):
        return Write(doctype, doc, f"{EXTRA} {what}")
    return Write(doctype, doc, f"{DIFFERENT} {what}: {', '.join(differing_fields(doc, old))}")


def differing_fields(new: Doc, old: Doc | None) -> list[str]:
    """The top-level fields (and twakeDirectory's own) whose values differ, `_rev` aside."""
    old = old or {}
    fields = []
    for key in sorted((set(new) | set(old)) - {"_rev", "_revisions"}):
        if new.get(key) == old.get(key):
            continue
        if key == TAG and isinstance(new.get(key), dict) and isinstance(old.get(key), dict):
            fields += [f"{TAG}.{sub}" for sub in sorted(set(new[key]) | set(old[key]))
                       if new[key].get(sub) != old[key].get(sub)]
        else:
            fields.append(key)
    return fields


def group_state(doc: Doc) -> GroupState:
    """The memory a managed group's document holds (its own organization and external id)."""
    tag = managed_tag(doc)
    return GroupState.from_doc(doc, str(tag.get("organizationId", "")), str(tag.get("externalId", "")))


def plan_group_copies(sources: Iterable[Doc], targets: Mapping[str, Doc],
                      superseded: Mapping[str, Sequence[Doc]] | None = None) -> Plan:
    """The writes that bring the instance's groups (`targets`, by id) to the reference's `sources`.

    `superseded` holds, by id, earlier revisions a write replaced unseen (see `writer.replaced_unseen`).
    """
    writes: list[Write] = []
    refusals: list[Refusal] = []
    for source in sources:
        tag = managed_tag(source)
        target = targets.get(source["_id"])
        if is_live(target) and not is_managed(target):
            refusals.append(Refusal(source["_id"], "an unmanaged document has the managed group id"))
            continue
        state = group_state(source)
        for doc in (target, *(superseded or {}).get(source["_id"], ())):
            if doc is not None:
                state = state.joined(GroupState.from_doc(doc, tag["organizationId"], tag["externalId"]))
        doc = state.to_doc(target)
        if changed(doc, target) and (is_live(doc) or is_live(target)):
            writes.append(repair(GROUPS, doc, target, "group"))
    return Plan(tuple(writes), tuple(refusals))


def person_of(contact: Doc) -> Person | None:
    """The person a reference contact is, with its profile; None when it names no email."""
    tag = managed_tag(contact)
    email = tag.get("email") or next((entry.get("address") for entry in contact.get("email") or ()
                                      if isinstance(entry, dict) and entry.get("address")), None)
    if not isinstance(email, str) or not email.strip():
        return None
    member = Member(email=email.strip(), username=tag.get("username"), name=contact.get("fullname"),
                    workplace_fqdn=tag.get("workplaceFqdn"), phone=tag.get("phone"))
    groups = frozenset(gid for gid in group_ids_of(contact) if gid.startswith(MANAGED_GROUP_PREFIX))
    return Person(member, str(tag.get("stamp", "")), groups)


def person_of_settings(domain: str, settings: Doc | None) -> Person | None:
    """An instance's owner as their settings describe them, for the other instances' directories."""
    email = (settings or {}).get("email")
    if not isinstance(email, str) or not email.strip():
        return None
    name = (settings or {}).get("public_name")
    phone = (settings or {}).get("phone")
    return Person(Member(email=email.strip(), name=name if isinstance(name, str) else None, workplace_fqdn=domain,
                         phone=phone if isinstance(phone, str) and phone.strip() else None), SETTINGS_STAMP)


def people_keys(people: Iterable[Person]) -> list[list[str]]:
    """The lookup keys of these people's contacts in an instance (by email and Cozy host)."""
    people = list(people)
    return lookup_keys([person.member.email for person in people],
                       [host_of(person.member.workplace_fqdn) for person in people])


def plan_contact_copies(people: Iterable[Person], organization_id: str, view: InstanceView,
                        groups: Mapping[str, GroupState]) -> Plan:
    """The writes that give the instance a managed contact for each person, as the reference has it.

    `view.contacts` holds the instance's contacts looked up by the people's emails and hosts;
    `groups` the memories, in the instance, of the managed groups they are related to.
    """
    existing = {doc["_id"]: doc for doc in view.contacts if is_live(doc)}
    planned = ContactIndex(existing.values())
    touched: dict[str, Doc] = {}
    refusals: list[Refusal] = []
    for person in people:
        member = person.member
        if is_owner(member.email, member.workplace_fqdn, view):
            continue
        candidates = planned.candidates(member.email, member.workplace_fqdn)
        match = match_contact(member.email, member.workplace_fqdn, candidates, organization_id)
        if match.refusal:
            refusals.append(Refusal(None, match.refusal))
            continue
        doc = upsert_contact(match.contact, member, organization_id, person.stamp, reassert=True)
        doc = related(doc, person.groups, groups)
        planned.put(doc)
        touched[doc["_id"]] = doc
    writes = [repair(CONTACTS, doc, existing.get(doc_id), "contact")
              for doc_id, doc in touched.items() if changed(doc, existing.get(doc_id))]
    return Plan(tuple(writes), tuple(refusals))


def related(contact: Doc, fallback: frozenset[str] | None, groups: Mapping[str, GroupState]) -> Doc:
    """The contact with its managed-group relationships as the groups' memories say.

    Where a memory does not name the person, or the group is not given, `fallback` (the reference's
    relationships) decides; with no fallback, the relationship stays as it is.
    """
    email = str(managed_tag(contact).get("email") or "")
    current = {gid for gid in group_ids_of(contact) if gid.startswith(MANAGED_GROUP_PREFIX)}
    for group_id in sorted(current | (fallback or frozenset())):
        state = groups.get(group_id)
        wanted = None if state is None else (state.membership(email) if state.alive else False)
        if wanted is None:
            wanted = group_id in current if fallback is None else group_id in fallback
        if (group_id in current) != wanted:
            contact = with_group(contact, group_id, wanted)
    return contact


def is_own_contact(contact: Doc, view: InstanceView) -> bool:
    """Whether a contact is of the instance's owner (by Cozy host or email), whom no directory lists."""
    email = str(managed_tag(contact).get("email") or "")
    return view.domain.lower() in cozy_hosts_of(contact) or is_owner(email, None, view)


def is_extra_contact(contact: Doc, expected: frozenset[str], view: InstanceView) -> bool:
    """Whether a managed contact names nobody the reference says this instance should have.

    `expected` holds the lower-case emails of the people the instance should have a contact for.
    """
    email = str(managed_tag(contact).get("email") or "").strip().lower()
    return email not in expected or is_own_contact(contact, view)


def plan_removals(groups: Sequence[Doc], contacts: Sequence[Doc], related_contacts: Sequence[Doc]) -> Plan:
    """The writes that remove extra managed groups and contacts from an instance.

    Contacts related to a removed group let go of it first, so that a crash in between leaves no
    dangling relationship; then the groups and the extra contacts are deleted.
    """
    removed = {doc["_id"] for doc in groups}
    doomed = {doc["_id"] for doc in contacts}
    writes: list[Write] = []
    for contact in related_contacts:
        if contact["_id"] in doomed or not is_managed(contact):
            continue
        updated = contact
        for group_id in removed & set(group_ids_of(contact)):
            updated = with_group(updated, group_id, False)
        if changed(updated, contact):
            writes.append(Write(CONTACTS, updated, f"{DIFFERENT} contact: relationships (extra group removed)"))
    writes += [Write(GROUPS, _deletion(doc), f"{EXTRA} group") for doc in groups]
    writes += [Write(CONTACTS, _deletion(doc), f"{EXTRA} contact") for doc in contacts]
    return Plan(tuple(writes))


def _deletion(doc: Doc) -> Doc:
    return {"_id": doc["_id"], "_rev": doc["_rev"], "_deleted": True}
