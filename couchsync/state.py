"""The directory state: what couchsync knows of an organization's directory, kept in live documents.

Every register (a group's field, its existence, its last deletion, one membership, one field of a
person's profile) holds the stamp (see `couchsync.events`) of the newest event that set it. An event
is merged register by register, the newer stamp winning; two states are joined the same way. Both
are commutative, associative and idempotent, so any order of events, any number of times, and any
number of conflicting revisions of one state document give the same state. The instances' managed
documents are a projection of it (`couchsync.plan`); nothing here does I/O.

A group's state is bounded by a horizon (`admit`): a removed member's record older than the horizon is
dropped, and the group's events stamped before it are refused as stale. The horizon trails the group's
newest stamp (never the clock), so the same events give the same state whenever they are applied.

The documents live in couchsync's own database (`couchsync/directory` by default), never as
tombstones: on CouchDB 3 a tombstone's body cannot be edited, and a deleted document comes back only
by a write without `_rev`, so a memory kept on tombstones cannot be updated in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from couchsync.identity import person_key
from couchsync.documents import (
    Doc, digest, group_ids_of, host_of, is_live, managed_contact_id, managed_group_id,
    managed_tag)
from couchsync.events import GroupEvent, GroupEventKind, Member

GROUP_VALUES = ("name", "description", "color", "createdAt")
PROFILE_FIELDS = ("email", "username", "firstName", "lastName", "name", "workplaceFqdn", "phone")
EXISTS = "exists"    # stamp key of the group's existence register
CLEARED = "cleared"  # stamp of the newest deletion: memberships older than it are void
HORIZON = "horizon"  # events stamped before it are refused: removals older than it may be forgotten
# Below every event's stamp (years are four digits from 0001): what is taken over from documents the
# stack's own consumer wrote loses to any event.
SEED_STAMP = "0000-00-00T00:00:00.000000Z#0#seed"
GROUP, PERSON, ORGANIZATION = "group", "person", "organization"


def organization_key(organization_id: str) -> str:
    """The prefix of an organization's state document ids (its id may hold any character)."""
    return f"org-{digest(organization_id.strip())}"


def group_state_id(organization_id: str, external_id: str) -> str:
    return f"{organization_key(organization_id)}:{GROUP}:{managed_group_id(organization_id, external_id)}"


def person_state_id(organization_id: str, email: str) -> str:
    return f"{organization_key(organization_id)}:{PERSON}:{managed_contact_id(organization_id, email)}"


def organization_state_id(organization_id: str) -> str:
    """The document recording that an organization's state was taken over (see `seed`)."""
    return f"{organization_key(organization_id)}:{ORGANIZATION}"


def id_range(organization_id: str, kind: str) -> tuple[str, str]:
    """The `_all_docs` start and end keys of an organization's state documents of one kind."""
    start = f"{organization_key(organization_id)}:{kind}:"
    return start, start + "\ufff0"


def _newer(stamp: str, registers: Mapping[str, Any], key: str, position: int | None = None) -> bool:
    current = registers.get(key)
    if current is None:
        return True
    return bool(stamp > (current[position] if position is not None else current))


@dataclass(frozen=True, slots=True)
class GroupState:
    """A managed group's memory: fields, existence, deletion and memberships, each with its stamp."""

    organization_id: str
    external_id: str
    alive: bool = False
    values: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)
    members: dict[str, tuple[str, bool]] = field(default_factory=dict)

    @property
    def group_id(self) -> str:
        """The managed group's id in every instance."""
        return managed_group_id(self.organization_id, self.external_id)

    @property
    def state_id(self) -> str:
        return group_state_id(self.organization_id, self.external_id)

    @property
    def known(self) -> bool:
        """Whether an event (or a seed) recorded the group's existence: a creation or a deletion. A state
        that lacks it says nothing of the group, and nothing is deleted for it (absence is no deletion)."""
        return EXISTS in self.stamps

    def relation(self, email: str, present: bool) -> bool | None:
        """Whether a contact of `email` should be related to the group; None: leave it as it is.

        Only a recorded deletion or removal takes a relationship away. Of a group whose existence is
        unknown (its state lost, or its creation still to come), a recorded membership relates the
        contact only where the group is `present` in the instance, so that no relationship dangles.
        """
        membership = self.membership(email)
        if self.known:
            return None if membership is None and self.alive else self.is_member(email)
        if membership is True:
            return True if present else None
        return membership

    def membership(self, email: str) -> bool | None:
        """Whether the email is a member now; None when no event ever named it."""
        entry = self.members.get(person_key(email))
        if entry is None:
            return None
        stamp, present = entry
        return present and stamp > self.stamps.get(CLEARED, "")

    def is_member(self, email: str) -> bool:
        """Whether the group exists and the email is a member of it."""
        return self.alive and self.membership(email) is True

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
            if _newer(stamp, members, email, 0):
                members[email] = (stamp, present)
        return replace(self, alive=alive, values=values, stamps=stamps, members=members)

    def merged(self, event: GroupEvent) -> GroupState:
        """This state with one event merged in: each register keeps the newer stamp."""
        stamp, kind = event.stamp, event.kind
        stamps, values, members = dict(self.stamps), dict(self.values), dict(self.members)
        alive = self.alive
        if kind in (GroupEventKind.CREATED, GroupEventKind.DELETED) and stamp > stamps.get(EXISTS, ""):
            stamps[EXISTS], alive = stamp, kind is GroupEventKind.CREATED
        if kind is GroupEventKind.DELETED and stamp > stamps.get(CLEARED, ""):
            stamps[CLEARED] = stamp
        for name, value in group_fields(event):
            if stamp > stamps.get(name, ""):
                stamps[name], values[name] = stamp, value
        present = kind is not GroupEventKind.MEMBERS_REMOVED
        for member in event.members:
            email = person_key(member.email)
            if _newer(stamp, members, email, 0):
                members[email] = (stamp, present)
        return replace(self, alive=alive, values=values, stamps=stamps, members=members)

    @property
    def newest(self) -> str:
        """The newest stamp this memory holds ("" for none): what its horizon trails."""
        stamps = [stamp for key, stamp in self.stamps.items() if key != HORIZON]
        return max([*stamps, *(stamp for stamp, _ in self.members.values())], default="")

    @property
    def horizon(self) -> str:
        """The stamp before which this group's events are refused ("" for none)."""
        return self.stamps.get(HORIZON, "")

    def compacted(self, horizon: str) -> GroupState:
        """This state with its horizon raised to `horizon` and the removals older than it dropped."""
        horizon = max(horizon, self.horizon)
        members = {email: entry for email, entry in self.members.items() if entry[1] or entry[0] >= horizon}
        stamps = {**self.stamps, HORIZON: horizon} if horizon else self.stamps
        return replace(self, stamps=stamps, members=members)

    def fields(self) -> Doc:
        """The group's fields as the stack writes them: trimmed, no empty description or color, a name."""
        shown: Doc = {key: self.values[key] for key in GROUP_VALUES if self.values.get(key)}
        shown.setdefault("name", self.external_id)  # a group no creation named yet
        return shown

    def to_doc(self) -> Doc:
        """The state document (without `_id`/`_rev`)."""
        return {"type": GROUP, "organizationId": self.organization_id, "externalId": self.external_id,
                "alive": self.alive, "values": dict(sorted(self.values.items())),
                "stamps": dict(sorted(self.stamps.items())),
                "members": {email: [stamp, present] for email, (stamp, present) in sorted(self.members.items())}}

    @classmethod
    def from_doc(cls, doc: Doc) -> GroupState:
        """The state a state document holds (members written under the earlier identity rule re-keyed)."""
        members: dict[str, tuple[str, bool]] = {}
        # One (stamp, present) object for the members an event or a seed stamped alike: a group's
        # memberships are most of a directory's state in memory.
        entries: dict[tuple[str, bool], tuple[str, bool]] = {}
        for email, entry in (doc.get("members") or {}).items():
            value = (str(entry[0]), bool(entry[1]))
            key, value = person_key(email), entries.setdefault(value, value)
            if _newer(value[0], members, key, 0):  # two old spellings of one person: the newer wins
                members[key] = value
        return cls(str(doc["organizationId"]), str(doc["externalId"]), alive=doc.get("alive") is True,
                   values={k: v for k, v in (doc.get("values") or {}).items() if isinstance(v, str)},
                   stamps={k: v for k, v in (doc.get("stamps") or {}).items() if isinstance(v, str)},
                   members=members)


@dataclass(frozen=True, slots=True)
class Admission:
    """What a group's state makes of a batch of its events: the state to write, and the events refused
    as stale (stamped before the horizon)."""

    state: GroupState
    stale: tuple[GroupEvent, ...] = ()


def admit(known: GroupState | None, events: Sequence[GroupEvent], keep: timedelta) -> Admission:
    """The events of one group merged into its stored state (`known`), the removals older than `keep`
    before the newest stamp dropped, and the events stamped before that horizon refused, unless the
    state holds them already (a redelivery changes nothing).

    The refusal is what makes dropping safe: an addition older than a forgotten removal must not bring
    the member back. The horizon is computed with the whole batch, so what is dropped was stored
    before (an event below it is refused, not merged): a concurrent writer (a cluster's conflicting
    revision) from the same revision holds it too, and meets it when the revisions are joined. The
    result is the one of applying, in stamp order, the events that were not refused.
    """
    base = known or GroupState(events[0].organization_id, events[0].group_id)
    everything = base
    for event in events:
        everything = everything.merged(event)
    horizon = max(base.horizon, horizon_of(everything.newest, keep))
    state = base
    for event in events:
        if event.stamp >= horizon:
            state = state.merged(event)
    state = state.compacted(horizon)
    stale = tuple(event for event in events
                  if event.stamp < horizon and state.merged(event).compacted(horizon) != state)
    return Admission(state, stale)


def horizon_of(stamp: str, keep: timedelta) -> str:
    """The stamp `keep` before the time of `stamp` ("" when there is none: no stamp, a seed, or before year 1)."""
    try:
        moment = datetime.fromisoformat(stamp[:26])
        return (moment - keep).isoformat(timespec="microseconds") + "Z"
    except (ValueError, OverflowError):
        return ""


def group_fields(event: GroupEvent) -> list[tuple[str, str]]:
    """The registers an event sets, trimmed as the stack trims them.

    A creation sets every field (what it does not give is cleared); an update sets what it gives,
    `""` clearing a description or a color, while an empty name keeps the group's name.
    """
    given = {name: value.strip() for name, value in event.fields}
    if event.kind is GroupEventKind.CREATED:
        given = {name: given.get(name, "") for name in GROUP_VALUES}
    elif not given.get("name", "x"):
        del given["name"]
    return sorted(given.items())


@dataclass(frozen=True, slots=True)
class PersonState:
    """A person of the directory: each field of their profile with the stamp of the event that set it.

    A profile that leaves a field out keeps what an older or newer one set. `email` is the key (lower
    case); its register holds the case the directory *first* wrote it in (the oldest stamp wins, still
    commutative): a later event that writes the address in another case renames nobody.
    """

    organization_id: str
    email: str
    values: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, organization_id: str, member: Member, stamp: str) -> PersonState:
        """The state one profile gives."""
        return cls(organization_id, person_key(member.email)).merged(member, stamp)

    @property
    def state_id(self) -> str:
        return person_state_id(self.organization_id, self.email)

    def merged(self, member: Member, stamp: str) -> PersonState:
        """This state with a profile merged in, field by field, the newer stamp winning."""
        return self.joined(PersonState(self.organization_id, self.email, *_registers(member, stamp)))

    def joined(self, other: PersonState) -> PersonState:
        values, stamps = dict(self.values), dict(self.stamps)
        for key, stamp in other.stamps.items():
            current = stamps.get(key)
            if current is None or (stamp < current if key == "email" else stamp > current):
                stamps[key], values[key] = stamp, other.values[key]
        return replace(self, values=values, stamps=stamps)

    @property
    def member(self) -> Member:
        """The profile, as the events describe a person."""
        get = self.values.get
        return Member(email=get("email") or self.email, username=get("username"), first_name=get("firstName"),
                      last_name=get("lastName"), name=get("name"), workplace_fqdn=get("workplaceFqdn"),
                      phone=get("phone"))

    def to_doc(self) -> Doc:
        return {"type": PERSON, "organizationId": self.organization_id, "email": self.email,
                "values": dict(sorted(self.values.items())), "stamps": dict(sorted(self.stamps.items()))}

    @classmethod
    def from_doc(cls, doc: Doc) -> PersonState:
        values = {k: v for k, v in (doc.get("values") or {}).items() if isinstance(v, str)}
        stamps = {k: v for k, v in (doc.get("stamps") or {}).items() if isinstance(v, str) and k in values}
        return cls(str(doc["organizationId"]), person_key(str(doc["email"])), values, stamps)


def _registers(member: Member, stamp: str) -> tuple[dict[str, str], dict[str, str]]:
    given = {"email": member.email, "username": member.username, "firstName": member.first_name,
             "lastName": member.last_name, "name": member.name, "workplaceFqdn": host_of(member.workplace_fqdn),
             "phone": member.phone}
    values = {key: value.strip() for key, value in given.items() if isinstance(value, str) and value.strip()}
    return values, {key: stamp for key in values}


State = GroupState | PersonState


def state_from_doc(doc: Doc) -> State | None:
    """The state a document of the state database holds; None for another kind of document."""
    if doc.get("type") == GROUP:
        return GroupState.from_doc(doc)
    if doc.get("type") == PERSON:
        return PersonState.from_doc(doc)
    return None


def join_states(states: Iterable[State]) -> State | None:
    """The join of the states of every leaf of one document (None for none)."""
    joined: Any = None
    for state in states:
        joined = state if joined is None else joined.joined(state)
    return joined  # type: ignore[no-any-return]


def contribution(event: GroupEvent) -> list[State]:
    """What one event adds to the state, to be joined into it: the group's registers, and `profiles`."""
    return [GroupState(event.organization_id, event.group_id).merged(event), *profiles(event)]


def profiles(event: GroupEvent) -> list[PersonState]:
    """The profiles of the people an event adds (a removal names a person without describing them)."""
    if event.kind not in (GroupEventKind.CREATED, GroupEventKind.MEMBERS_ADDED):
        return []
    return [PersonState.of(event.organization_id, member, event.stamp) for member in event.members]


def seed(organization_id: str, groups: Iterable[Doc],
         contacts: Iterable[Doc]) -> tuple[list[GroupState], list[PersonState]]:
    """The state that documents the stack's own consumer (or an earlier couchsync) wrote describe.

    Taken over at SEED_STAMP, below every event, unless the documents carry stamps of their own (an
    earlier couchsync kept its memory on the groups): the next events apply on top.
    """
    states: dict[str, GroupState] = {}
    for doc in groups:
        tag = managed_tag(doc)
        if not is_live(doc) or tag.get("organizationId") != organization_id or not tag.get("externalId"):
            continue
        state = _seeded_group(organization_id, str(tag["externalId"]), doc)
        states[state.group_id] = state
    people: dict[str, PersonState] = {}
    for doc in contacts:
        person = seeded_person(organization_id, doc)
        if person is None:
            continue
        people[person.email] = people[person.email].joined(person) if person.email in people else person
        for group_id in group_ids_of(doc):
            group = states.get(group_id)
            if group is not None and person.email not in group.members:
                states[group_id] = replace(group, members={**group.members, person.email: (SEED_STAMP, True)})
    return list(states.values()), list(people.values())


def _seeded_group(organization_id: str, external_id: str, doc: Doc) -> GroupState:
    tag = managed_tag(doc)
    stamps = {k: v for k, v in (tag.get("stamps") or {}).items() if isinstance(v, str)}
    members = {str(email): (str(entry[0]), bool(entry[1])) for email, entry in (tag.get("members") or {}).items()
               if isinstance(entry, list) and len(entry) == 2}
    values = {key: doc[key].strip() for key in GROUP_VALUES if isinstance(doc.get(key), str)}
    stamps = {key: stamps.get(key, SEED_STAMP) for key in (*values, EXISTS)} | {
        k: v for k, v in stamps.items() if k == CLEARED}
    return GroupState(organization_id, external_id, alive=True, values=values, stamps=stamps, members=members)


def seeded_person(organization_id: str, contact: Doc) -> PersonState | None:
    """The profile a managed contact shows, at its own stamp if an earlier couchsync gave it one."""
    tag = managed_tag(contact)
    if not is_live(contact) or tag.get("organizationId") != organization_id:
        return None
    email = tag.get("email") or next((entry.get("address") for entry in contact.get("email") or ()
                                      if isinstance(entry, dict) and entry.get("address")), None)
    if not isinstance(email, str) or not email.strip():
        return None
    phone = tag.get("phone") or next((entry.get("number") for entry in contact.get("phone") or ()
                                      if isinstance(entry, dict) and entry.get("number")), None)
    fullname = contact.get("fullname")
    member = Member(email=email.strip(), username=_text(tag.get("username")), name=_text(fullname),
                    workplace_fqdn=_text(tag.get("workplaceFqdn")), phone=_text(phone))
    stamp = tag.get("stamp") if isinstance(tag.get("stamp"), str) else SEED_STAMP
    return PersonState.of(organization_id, member, str(stamp))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
