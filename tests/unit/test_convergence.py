"""Convergence: any delivery order of the same events, with duplicates, gives in-order's documents.

In-order means sorted by stamp (timestamp, then kind, then body digest: see couchsync.events).
"""

from __future__ import annotations

import json
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st

from couchsync.events import GroupEventKind, parse_event
from couchsync.state import GroupState

from tests.unit.fake_instance import FakeInstance

GROUPS = ["engineering", "sales"]
# People as the directory describes them: each has their own emails (case varies) and Cozy URLs.
# Carol owns the instance under test. One email given two people's Cozy URLs is contradictory input,
# whose outcome depends on arrival (see README, "Order, duplicates and convergence").
PEOPLE = {
    "bob": (["bob@acme.com", "Bob@acme.com"], [None, "bob.acme.twake.app", "bob2.acme.twake.app"]),
    "alice": (["alice@acme.com"], [None, "alice.acme.twake.app"]),
    "carol": (["carol@acme.com"], [None, "carol.acme.twake.app"]),
}
NAMES = ["Bob", "Robert", None]


@st.composite
def member(draw):
    emails, fqdns = PEOPLE[draw(st.sampled_from(sorted(PEOPLE)))]
    fields = {"email": draw(st.sampled_from(emails)), "workplaceFqdn": draw(st.sampled_from(fqdns)),
              "firstName": draw(st.sampled_from(NAMES))}
    return {key: value for key, value in fields.items() if value is not None}


members = st.lists(member(), min_size=1, max_size=2)


@st.composite
def events(draw):
    kind = draw(st.sampled_from(["created", "updated", "deleted", "member.added", "member.removed"]))
    body = {"timestamp": f"2026-06-16T10:{draw(st.integers(0, 5)):02d}:00Z", "organizationId": "acme",
            "id": draw(st.sampled_from(GROUPS))}
    if kind == "created":
        body.update(name=draw(st.sampled_from(["Eng", "Team"])), members=draw(st.lists(member(), max_size=2)))
    elif kind == "updated":
        body.update(draw(st.dictionaries(st.sampled_from(["name", "description", "color"]),
                                         st.sampled_from(["", "A", "B"]), min_size=1)))
    elif kind.startswith("member"):
        body["members"] = draw(members)
    routing_key = "b2b.group." + kind
    return parse_event(routing_key, json.dumps(body))


def final_documents(sequence):
    """The documents the events leave, applied one by one in this order."""
    return batched_documents([[event] for event in sequence])


def batched_documents(batches):
    """The documents the batches of events leave, each batch applied together, in this order."""
    return applied(batches).docs


def applied(batches, horizon=timedelta(days=90)):
    """The instance the batches of events leave, each batch applied together, in this order; its documents
    without revisions."""
    instance = FakeInstance("carol.acme.twake.app", owner_email="carol@acme.com", horizon=horizon)
    for batch in batches:
        instance.apply_batch(batch)
    instance.docs = {doctype: {doc_id: {k: v for k, v in doc.items() if k != "_rev"} for doc_id, doc in docs.items()}
                     for doctype, docs in instance.docs.items()}
    return instance


def describe(sequence):
    return "; ".join(f"{e.routing_key[10:]} {e.group_id} {e.stamp[11:16]}#{e.stamp[28:]}"
                     f" {[(m.email, m.workplace_fqdn) for m in e.members]}" for e in sequence)


def differences(got, want):
    """Which document fields differ, for a readable failure."""
    lines = []
    for doctype in want:
        for doc_id in sorted(set(got[doctype]) | set(want[doctype])):
            a, b = got[doctype].get(doc_id, {}), want[doctype].get(doc_id, {})
            lines += [f"{doc_id}.{key}: delivered {a.get(key)!r} != in order {b.get(key)!r}"
                      for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return "\n".join(lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=10), st.data())
def test_any_delivery_order_with_duplicates_gives_the_in_order_documents(sequence, data):
    in_order = sorted(sequence, key=lambda event: event.stamp)
    delivered = data.draw(st.permutations(sequence + data.draw(st.lists(st.sampled_from(sequence), max_size=4))))
    got, want = final_documents(delivered), final_documents(in_order)
    assert got == want, differences(got, want) + "\ndelivered: " + describe(delivered)


@settings(max_examples=100, deadline=None)
@given(st.lists(events(), min_size=1, max_size=10))
def test_applying_everything_again_writes_nothing(sequence):
    instance = FakeInstance("carol.acme.twake.app", owner_email="carol@acme.com")
    for event in sequence:
        instance.apply(event)
    assert all(instance.plan(event).writes == () for event in sequence)


@st.composite
def recreations(draw):
    """A group created, deleted and created again (and maybe again), with additions and removals
    before, between and after, at distinct or colliding minutes."""
    lives = draw(st.integers(2, 3))
    minute = 0
    sequence = []

    def body(**fields):
        return {"timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": "engineering",
                **fields}
    for life in range(lives):
        minute += draw(st.integers(0, 2))
        sequence.append(parse_event("b2b.group.created", json.dumps(body(
            name=f"Eng {life}", members=draw(st.lists(member(), max_size=2))))))
        for _ in range(draw(st.integers(0, 3))):
            minute += draw(st.integers(0, 2))
            kind = draw(st.sampled_from(["member.added", "member.removed"]))
            sequence.append(parse_event("b2b.group." + kind, json.dumps(body(members=draw(members)))))
        if life < lives - 1 or draw(st.booleans()):
            minute += draw(st.integers(0, 2))
            sequence.append(parse_event("b2b.group.deleted", json.dumps(body())))
    return sequence


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recreations(), st.data())
def test_a_group_deleted_and_created_again_converges_whatever_the_delivery(sequence, data):
    in_order = sorted(sequence, key=lambda event: event.stamp)
    delivered = data.draw(st.permutations(sequence + data.draw(st.lists(st.sampled_from(sequence), max_size=4))))
    got, want = final_documents(delivered), final_documents(in_order)
    assert got == want, differences(got, want) + "\ndelivered: " + describe(delivered)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=12), st.data())
def test_any_sequence_cut_into_any_batches_in_any_order_gives_the_in_order_documents(sequence, data):
    # Issue 16: the worker applies an organization's waiting events together (merged, then projected once).
    # Issue 24: with a horizon (3 minutes here, over events 5 minutes apart at most) removals are forgotten and
    # older events refused: the documents are those of the events not refused, applied in stamp order.
    delivered = data.draw(st.permutations(sequence + data.draw(st.lists(st.sampled_from(sequence), max_size=4))))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(delivered) - 1, 1)), max_size=len(delivered))))
    batches = [delivered[start:end] for start, end in zip([0, *cuts], [*cuts, len(delivered)]) if delivered[start:end]]
    instance = applied(batches, SHORT_HORIZON)
    admitted = sorted(set(instance.admitted), key=lambda e: e.stamp)
    in_order = applied([[e] for e in admitted], SHORT_HORIZON)
    got, want = instance.docs, in_order.docs
    assert got == want, differences(got, want) + "\nbatches: " + " | ".join(describe(batch) for batch in batches)
    assert in_order.stale == [], "in stamp order, no event is older than the horizon its predecessors set"
    horizons = {state.external_id: state.horizon for state in instance.states.values() if isinstance(state, GroupState)}
    assert all(e.stamp < horizons[e.group_id] for e in instance.stale)
    tally("an event refused as stale" if instance.stale else "no event refused")
    tally("a removal forgotten" if any(
        e.kind is GroupEventKind.MEMBERS_REMOVED and any(m.email.lower() not in state.members for m in e.members)
        for e in admitted for state in instance.states.values()
        if isinstance(state, GroupState) and state.external_id == e.group_id) else "no removal forgotten")


SHORT_HORIZON = timedelta(minutes=3)
