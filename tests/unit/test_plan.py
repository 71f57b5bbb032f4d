import json

import pytest

from couchsync.documents import CONTACTS, GROUPS, group_ids_of, managed_contact_id, managed_group_id
from couchsync.events import parse_event
from couchsync.plan import InstanceView, display_name, plan_group_event
from couchsync.state import GroupState, PersonState
from couchsync.events import Member

from tests.unit.fake_instance import FakeInstance

GID = managed_group_id("acme", "engineering")
BOB = {"username": "bob", "email": "bob@acme.com", "firstName": "Bob", "lastName": "Martin",
       "workplaceFqdn": "bob.acme.twake.app"}
ALICE = {"email": "alice@acme.com", "username": "alice", "workplaceFqdn": "alice.acme.twake.app"}
BOB_ID = managed_contact_id("acme", "bob@acme.com")
ALICE_ID = managed_contact_id("acme", "alice@acme.com")


def event(routing_key, minute=30, **fields):
    body = {"timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": "engineering",
            **fields}
    if routing_key == "b2b.group.created":
        body.setdefault("name", "Engineering")
    return parse_event(routing_key, json.dumps(body))


def created(minute=30, members=(BOB, ALICE), **fields):
    return event("b2b.group.created", minute, members=list(members), **fields)


def project(one, view):
    """The projection into `view` of the state that this one event alone gives."""
    state = GroupState("acme", "engineering").merged(one)
    people = {m.email.lower(): PersonState.of("acme", m, one.stamp) for m in one.members}
    return plan_group_event(state, people, view, named=set(people))


def test_created_on_an_empty_instance_writes_the_group_and_a_contact_per_member():
    carol = FakeInstance("carol.acme.twake.app")
    plan = carol.apply(created(description="Engineering team", color="#3366FF",
                               createdAt="2026-06-16T10:30:00Z"))
    assert sorted(w.summary for w in plan.writes) == ["create contact", "create contact", "create group"]
    group = carol.docs[GROUPS][GID]
    assert {k: group[k] for k in ("name", "description", "color", "createdAt")} == {
        "name": "Engineering", "description": "Engineering team", "color": "#3366FF",
        "createdAt": "2026-06-16T10:30:00Z"}
    assert group["twakeDirectory"]["managed"] is True and group["twakeDirectory"]["externalId"] == "engineering"
    bob = carol.docs[CONTACTS][BOB_ID]
    assert bob["fullname"] == bob["displayName"] == "Bob Martin"
    assert bob["email"] == [{"address": "bob@acme.com", "primary": True}]
    assert bob["cozy"] == [{"url": "https://bob.acme.twake.app", "primary": True}]
    assert bob["metadata"] == {"external": True} and bob["trustedForSharing"] is True
    assert bob["indexes"] == {"byFamilyNameGivenNameEmailCozyUrl": "https://bob.acme.twake.app"}
    assert group_ids_of(bob) == [GID]
    assert {k: v for k, v in bob["twakeDirectory"].items() if k != "stamp"} == {
        "managed": True, "kind": "contact", "organizationId": "acme", "username": "bob",
        "email": "bob@acme.com", "workplaceFqdn": "bob.acme.twake.app"}


@pytest.mark.parametrize("owner_email, domain", [
    (None, "bob.acme.twake.app"),               # by the workplace FQDN
    ("Bob@Acme.com", "cozy-bob.example.net"),   # by the instance's settings email
])
def test_a_member_is_never_added_to_their_own_instance(owner_email, domain):
    own = FakeInstance(domain, owner_email)
    own.apply(created())
    assert BOB_ID not in own.docs[CONTACTS] and ALICE_ID in own.docs[CONTACTS]


def test_planning_again_after_applying_gives_no_writes():
    carol = FakeInstance("carol.acme.twake.app")
    for step in (created(), event("b2b.group.member.removed", 31, members=[BOB]),
                 event("b2b.group.updated", 32, name="Eng"), event("b2b.group.deleted", 33)):
        carol.apply(step)
        assert carol.plan(step).writes == ()


def test_an_unmanaged_document_with_the_group_id_is_refused_and_nothing_planned():
    view = InstanceView("carol.acme.twake.app", groups={GID: {"_id": GID, "_rev": "1-a", "name": "mine"}})
    plan = project(created(), view)
    assert plan.writes == ()
    assert plan.refusals[0].doc_id == GID and "unmanaged" in plan.refusals[0].reason


def test_a_personal_contact_with_a_members_email_is_refused_and_left_alone():
    mine = {"_id": "mine", "_rev": "1-a", "fullname": "Bobby", "email": [{"address": "bob@acme.com"}]}
    plan = project(created(members=[BOB]), InstanceView("carol.acme.twake.app", contacts=(mine,)))
    assert [w.doc["_id"] for w in plan.writes] == [GID]
    assert "mine" in plan.refusals[0].reason


def test_an_unmanaged_document_at_a_members_contact_id_is_a_refusal_and_the_others_are_planned():
    # Issue 18, finding 2: planning a creation there made every event a 409, retried, then dead-lettered.
    squat = {"_id": BOB_ID, "_rev": "1-a", "fullname": "x"}
    plan = project(created(), InstanceView("carol.acme.twake.app", contacts=(squat,)))
    assert sorted(w.doc["_id"] for w in plan.writes) == sorted([GID, ALICE_ID])
    assert [r.reason for r in plan.refusals] == [
        f"an unmanaged document has the managed contact id {BOB_ID} of bob@acme.com"]


def test_an_external_contact_is_reused_becomes_managed_and_keeps_its_other_fields():
    external = {"_id": "ext", "_rev": "3-a", "fullname": "B. Martin", "email": [{"address": "BOB@acme.com"}],
                "phone": [{"number": "+33 6"}], "metadata": {"external": True, "source": "import"},
                "relationships": {"groups": {"data": [{"_id": "own", "_type": "io.cozy.contacts.groups"}]}}}
    plan = project(created(members=[BOB]), InstanceView("carol.acme.twake.app", contacts=(external,)))
    doc = next(w.doc for w in plan.writes if w.doctype == CONTACTS)
    assert doc["_id"] == "ext" and doc["_rev"] == "3-a"
    assert doc["twakeDirectory"]["managed"] is True
    assert doc["phone"] == [{"number": "+33 6"}] and doc["metadata"]["source"] == "import"
    assert doc["email"] == [{"address": "BOB@acme.com"}]  # already there, whatever its case
    assert group_ids_of(doc) == ["own", GID]


@pytest.mark.parametrize("late", [
    event("b2b.group.updated", 29, name="older name"),
    created(29, members=(), name="older create"),
])
def test_an_older_event_changes_nothing(late):
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created(30))
    carol.apply(event("b2b.group.updated", 31, name="Newest"))
    assert carol.plan(late).writes == ()
    assert carol.docs[GROUPS][GID]["name"] == "Newest"


def test_updated_with_an_empty_string_clears_and_absent_keeps():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created(description="Team", color="#000"))
    carol.apply(event("b2b.group.updated", 31, description=""))
    # As the stack does it: a description cleared is removed from the document, not written empty.
    assert "description" not in carol.docs[GROUPS][GID] and carol.docs[GROUPS][GID]["color"] == "#000"
    carol.apply(event("b2b.group.updated", 32, name="  "))
    assert carol.docs[GROUPS][GID]["name"] == "Engineering"  # an empty name keeps the name


def test_deleted_removes_relationships_then_deletes_the_group_and_keeps_other_relationships():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created())
    bob = carol.docs[CONTACTS][BOB_ID]
    carol.put(CONTACTS, {**bob, "relationships": {"groups": {"data": [
        {"_id": "own", "_type": "io.cozy.contacts.groups"}, {"_id": GID, "_type": "io.cozy.contacts.groups"}]}}})
    plan = carol.apply(event("b2b.group.deleted", 31))
    assert [w.doctype for w in plan.writes] == [CONTACTS, CONTACTS, GROUPS]  # contacts let go first
    deletion = plan.writes[-1].doc
    assert GID not in carol.docs[GROUPS] and deletion == {"_id": GID, "_rev": deletion["_rev"], "_deleted": True}
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == ["own"]
    assert group_ids_of(carol.docs[CONTACTS][ALICE_ID]) == []


def test_member_added_before_the_group_exists_is_kept_until_it_is_created():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(event("b2b.group.member.added", 31, members=[BOB]))
    assert GID not in carol.docs[GROUPS]  # remembered in the state only
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == []
    carol.apply(created(30, members=()))
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == [GID]


def test_a_late_member_added_does_not_resurrect_a_deleted_groups_membership():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created(30, members=()))
    carol.apply(event("b2b.group.deleted", 32))
    carol.apply(event("b2b.group.member.added", 31, members=[BOB]))
    carol.apply(created(33, members=()))  # re-created later: Bob was added before the deletion
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == []


def test_member_removed_for_a_contact_never_given_is_not_an_error():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created(members=()))
    plan = carol.apply(event("b2b.group.member.removed", 31, members=[BOB]))
    assert plan.refusals == () and BOB_ID not in carol.docs[CONTACTS]
    assert plan.writes == ()  # the removal is remembered in the state alone


def test_a_profile_from_an_older_event_does_not_overwrite_a_newer_one():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(event("b2b.group.member.added", 32, members=[{**BOB, "lastName": "Newer"}]))
    carol.apply(created(30, members=[{**BOB, "lastName": "Older"}]))
    assert carol.docs[CONTACTS][BOB_ID]["fullname"] == "Bob Newer"


@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_a_later_partial_profile_keeps_the_other_fields_and_an_emails_case_renames_nobody(order):
    # Issue 18, finding 11: `member.added` with only {"email": "BOB@ACME.COM"} removed Bob's Cozy URL,
    # renamed him "BOB" and replaced his email entry.
    events = [created(30, members=[BOB]), event("b2b.group.member.added", 31, members=[{"email": "BOB@ACME.COM"}])]
    carol = FakeInstance("carol.acme.twake.app")
    for one in events if order == "in order" else events[::-1]:
        carol.apply(one)
    bob = carol.docs[CONTACTS][BOB_ID]
    assert (bob["fullname"], bob["email"], bob["cozy"]) == (
        "Bob Martin", [{"address": "bob@acme.com", "primary": True}],
        [{"url": "https://bob.acme.twake.app", "primary": True}])
    assert bob["twakeDirectory"]["email"] == "bob@acme.com" and bob["twakeDirectory"]["username"] == "bob"


@pytest.mark.parametrize("member, name", [
    (Member("b@x.y", name="Robert", first_name="Bob"), "Robert"),
    (Member("b@x.y", first_name="Bob", last_name="Martin"), "Bob Martin"),
    (Member("b@x.y", last_name="Martin", username="bob"), "Martin"),
    (Member("b@x.y", username="bob"), "bob"),
    (Member("b.m@x.y"), "b.m"),
])
def test_display_name_rules(member, name):
    assert display_name(member) == name


def test_joining_two_memories_gives_the_memory_of_both_event_sets_in_either_order():
    def memory(events):
        state = GroupState("acme", "engineering")
        for one in events:
            state = state.merged(one)
        return state

    first = [event("b2b.group.updated", 33, name="Platform"), event("b2b.group.member.added", 34, members=[BOB])]
    second = [created(30, members=[ALICE]), event("b2b.group.updated", 31, name="Old", color="#000"),
              event("b2b.group.member.removed", 35, members=[BOB]), event("b2b.group.deleted", 36)]
    both = memory(first + second)
    assert memory(first).joined(memory(second)) == both == memory(second).joined(memory(first))
    assert memory(first).joined(memory(first)) == memory(first)
    assert (both.alive, both.values["name"], both.values["color"]) == (False, "Platform", "#000")
