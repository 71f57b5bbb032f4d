"""The managed-document vocabulary: stable ids, database names, the twakeDirectory tag, matching.

Pure functions over plain dicts (documents as CouchDB returns them).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from couchsync.identity import person_key

TAG = "twakeDirectory"
GROUPS = "io.cozy.contacts.groups"
CONTACTS = "io.cozy.contacts"
SETTINGS = "io.cozy.settings"
SETTINGS_DOC_ID = "io.cozy.settings.instance"
SORT_INDEX = "byFamilyNameGivenNameEmailCozyUrl"
MANAGED_GROUP_PREFIX = "b2b-group-"

Doc = dict[str, Any]


def digest(*parts: str) -> str:
    return hashlib.sha256("\u0000".join(parts).encode("utf-8")).hexdigest()[:32]


def managed_group_id(organization_id: str, group_id: str) -> str:
    """The group's id in every instance: b2b-group-<sha256(org NUL group)[:32]>."""
    return MANAGED_GROUP_PREFIX + digest(organization_id.strip(), group_id.strip())


def managed_contact_id(organization_id: str, email: str) -> str:
    """The id couchsync gives a contact it creates.

    Derived, not random, so that two workers creating the same member's contact at once collide
    on one id (a 409, re-planned) instead of leaving two contacts behind.
    """
    return f"b2b-contact-{digest(organization_id.strip(), person_key(email))}"


def database_name(prefix: str, doctype: str) -> str:
    """`lower(prefix/doctype)` with `.` and `:` replaced by `-` (the stack's naming)."""
    return f"{prefix}/{doctype}".lower().replace(".", "-").replace(":", "-")


def doctype_of_database(db: str) -> str | None:
    """CONTACTS or GROUPS when `db` is an instance's contacts or groups database, else None.

    `database_name` folds case and `.`/`:`, so a name gives back the doctype and the folded prefix only:
    that is enough, the protection being the same in every instance.
    """
    prefix, _, _ = db.rpartition("/")
    if not prefix or prefix.startswith("_"):
        return None
    for doctype in (CONTACTS, GROUPS):
        if database_name(prefix, doctype) == db:
            return doctype
    return None


def managed_tag(doc: Doc | None) -> dict[str, Any]:
    """The twakeDirectory tag of a managed document; empty for any other document."""
    tag = doc.get(TAG) if doc else None
    return tag if isinstance(tag, dict) and tag.get("managed") is True else {}


def is_managed(doc: Doc | None) -> bool:
    """Whether couchsync owns this document (twakeDirectory.managed is true)."""
    return bool(managed_tag(doc))


def is_live(doc: Doc | None) -> bool:
    """Whether the document exists and is not a deletion tombstone."""
    return doc is not None and not doc.get("_deleted")


# A host of letters, digits, dots and hyphens, bare or after a scheme, maybe before a path: urlsplit's answer
# without urlsplit (a big event asks for 30,000 hosts; urlsplit was a third of its planning).
_PLAIN_HOST = re.compile(r"([A-Za-z0-9.-]+)(?:[/?#].*)?", re.DOTALL)
_PLAIN_URL_HOST = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([A-Za-z0-9.-]+)(?:[/?#].*)?", re.DOTALL)


@lru_cache(maxsize=4096)  # a page of a bootstrap asks it for the same hosts several times
def host_of(url_or_fqdn: str | None) -> str | None:
    """The lower-case host of a URL or a bare FQDN (`bob.acme.twake.app`)."""
    if not url_or_fqdn or not url_or_fqdn.strip():
        return None
    text = url_or_fqdn.strip()
    plain = (_PLAIN_URL_HOST if "://" in text else _PLAIN_HOST).fullmatch(text)
    if plain:
        return plain.group(1).lower()
    parsed = urlsplit(text if "://" in text else f"//{text}")
    return parsed.hostname.lower() if parsed.hostname else None


def cozy_url(workplace_fqdn: str | None) -> str | None:
    """`https://` + the host of a workplace FQDN."""
    host = host_of(workplace_fqdn)
    return f"https://{host}" if host else None


def emails_of(contact: Doc) -> set[str]:
    """Every email address of a contact, lower-cased, the managed one included."""
    found = {person_key(entry.get("address", ""))
             for entry in contact.get("email") or () if isinstance(entry, dict)}
    tag = contact.get(TAG)
    if isinstance(tag, dict) and isinstance(tag.get("email"), str):
        found.add(person_key(tag["email"]))
    return found - {""}


def cozy_hosts_of(contact: Doc) -> set[str]:
    """The hosts of a contact's Cozy URLs."""
    hosts = {host_of(entry.get("url")) for entry in contact.get("cozy") or () if isinstance(entry, dict)}
    return {host for host in hosts if host}


def group_ids_of(contact: Doc) -> list[str]:
    """The ids of the groups a contact's relationships name, in their order."""
    data = ((contact.get("relationships") or {}).get("groups") or {}).get("data") or []
    return [item["_id"] for item in data if isinstance(item, dict) and "_id" in item]


def with_group(contact: Doc, group_id: str, member: bool) -> Doc:
    """A copy of the contact with its relationship to one group added or removed; others kept."""
    return with_groups(contact, {group_id: member})


def with_groups(contact: Doc, changes: Mapping[str, bool]) -> Doc:
    """A copy of the contact with its relationships to these groups added (True) or removed; others kept."""
    relationships = dict(contact.get("relationships") or {})
    groups = dict(relationships.get("groups") or {})
    data = [item for item in groups.get("data") or []
            if not (isinstance(item, dict) and isinstance(item.get("_id"), str) and item["_id"] in changes)]
    ours = [item for item in data if _is_managed_group_ref(item)]
    ours += [{"_id": group_id, "_type": GROUPS} for group_id, member in changes.items() if member]
    # The user's own relationships first, as they were; managed groups after, sorted, so that the
    # list is the same whatever order the memberships arrived in.
    groups["data"] = [item for item in data if not _is_managed_group_ref(item)] + sorted(ours, key=lambda i: i["_id"])
    relationships["groups"] = groups
    return {**contact, "relationships": relationships}


def _is_managed_group_ref(item: Any) -> bool:
    return isinstance(item, dict) and str(item.get("_id", "")).startswith(MANAGED_GROUP_PREFIX)


def lookup_keys(emails: Iterable[str], hosts: Iterable[str | None] = (),
                group_ids: Iterable[str] = ()) -> list[list[str]]:
    """Keys of the contacts database's `couchsync/lookup` view for these emails, hosts and groups."""
    keys = [["email", person_key(email)] for email in emails]
    keys += [["cozy", host] for host in hosts if host]
    keys += [["group", group_id] for group_id in group_ids]
    unique = {tuple(key): key for key in keys}
    return list(unique.values())


@dataclass(frozen=True, slots=True)
class ContactLookup:
    """The contacts planning needs in an instance: those of these people, and those related to these groups.

    `people` are (email, Cozy host) pairs. Each person's own contact (the id couchsync derives) is read
    by its id; candidates are looked up by email and host only for those who have none yet (see
    `reader.InstanceReader.find`). `strangers`: emails of people the state never knew before, whose
    own contact is not read (couchsync never made one; a document there anyway meets a 409 on create,
    and the next plan, made without strangers, reads it).
    """

    organization_id: str
    people: tuple[tuple[str, str | None], ...] = ()
    group_ids: tuple[str, ...] = ()
    strangers: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.people or self.group_ids)

    def own_ids(self) -> list[str]:
        """The ids couchsync gives these people's contacts."""
        return [managed_contact_id(self.organization_id, email) for email, _ in self.people
                if email not in self.strangers]

    def others(self, found: Iterable[str]) -> list[tuple[str, str | None]]:
        """The people whose own contact is not among these ids."""
        found = set(found)
        return [(email, host) for email, host in self.people
                if managed_contact_id(self.organization_id, email) not in found]


class ContactIndex:
    """Live contacts by email and Cozy host, so that matching a page of people is not quadratic."""

    def __init__(self, contacts: Iterable[Doc] = ()) -> None:
        self._docs: dict[str, Doc] = {}
        self._ids: dict[tuple[str, str], set[str]] = {}
        for contact in contacts:
            self.put(contact)

    @staticmethod
    def _keys(contact: Doc) -> list[tuple[str, str]]:
        return [("email", email) for email in emails_of(contact)] + [("cozy", host) for host in cozy_hosts_of(contact)]

    def put(self, contact: Doc) -> None:
        """Add the contact, or replace the one with its id."""
        old = self._docs.get(contact["_id"])
        for key in self._keys(old) if old else ():
            self._ids[key].discard(contact["_id"])
        if not is_live(contact):
            self._docs.pop(contact["_id"], None)
            return
        self._docs[contact["_id"]] = contact
        for key in self._keys(contact):
            self._ids.setdefault(key, set()).add(contact["_id"])

    def get(self, contact_id: str) -> Doc | None:
        return self._docs.get(contact_id)

    def docs(self) -> list[Doc]:
        """Every live contact, in the order they were first put."""
        return list(self._docs.values())

    def candidates(self, organization_id: str, email: str, workplace_fqdn: str | None) -> list[Doc]:
        """What `match_contact` weighs for a person: the contacts with their email or the Cozy host of their
        workplace, and whatever is at the id couchsync gives their contact (theirs, or a squat)."""
        ids = set(self._ids.get(("email", person_key(email)), ()))
        host = host_of(workplace_fqdn)
        if host:
            ids |= self._ids.get(("cozy", host), set())
        own_id = managed_contact_id(organization_id, email)
        if own_id in self._docs:
            ids.add(own_id)
        return [self._docs[contact_id] for contact_id in sorted(ids)]


@dataclass(frozen=True, slots=True)
class ContactMatch:
    """The outcome of matching a member against an instance's contacts."""

    contact: Doc | None = None
    refusal: str | None = None


def is_reusable(contact: Doc, organization_id: str) -> bool:
    """A contact couchsync may take over: managed for this organization, or external and unmanaged."""
    tag = contact.get(TAG)
    if is_managed(contact):
        return isinstance(tag, dict) and tag.get("organizationId") == organization_id
    return tag is None and (contact.get("metadata") or {}).get("external") is True


def _belongs_to_another_member(contact: Doc, email: str, organization_id: str) -> bool:
    """A contact managed for this organization is the member whose email it records, and no other."""
    tag = managed_tag(contact)
    if tag.get("organizationId") != organization_id:
        return False
    recorded = person_key(str(tag.get("email") or ""))
    return bool(recorded) and recorded != email


def match_contact(email: str, workplace_fqdn: str | None, contacts: Iterable[Doc],
                  organization_id: str) -> ContactMatch:
    """The contact to use for a member: their own, else by email, then by Cozy URL; never a guess.

    The contact couchsync created for the member (its id is `managed_contact_id`) is their match
    whatever else has their email: a look-alike the user adds later is theirs, not an ambiguity.
    A managed contact is only ever its own member's (its recorded email), so matching by Cozy URL
    adopts external contacts only. No candidate gives an empty match (create one); a single reusable
    candidate is the match; candidates that may not be reused, or two reusable ones, give a refusal
    with the reason.
    """
    wanted = person_key(email)
    live = [contact for contact in contacts if is_live(contact) and not _belongs_to_another_member(
        contact, wanted, organization_id)]
    own_id = managed_contact_id(organization_id, wanted)
    own = next((contact for contact in live if contact["_id"] == own_id), None)
    if own is not None and is_managed(own):
        return ContactMatch(contact=own)
    candidates = [contact for contact in live if wanted in emails_of(contact)]
    how = "email"
    host = host_of(workplace_fqdn)
    if not candidates and host:
        candidates = [contact for contact in live if host in cozy_hosts_of(contact)]
        how = "Cozy URL"
    if not candidates and own is not None:
        # Someone wrote an unmanaged document at the id couchsync would create: a refusal, not a retry.
        return ContactMatch(refusal=f"an unmanaged document has the managed contact id {own_id} of {wanted}")
    if not candidates:
        return ContactMatch()
    reusable = [contact for contact in candidates if is_reusable(contact, organization_id)]
    if len(reusable) == 1:
        return ContactMatch(contact=reusable[0])
    ids = ", ".join(sorted(contact["_id"] for contact in candidates))
    if reusable:
        return ContactMatch(refusal=f"{len(reusable)} contacts match {wanted} by {how} ({ids})")
    return ContactMatch(refusal=f"contact {ids} has the {how} of {wanted} and is neither "
                                "managed nor external")


CONFLICTS = "_conflicts"


def choose_leaf(leaves: Sequence[Doc], organization_id: str) -> Doc | None:
    """The leaf of a conflicted document to build on, the other leaves' revisions in `_conflicts`.

    `leaves` are every live revision, CouchDB's winner first. A managed leaf of the organization wins
    over an unmanaged one: a second admin's disjoint branch (written with `new_edits: false`, which no
    validation sees as an edit) must not take a managed document over by winning CouchDB's choice.
    """
    if not leaves:
        return None
    ours = [leaf for leaf in leaves if managed_tag(leaf).get("organizationId") == organization_id]
    chosen = max(ours, key=lambda leaf: _revision_order(leaf["_rev"])) if ours else leaves[0]
    others = [leaf["_rev"] for leaf in leaves if leaf["_rev"] != chosen["_rev"]]
    doc = {key: value for key, value in chosen.items() if key != CONFLICTS}
    if others:
        doc[CONFLICTS] = sorted(others)
    return doc


def _revision_order(rev: str) -> tuple[int, str]:
    number, _, rest = rev.partition("-")
    return (int(number) if number.isdigit() else 0, rest)


def losing_deletions(doc: Doc) -> list[Doc]:
    """The deletions of the other leaves of a document read with `choose_leaf`."""
    return [{"_id": doc["_id"], "_rev": rev, "_deleted": True} for rev in doc.get(CONFLICTS) or ()]


def without_conflicts(doc: Doc) -> Doc:
    return {key: value for key, value in doc.items() if key != CONFLICTS}
