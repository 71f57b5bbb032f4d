"""The pure core of onboarding and repair: an instance's managed documents as the directory state says.

A bootstrap projects the whole state into an instance, page by page (planned here, written by the
caller); a reconcile does the same and also removes what the state does not account for:

- each group alive in the state is present with the state's fields (a hand edit is put back);
- each person of the state has a managed contact with their profile, and relationships to managed
  groups following the memberships; each member instance's owner (from their settings) gets one
  too, created only where no contact has them yet, since any directory profile is newer;
- a conflicted document is resolved (its chosen leaf written, the others deleted).

Writes are labelled with the drift they repair: `missing`, `different` (with the fields) or `extra`.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from couchsync.identity import person_key
from couchsync.documents import (
    CONFLICTS, CONTACTS, GROUPS, TAG, ContactIndex, Doc, group_ids_of, host_of, is_live, is_managed, lookup_keys,
    managed_tag, with_group)
from couchsync.events import Member
from couchsync.plan import (
    InstanceView, Plan, Refusal, Write, changed, is_own_contact, named_by, plan_group, profile_contact, put, related)
from couchsync.state import SEED_STAMP, GroupState, PersonState

MISSING, DIFFERENT, EXTRA = "missing", "different", "extra"


@dataclass(frozen=True, slots=True)
class Person:
    """Someone the instance should have a managed contact for, with the profile to give them.

    `settings`: known only from their instance's settings, so their contact is created where none
    matches them, never rewritten (any directory profile is newer).
    """

    state: PersonState
    settings: bool = False


def repair(doctype: str, doc: Doc, old: Doc | None, what: str) -> Write:
    """The write of `doc` over `old`, labelled with the drift it repairs (`missing group`, ...)."""
    if not is_live(old) or (old is not None and not is_managed(old)):
        return Write(doctype, doc, f"{MISSING} {what}")
    if not is_live(doc):
        return Write(doctype, doc, f"{EXTRA} {what}")
    fields = differing_fields(doc, old) or ["conflicting revisions"]
    return Write(doctype, doc, f"{DIFFERENT} {what}: {', '.join(fields)}")


def _labelled(writes: Sequence[Write], old: Doc | None, what: str) -> list[Write]:
    return [Write(write.doctype, write.doc, f"{DIFFERENT} {what}: conflicting revision", merge=True)
            if write.merge else repair(write.doctype, write.doc, old, what) for write in writes]


def differing_fields(new: Doc, old: Doc | None) -> list[str]:
    """The top-level fields (and twakeDirectory's own) whose values differ, bookkeeping aside."""
    old = old or {}
    fields = []
    for key in sorted((set(new) | set(old)) - {"_rev", "_revisions", CONFLICTS}):
        if new.get(key) == old.get(key):
            continue
        if key == TAG and isinstance(new.get(key), dict) and isinstance(old.get(key), dict):
            fields += [f"{TAG}.{sub}" for sub in sorted(set(new[key]) | set(old[key]))
                       if new[key].get(sub) != old[key].get(sub)]
        else:
            fields.append(key)
    return fields


def plan_group_copies(states: Iterable[GroupState], current: Mapping[str, Doc]) -> Plan:
    """The writes that give the instance (`current`: its groups, by id) each living group of the state."""
    writes: list[Write] = []
    refusals: list[Refusal] = []
    for state in states:
        if not state.alive:
            continue  # deleted groups are reconcile's to remove, after their contacts let go
        base = current.get(state.group_id)
        planned, refusal = plan_group(state, base)
        if refusal is not None:
            refusals.append(refusal)
        writes += _labelled(planned, base, "group")
    return Plan(tuple(writes), tuple(refusals))


def person_of_settings(organization_id: str, domain: str, settings: Doc | None) -> Person | None:
    """An instance's owner as their settings describe them, for the other instances' directories."""
    email = (settings or {}).get("email")
    if not isinstance(email, str) or not email.strip():
        return None
    name = (settings or {}).get("public_name")
    phone = (settings or {}).get("phone")
    member = Member(email=email.strip(), name=name if isinstance(name, str) else None, workplace_fqdn=domain,
                    phone=phone if isinstance(phone, str) and phone.strip() else None)
    return Person(PersonState.of(organization_id, member, SEED_STAMP), settings=True)


def people_keys(people: Iterable[Person]) -> list[list[str]]:
    """The lookup keys of these people's contacts in an instance (by email and Cozy host)."""
    members = [person.state.member for person in people]
    return lookup_keys([member.email for member in members], [host_of(member.workplace_fqdn) for member in members])


def plan_contact_copies(people: Iterable[Person], view: InstanceView, groups: Mapping[str, GroupState],
                        named: Mapping[str, tuple[str, ...]] | None = None) -> Plan:
    """The writes that give the instance a managed contact for each person, as the state has them.

    `view.contacts` holds the instance's contacts looked up by the people's emails and hosts;
    `groups` every group state of the organization, by managed group id; `named`: `named_by(groups)`,
    when the caller plans many pages from the same groups.
    """
    existing = {doc["_id"]: doc for doc in view.contacts if is_live(doc)}
    planned = ContactIndex(existing.values())
    named = named_by(groups) if named is None else named
    touched: dict[str, Doc] = {}
    refusals: list[Refusal] = []
    for person in people:
        member = person.state.member
        candidates = planned.candidates(person.state.organization_id, member.email, member.workplace_fqdn)
        if person.settings and any(is_live(doc) for doc in candidates):
            continue
        doc, refusal = profile_contact(person.state, candidates, view)
        if refusal is not None:
            refusals.append(refusal)
        if doc is None:
            continue
        doc = related(doc, groups, named)
        planned.put(doc)
        touched[doc["_id"]] = doc
    writes = [write for doc_id, doc in touched.items()
              for write in _labelled(put(CONTACTS, doc, existing.get(doc_id), ""), existing.get(doc_id), "contact")]
    return Plan(tuple(writes), tuple(refusals))


def is_extra_contact(contact: Doc, expected: frozenset[str], view: InstanceView) -> bool:
    """Whether a managed contact names nobody this instance should have a contact for.

    `expected` holds the lower-case emails of the people the instance should have a contact for.
    """
    email = person_key(str(managed_tag(contact).get("email") or ""))
    return email not in expected or is_own_contact(contact, view)


def plan_removals(groups: Sequence[Doc], contacts: Sequence[Doc], related_contacts: Sequence[Doc]) -> Plan:
    """The writes that remove extra managed groups and contacts from an instance.

    Contacts related to a removed group let go of it first, so that a crash in between leaves no
    dangling relationship; then the groups and the extra contacts are deleted (every leaf of them).
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
            writes += [Write(CONTACTS, write.doc, f"{DIFFERENT} contact: relationships (extra group removed)")
                       for write in put(CONTACTS, updated, contact, "")]
    writes += [Write(GROUPS, deletion, f"{EXTRA} group") for doc in groups for deletion in _deletions(doc)]
    writes += [Write(CONTACTS, deletion, f"{EXTRA} contact") for doc in contacts for deletion in _deletions(doc)]
    return Plan(tuple(writes))


def _deletions(doc: Doc) -> list[Doc]:
    revs = [doc["_rev"], *(doc.get(CONFLICTS) or ())]
    return [{"_id": doc["_id"], "_rev": rev, "_deleted": True} for rev in revs]
