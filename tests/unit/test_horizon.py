"""The state's horizon (issue 24): removals older than it are forgotten, the group's older events refused.

Stamps here are fixed dates: the horizon trails the group's newest stamp, never the clock, so these tests
give the same answers whatever day they run.
"""

import json
from datetime import datetime, timedelta

from couchsync.events import parse_event
from couchsync.state import HORIZON, GroupState, admit, horizon_of

KEEP = timedelta(days=90)
BOB, ALICE, CAROL = ({"email": f"{name}@acme.com"} for name in ("bob", "alice", "carol"))


def event(routing_key, day, **fields):
    """A group event of `engineering`, stamped `day` days after 2026-01-01."""
    timestamp = f"{datetime(2026, 1, 1, 10) + timedelta(days=day):%Y-%m-%dT%H:%M:%SZ}"
    body = {"timestamp": timestamp, "organizationId": "acme", "id": "engineering", **fields}
    if routing_key.endswith("created"):
        body.setdefault("name", "Engineering")
    return parse_event(routing_key, json.dumps(body))


def added(day, *members):
    return event("b2b.group.member.added", day, members=list(members))


def removed(day, *members):
    return event("b2b.group.member.removed", day, members=list(members))


def state_of(*batches):
    """The stored state after admitting each batch in turn; the events refused as stale."""
    state, stale = None, []
    for batch in batches:
        admission = admit(state, batch, KEEP)
        state, stale = admission.state, stale + list(admission.stale)
    return state, stale


def test_a_removal_older_than_the_horizon_is_forgotten_and_the_rest_is_kept():
    state, stale = state_of([event("b2b.group.created", 0, members=[ALICE, BOB])], [removed(1, BOB)],
                            [added(150, CAROL)])
    assert stale == []
    assert set(state.members) == {"alice@acme.com", "carol@acme.com"}  # bob's removal went, alice stays
    assert state.horizon == horizon_of(added(150, CAROL).stamp, KEEP) == "2026-03-02T10:00:00.000000Z"
    assert state.alive and state.values["name"] == "Engineering"  # fields and existence are never forgotten


def test_a_recent_removal_is_kept_until_the_newest_stamp_is_past_it_by_the_horizon():
    state, _ = state_of([added(0, BOB)], [removed(100, BOB)], [added(150, CAROL)])
    assert state.membership("bob@acme.com") is False  # 50 days old: remembered
    state, _ = state_of([added(0, BOB)], [removed(100, BOB)], [added(191, CAROL)])
    assert state.membership("bob@acme.com") is None  # 91 days old: forgotten


def test_an_addition_older_than_the_horizon_is_refused_and_resurrects_nobody():
    # Bob was added on day 2 and removed on day 3; the addition arrives only after the removal was forgotten.
    late = added(2, BOB)
    state, stale = state_of([removed(3, BOB)], [added(150, CAROL)], [late])
    assert stale == [late]
    assert not state.is_member("bob@acme.com") and state.membership("bob@acme.com") is None


def test_an_event_newer_than_the_horizon_still_applies_whatever_its_arrival():
    state, stale = state_of([removed(3, BOB)], [added(150, CAROL)], [added(100, BOB)])
    assert stale == [] and state.membership("bob@acme.com") is True


def test_within_a_batch_the_newest_event_sets_the_horizon_for_the_others():
    old, new = added(0, BOB), added(120, CAROL)
    state, stale = state_of([old, new])
    assert stale == [old] and set(state.members) == {"carol@acme.com"}


def test_fixed_stamps_close_together_are_never_refused_nor_forgotten():
    minutes = [parse_event("b2b.group.member." + kind, json.dumps({
        "timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": "engineering",
        "members": [BOB]})) for minute, kind in ((0, "added"), (1, "removed"), (2, "added"), (3, "removed"))]
    state, stale = state_of(*([one] for one in reversed(minutes)))
    assert stale == [] and state.membership("bob@acme.com") is False
    assert state.horizon == "2026-03-18T10:03:00.000000Z"  # 90 days before the newest stamp, not before today


def test_the_horizon_never_moves_back_when_the_window_is_widened():
    state, _ = state_of([removed(0, BOB)], [added(150, CAROL)])
    widened = admit(state, [added(151, ALICE)], timedelta(days=365))
    assert widened.state.horizon == state.horizon
    assert admit(widened.state, [added(2, BOB)], timedelta(days=365)).stale  # still refused


def test_the_horizon_is_stored_and_joined_as_the_newer_of_two():
    state, _ = state_of([removed(0, BOB)], [added(150, CAROL)])
    assert GroupState.from_doc(state.to_doc()) == state and state.to_doc()["stamps"][HORIZON] == state.horizon
    older, _ = state_of([removed(0, BOB)], [added(100, CAROL)])
    assert older.joined(state).horizon == state.joined(older).horizon == state.horizon


def test_no_horizon_before_year_one_nor_for_a_seeded_state():
    assert horizon_of("0001-01-02T00:00:00.000000Z#0#x", KEEP) == ""
    assert horizon_of("0000-00-00T00:00:00.000000Z#0#seed", KEEP) == ""
    assert GroupState("acme", "engineering").newest == ""


def test_an_old_event_the_state_holds_already_is_a_redelivery_not_a_stale_event():
    first = event("b2b.group.created", 0, members=[ALICE])
    state, stale = state_of([first], [added(150, CAROL)], [first])
    assert stale == [] and state.is_member("alice@acme.com")
