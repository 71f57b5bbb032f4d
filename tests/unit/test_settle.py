"""Settling: which documents are read again when, and what their conflicts call for (no I/O)."""

from __future__ import annotations

from couchsync.documents import CONTACTS, GROUPS, managed_contact_id, managed_group_id
from couchsync.instances import Instance
from couchsync.settle import STATE, Repair, Settling, joined_repairs, repairs_of, unsettled
from couchsync.state import GroupState, PersonState, group_state_id, person_state_id

CAROL = Instance("carol.acme.twake.app", "carol", "acme")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_what_was_written_is_due_once_the_delay_has_passed_and_only_once():
    clock = Clock()
    settling = Settling(5, clock=clock)
    settling.written(CAROL, CONTACTS, ["a", "b"])
    clock.now += 3
    settling.written(CAROL, CONTACTS, ["b"], deleted=["c"])  # b written again: due later
    settling.written(None, STATE, ["s"])
    assert settling.due() == {}
    assert settling.waiting() == 5
    clock.now += 2
    assert settling.due() == {(CAROL, CONTACTS): {"a": False}}
    clock.now += 3
    assert settling.due() == {(CAROL, CONTACTS): {"b": False, "c": True}, (None, STATE): {"s": False}}
    assert settling.due(everything=True) == {} and settling.waiting() == 0


def test_everything_is_due_at_once_when_asked_and_nothing_is_kept_without_a_delay():
    settling = Settling(60)
    settling.written(CAROL, GROUPS, ["g"])
    assert settling.due(everything=True) == {(CAROL, GROUPS): {"g": False}}
    off = Settling(0)
    off.written(CAROL, GROUPS, ["g"])
    off.contact_merged(CAROL, {"_id": "c", "twakeDirectory": {"organizationId": "acme", "email": "Bob@acme.com"}})
    off.state_joined(GroupState("acme", "sales"))
    off.failed(Repair("acme", groups=frozenset({"sales"})))
    assert off.due(everything=True) == {} and off.repairs() == []


def test_a_merged_contact_asks_for_its_person_to_be_projected_again_in_its_instance():
    merged: list[int] = []
    settling = Settling(5, merged.append)
    settling.merged(0)
    settling.merged(2)
    bob = {"_id": "c", "twakeDirectory": {"managed": True, "organizationId": "acme", "email": "Bob@acme.com"}}
    settling.contact_merged(CAROL, bob)
    settling.contact_merged(CAROL, {"_id": "d", "fullname": "not managed"})
    assert merged == [2]
    assert settling.repairs() == [Repair("acme", emails=frozenset({"bob@acme.com"}), domain=CAROL.domain)]
    assert settling.repairs() == []


def test_a_state_joined_by_a_read_asks_for_a_whole_projection_everywhere():
    settling = Settling(5)
    settling.state_joined(GroupState("acme", "sales"))
    settling.state_joined(PersonState("acme", "bob@acme.com"))
    assert settling.repairs() == [Repair("acme", groups=frozenset({"sales"})),
                                  Repair("acme", emails=frozenset({"bob@acme.com"}))]
    assert settling.repairs() == []


def test_a_failed_repair_is_made_again_once_the_delay_has_passed():
    clock = Clock()
    settling = Settling(5, clock=clock)
    sales = Repair("acme", groups=frozenset({"sales"}))
    settling.failed(sales)
    assert settling.repairs() == [] and settling.pending() == 1
    clock.now += 5
    assert settling.repairs() == [sales] and settling.pending() == 0
    settling.failed(sales)
    assert settling.repairs(everything=True) == [sales]


def test_pending_counts_what_waits_and_the_checks_running_until_they_end():
    settling = Settling(5)
    settling.written(CAROL, CONTACTS, ["a", "b"])
    settling.state_joined(GroupState("acme", "sales"))
    assert settling.pending() == 3
    with settling.checking():
        settling.due(everything=True)
        settling.repairs()
        assert settling.pending() == 1
    assert settling.pending() == 0


def test_unsettled_documents_have_several_leaves_or_live_where_they_were_deleted():
    leaves = {"two": [{"_id": "two", "_rev": "2-a"}, {"_id": "two", "_rev": "2-b"}],
              "one": [{"_id": "one", "_rev": "1-a"}],
              "back": [{"_id": "back", "_rev": "3-a"}]}
    written = {"two": False, "one": False, "back": True, "gone": True}
    assert unsettled(leaves, written) == [leaves["two"], leaves["back"]]


def test_a_conflicted_state_is_repaired_everywhere_and_a_managed_document_in_its_instance():
    group = GroupState("acme", "sales")
    person = PersonState("acme", "bob@acme.com")
    state_leaves = [[{"_id": group_state_id("acme", "sales"), **group.to_doc()}] * 2,
                    [{"_id": person_state_id("acme", "bob@acme.com"), **person.to_doc()}] * 2]
    assert repairs_of((None, STATE), state_leaves) == [
        Repair("acme", groups=frozenset({"sales"}), emails=frozenset({"bob@acme.com"}))]
    group_doc = {"_id": managed_group_id("acme", "sales"),
                 "twakeDirectory": {"managed": True, "organizationId": "acme", "externalId": "sales"}}
    contact = {"_id": managed_contact_id("acme", "bob@acme.com"),
               "twakeDirectory": {"managed": True, "organizationId": "acme", "email": "Bob@acme.com"}}
    assert repairs_of((CAROL, GROUPS), [[group_doc, group_doc]]) == [
        Repair("acme", groups=frozenset({"sales"}), domain=CAROL.domain)]
    assert repairs_of((CAROL, CONTACTS), [[contact, {"_id": contact["_id"]}], [{"_id": "mine"}] * 2]) == [
        Repair("acme", emails=frozenset({"bob@acme.com"}), domain=CAROL.domain)]


def test_repairs_are_joined_by_organization_and_place():
    repairs = [Repair("acme", groups=frozenset({"a"})), Repair("acme", emails=frozenset({"x"})),
               Repair("acme", groups=frozenset({"b"}), domain="carol"), Repair("other", groups=frozenset({"a"}))]
    assert joined_repairs(repairs) == [
        Repair("acme", groups=frozenset({"a"}), emails=frozenset({"x"})),
        Repair("acme", groups=frozenset({"b"}), domain="carol"),
        Repair("other", groups=frozenset({"a"}))]
