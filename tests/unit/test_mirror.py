"""The pure core of bootstrap and reconcile: projecting the directory state into an instance."""

import json

import pytest

from couchsync.documents import CONTACTS, GROUPS, TAG, group_ids_of, managed_contact_id, managed_group_id
from couchsync.errors import ConfigError
from couchsync.events import Member, parse_event
from couchsync.mirror import (
    differing_fields, is_extra_contact, person_of_settings, plan_group_copies, plan_removals)
from couchsync.plan import InstanceView, plan_profile, upsert_contact
from couchsync.state import PersonState
from couchsync.reconcile import DeletionLimit

from tests.unit.fake_instance import FakeInstance

ENG, DESIGN = managed_group_id("acme", "engineering"), managed_group_id("acme", "design")
BOB = {"username": "bob", "email": "bob@acme.com", "firstName": "Bob", "lastName": "Martin",
       "workplaceFqdn": "bob.acme.twake.app"}
ALICE = {"email": "alice@acme.com", "username": "alice", "workplaceFqdn": "alice.acme.twake.app"}
DAN = {"email": "dan@acme.com", "name": "Dan"}
BOB_ID = managed_contact_id("acme", "bob@acme.com")


def event(routing_key, minute=30, group="engineering", **fields):
    body = {"timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": group, **fields}
    return parse_event(routing_key, json.dumps(body))


EVENTS = [
    event("b2b.group.created", 1, name="Engineering", members=[BOB, ALICE]),
    event("b2b.group.created", 2, group="design", name="Design", members=[ALICE, DAN]),
    event("b2b.group.member.removed", 3, members=[ALICE]),
    event("b2b.group.updated", 4, color="#3366FF"),
]


def organization() -> FakeInstance:
    org = FakeInstance("acme.twake.app", "admin@acme.com")
    for e in EVENTS:
        org.apply(e)
    return org


def test_a_copy_gives_a_new_instance_the_directory_the_events_would_have_given_it():
    copied = FakeInstance("carol.acme.twake.app")
    copied.copy_from(organization())
    replayed = FakeInstance("carol.acme.twake.app")
    for e in EVENTS:
        replayed.apply(e)
    assert copied.managed() == replayed.managed()
    assert group_ids_of(copied.docs[CONTACTS][BOB_ID]) == [ENG]
    assert set(copied.docs[GROUPS]) == {ENG, DESIGN}


def test_a_second_copy_writes_nothing():
    carol = FakeInstance("carol.acme.twake.app")
    org = organization()
    carol.copy_from(org)
    assert [plan.writes for plan in carol.copy_from(org)] == [(), ()]


def test_the_member_who_owns_the_instance_gets_no_contact_of_their_own():
    bob = FakeInstance("bob.acme.twake.app", "bob@acme.com")
    bob.copy_from(organization())
    assert BOB_ID not in bob.docs[CONTACTS] and managed_contact_id("acme", "dan@acme.com") in bob.docs[CONTACTS]


def test_a_hand_edit_is_put_back_and_labelled_with_the_fields_it_changed():
    carol = FakeInstance("carol.acme.twake.app")
    org = organization()
    carol.copy_from(org)
    carol.put(GROUPS, {**carol.docs[GROUPS][ENG], "name": "Hacked", "color": "#000000"})
    plans = carol.copy_from(org)
    assert [w.summary for w in plans[0].writes] == ["different group: color, name"]
    assert carol.docs[GROUPS][ENG]["name"] == "Engineering" and carol.docs[GROUPS][ENG]["color"] == "#3366FF"


def test_a_conflicted_group_is_resolved_and_its_losing_revision_deleted():
    org = organization()
    state = next(s for s in org.states.values() if getattr(s, "group_id", None) == ENG)
    current = {ENG: {**org.docs[GROUPS][ENG], "name": "Hacked", "_conflicts": ["2-loser"]}}
    plan = plan_group_copies([state], current)
    assert [(w.summary, w.doc.get("_deleted", False)) for w in plan.writes] == [
        ("different group: name", False), ("different group: conflicting revision", True)]
    assert plan.writes[1].doc == {"_id": ENG, "_rev": "2-loser", "_deleted": True}
    assert "_conflicts" not in plan.writes[0].doc


def test_an_unmanaged_document_with_a_managed_group_id_is_refused_and_left_alone():
    carol = FakeInstance("carol.acme.twake.app")
    carol.put(GROUPS, {"_id": ENG, "name": "Carol's"})
    plans = carol.copy_from(organization())
    assert carol.docs[GROUPS][ENG]["name"] == "Carol's"
    assert [r.doc_id for r in plans[0].refusals] == [ENG]


def test_an_unmanaged_document_at_a_persons_contact_id_is_refused_in_a_copy_and_left_alone():
    carol = FakeInstance("carol.acme.twake.app")
    carol.put(CONTACTS, {"_id": BOB_ID, "fullname": "x"})
    plans = carol.copy_from(organization())
    assert carol.docs[CONTACTS][BOB_ID]["fullname"] == "x"
    assert BOB_ID not in [w.doc["_id"] for w in plans[1].writes]
    assert [r.reason for r in plans[1].refusals] == [
        f"an unmanaged document has the managed contact id {BOB_ID} of bob@acme.com"]


def test_members_from_settings_are_added_without_overriding_a_directory_profile():
    carol = FakeInstance("carol.acme.twake.app")
    org = organization()
    settings = [person_of_settings("acme", "bob.acme.twake.app", {"email": "bob@acme.com", "public_name": "B."}),
                person_of_settings("acme", "erin.acme.twake.app", {"email": "erin@acme.com", "public_name": "Erin"})]
    carol.copy_from(org, members=settings)
    assert carol.docs[CONTACTS][BOB_ID]["fullname"] == "Bob Martin"
    erin = carol.docs[CONTACTS][managed_contact_id("acme", "erin@acme.com")]
    assert erin["fullname"] == "Erin" and erin["cozy"] == [{"url": "https://erin.acme.twake.app", "primary": True}]


def test_removals_let_contacts_go_of_a_group_before_deleting_it():
    org = organization()
    group = org.docs[GROUPS][ENG]
    bob, alice = (org.docs[CONTACTS][managed_contact_id("acme", e)] for e in ("bob@acme.com", "alice@acme.com"))
    plan = plan_removals([group], [alice], [bob, alice])
    assert [(w.doctype, w.summary) for w in plan.writes] == [
        (CONTACTS, "different contact: relationships (extra group removed)"),
        (GROUPS, "extra group"), (CONTACTS, "extra contact")]
    assert group_ids_of(plan.writes[0].doc) == []
    assert plan.writes[1].doc == {"_id": ENG, "_rev": group["_rev"], "_deleted": True}


def test_extra_contacts_are_those_nobody_expects_and_the_owner_s_own():
    view = InstanceView("bob.acme.twake.app", "bob@acme.com")
    alice = upsert_contact(None, Member("alice@acme.com"), "acme")
    own = upsert_contact(None, Member("bob@acme.com", workplace_fqdn="bob.acme.twake.app"), "acme")
    expected = frozenset({"alice@acme.com", "bob@acme.com"})
    assert not is_extra_contact(alice, expected, view)
    assert is_extra_contact(alice, frozenset({"bob@acme.com"}), view)
    assert is_extra_contact(own, expected, view)


def test_differing_fields_name_the_twake_directory_keys():
    old = {"_id": "x", "_rev": "1-a", "name": "a", TAG: {"managed": True, "email": "a@b.c"}}
    new = {"_id": "x", "name": "b", TAG: {"managed": True, "email": "b@b.c"}, "color": ""}
    assert differing_fields(new, old) == ["color", "name", "twakeDirectory.email"]


def test_a_new_user_s_profile_is_created_with_their_memberships():
    org = organization()
    groups = {s.group_id: s for s in org.states.values() if hasattr(s, "group_id")}
    person = PersonState.of("acme", Member("alice@acme.com", first_name="Alice", workplace_fqdn="alice.acme.twake.app"),
                            "2026-06-16T11:00:00.000000Z#0#x")
    plan = plan_profile(person, groups, InstanceView("carol.acme.twake.app"))
    doc = plan.writes[0].doc
    assert plan.writes[0].summary == "create contact" and doc["fullname"] == "Alice"
    assert group_ids_of(doc) == [DESIGN]  # removed from engineering, still in design
    assert plan_profile(person, groups, InstanceView("carol.acme.twake.app", contacts=(
        {**doc, "_rev": "1-a"},))).writes == ()


def test_deletion_limits_are_a_count_or_a_percentage_of_the_managed_documents():
    assert DeletionLimit.parse("50").allowed(10_000) == 50
    assert DeletionLimit.parse("10%").allowed(45) == 4
    assert str(DeletionLimit.parse(" 5 % ")) == "5%"
    for text in ("lots", "-1", "101%", "1.5"):
        with pytest.raises(ConfigError):
            DeletionLimit.parse(text)
