"""Absence is never deletion: a group state that was lost (purged, its database deleted) deletes nothing."""

from couchsync.documents import CONTACTS, GROUPS, group_ids_of
from couchsync.state import GroupState, group_state_id

from tests.unit.fake_instance import FakeInstance
from tests.unit.test_plan import ALICE, ALICE_ID, BOB, BOB_ID, GID, created, event


def _lose_group_state(instance: FakeInstance) -> None:
    del instance.states[group_state_id("acme", "engineering")]


def test_member_added_after_the_group_state_was_lost_keeps_the_group_and_its_members():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created(members=[BOB]))
    _lose_group_state(carol)
    plan = carol.apply(event("b2b.group.member.added", 40, members=[ALICE]))
    assert not [w for w in plan.writes if w.doc.get("_deleted")]
    assert GID in carol.docs[GROUPS]
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == [GID]
    assert group_ids_of(carol.docs[CONTACTS][ALICE_ID]) == [GID]  # the group is there: related


def test_member_removed_after_the_group_state_was_lost_removes_only_that_membership():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created(members=[BOB, ALICE]))
    _lose_group_state(carol)
    carol.apply(event("b2b.group.member.removed", 40, members=[{"email": "alice@acme.com"}]))
    assert GID in carol.docs[GROUPS]
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == [GID]
    assert group_ids_of(carol.docs[CONTACTS][ALICE_ID]) == []


def test_a_recorded_deletion_still_deletes_the_group():
    carol = FakeInstance("carol.acme.twake.app")
    carol.apply(created(members=[BOB]))
    carol.apply(event("b2b.group.deleted", 40))
    assert GID not in carol.docs[GROUPS]
    assert group_ids_of(carol.docs[CONTACTS][BOB_ID]) == []


def test_a_membership_of_a_group_not_in_the_instance_adds_no_relationship():
    state = GroupState("acme", "engineering", members={"bob@acme.com": ("2026-06-16T10:30:00Z#1", True)})
    assert not state.known
    assert state.relation("bob@acme.com", present=False) is None
    assert state.relation("bob@acme.com", present=True) is True
    assert state.relation("nobody@acme.com", present=True) is None
