"""The pure core of bootstrap and reconcile: copying the organization instance's directory."""

import json

import pytest

from couchsync.documents import CONTACTS, GROUPS, TAG, group_ids_of, managed_contact_id, managed_group_id
from couchsync.errors import ConfigError
from couchsync.events import Member, parse_event
from couchsync.mirror import (
    differing_fields, is_extra_contact, person_of_settings, plan_group_copies, plan_removals)
from couchsync.plan import InstanceView, plan_profile, upsert_contact
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
    bob = FakeInstance("bob.acme.twake.app")
    bob.copy_from(organization())
    assert {doc[TAG]["email"] for doc in bob.docs[CONTACTS].values()} == {"alice@acme.com", "dan@acme.com"}


def test_a_hand_edit_is_put_back_and_labelled_with_the_fields_it_changed():
    org, carol = organization(), FakeInstance("carol.acme.twake.app")
    carol.copy_from(org)
    carol.put(GROUPS, {**carol.docs[GROUPS][ENG], "name": "Hacked"})
    carol.put(CONTACTS, {**carol.docs[CONTACTS][BOB_ID], "fullname": "Robert"})
    groups, contacts = carol.copy_from(org)
    assert [w.summary for w in groups.writes] == ["different group: name"]
    assert [w.summary for w in contacts.writes] == ["different contact: fullname"]
    fresh = FakeInstance("carol.acme.twake.app")
    fresh.copy_from(org)
    assert carol.managed() == fresh.managed()


def test_an_event_the_organization_instance_missed_is_kept():
    org, carol = organization(), FakeInstance("carol.acme.twake.app")
    carol.copy_from(org)
    carol.apply(event("b2b.group.updated", 9, name="Platform"))
    carol.apply(event("b2b.group.member.added", 9, members=[ALICE]))
    groups, contacts = carol.copy_from(org)
    assert groups.writes == () and contacts.writes == ()
    assert carol.docs[GROUPS][ENG]["name"] == "Platform"
    assert ENG in group_ids_of(carol.docs[CONTACTS][managed_contact_id("acme", "alice@acme.com")])


def test_a_missing_group_comes_back_with_its_members_related():
    org, carol = organization(), FakeInstance("carol.acme.twake.app")
    carol.copy_from(org)
    del carol.docs[GROUPS][ENG]
    carol.put(CONTACTS, {**carol.docs[CONTACTS][BOB_ID], "relationships": {"groups": {"data": []}}})
    groups, contacts = carol.copy_from(org)
    assert [w.summary for w in groups.writes] == ["missing group"]
    assert [w.summary for w in contacts.writes] == ["different contact: relationships"]
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == [ENG]


def test_an_unmanaged_document_with_a_managed_group_id_is_refused_and_left_alone():
    org = organization()
    mine = {"_id": ENG, "_rev": "1-a", "name": "My engineering friends"}
    plan = plan_group_copies([org.docs[GROUPS][ENG]], {ENG: mine})
    assert plan.writes == () and [r.reason for r in plan.refusals] == [
        "an unmanaged document has the managed group id"]


def test_relationships_follow_the_reference_where_no_memory_names_the_person():
    # Groups the stack made before couchsync keep no memory: the reference contact's relationships decide.
    org = FakeInstance("acme.twake.app")
    stack_group = {"_id": ENG, "name": "Engineering", TAG: {
        "managed": True, "kind": "group", "organizationId": "acme", "externalId": "engineering"}}
    org.put(GROUPS, stack_group)
    bob = upsert_contact(None, Member("bob@acme.com", name="Bob"), "acme", "")
    org.put(CONTACTS, {**bob, "relationships": {"groups": {"data": [{"_id": ENG, "_type": GROUPS}]}}})
    carol = FakeInstance("carol.acme.twake.app")
    carol.copy_from(org)
    assert carol.docs[GROUPS][ENG][TAG] == stack_group[TAG]
    assert group_ids_of(carol.docs[CONTACTS][bob["_id"]]) == [ENG]


def test_members_from_settings_are_added_without_overriding_a_directory_profile():
    carol = FakeInstance("carol.acme.twake.app")
    erin = person_of_settings("erin.acme.twake.app",
                              {"email": "erin@acme.com", "public_name": "Erin", "phone": "+33 6 00"})
    bob_settings = person_of_settings("bob.acme.twake.app", {"email": "bob@acme.com", "public_name": "B."})
    carol.copy_from(organization(), members=[erin, bob_settings])
    names = {doc[TAG]["email"]: doc["fullname"] for doc in carol.docs[CONTACTS].values()}
    assert names["erin@acme.com"] == "Erin" and names["bob@acme.com"] == "Bob Martin"
    erin_doc = carol.docs[CONTACTS][managed_contact_id("acme", "erin@acme.com")]
    assert erin_doc["phone"] == [{"number": "+33 6 00", "primary": True}]
    assert erin_doc["cozy"] == [{"url": "https://erin.acme.twake.app", "primary": True}]
    assert person_of_settings("x.acme.twake.app", {"public_name": "no email"}) is None


def test_a_later_event_profile_replaces_a_settings_profile_but_keeps_its_phone():
    erin = person_of_settings("erin.acme.twake.app", {"email": "erin@acme.com", "phone": "+33 6 00"})
    doc = upsert_contact(None, erin.member, "acme", erin.stamp)
    later = upsert_contact(doc, Member("erin@acme.com", first_name="Erin", last_name="Doe"), "acme", "2026-x")
    assert later["fullname"] == "Erin Doe" and later["phone"] == doc["phone"]
    assert later[TAG]["phone"] == "+33 6 00"


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
    alice = upsert_contact(None, Member("alice@acme.com"), "acme", "s")
    own = upsert_contact(None, Member("bob@acme.com", workplace_fqdn="bob.acme.twake.app"), "acme", "s")
    expected = frozenset({"alice@acme.com", "bob@acme.com"})
    assert not is_extra_contact(alice, expected, view)
    assert is_extra_contact(alice, frozenset({"bob@acme.com"}), view)
    assert is_extra_contact(own, expected, view)


def test_differing_fields_name_the_twake_directory_keys():
    old = {"_id": "x", "_rev": "1-a", "name": "a", TAG: {"managed": True, "stamps": {"name": "1"}}}
    new = {"_id": "x", "name": "b", TAG: {"managed": True, "stamps": {"name": "2"}}, "color": ""}
    assert differing_fields(new, old) == ["color", "name", "twakeDirectory.stamps"]


def test_a_new_user_s_profile_is_created_then_only_a_newer_one_changes_it():
    user = parse_event("user.created", json.dumps({
        "twakeId": "erin", "domain": "erin.acme.twake.app", "internalEmail": "erin@acme.com", "timestamp": 1781605800,
        "organizationId": "acme", "mobile": "+33 6 11", "hash": "secret"}))
    plan = plan_profile(user.member, "acme", user.stamp, InstanceView("bob.acme.twake.app"))
    [write] = plan.writes
    assert write.summary == "create contact"
    doc = write.doc
    assert doc["cozy"] == [{"url": "https://erin.acme.twake.app", "primary": True}]
    assert doc["phone"] == [{"number": "+33 6 11", "primary": True}] and doc[TAG]["username"] == "erin"
    assert "secret" not in json.dumps(doc)
    stored = {**doc, "_rev": "1-a"}
    unchanged = plan_profile(user.member, "acme", user.stamp, InstanceView("bob.acme.twake.app", contacts=(stored,)))
    assert unchanged.writes == ()
    older = plan_profile(Member("erin@acme.com", name="Old"), "acme", "2000-01-01", InstanceView(
        "bob.acme.twake.app", contacts=(stored,)))
    assert older.writes == ()
    assert plan_profile(user.member, "acme", user.stamp, InstanceView("erin.acme.twake.app")).writes == ()


def test_deletion_limits_are_a_count_or_a_percentage_of_the_managed_documents():
    assert DeletionLimit.parse("50").allowed(10_000) == 50
    assert DeletionLimit.parse("10%").allowed(45) == 4
    assert str(DeletionLimit.parse(" 5 % ")) == "5%"
    for text in ("lots", "-1", "101%", "1.5"):
        with pytest.raises(ConfigError):
            DeletionLimit.parse(text)
