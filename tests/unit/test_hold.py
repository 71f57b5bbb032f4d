"""The mass-removal hold's arithmetic: what a removal takes away, the window, the threshold, whose count."""

import json

from couchsync.events import parse_event
from couchsync.hold import HoldSettings, RemovalWindow, decide, memberships, needs_total, taken_away
from couchsync.state import GroupState

MEMBERS = [f"m{i:03d}@acme.com" for i in range(200)]


def group(external_id: str, emails) -> GroupState:
    state = GroupState("acme", external_id)
    state = state.merged(event("b2b.group.created", external_id, emails, minute=0, name=external_id))
    return state


def event(routing_key: str, external_id: str, emails=(), minute=30, **fields):
    body = {"timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": external_id,
            "members": [{"email": email} for email in emails], **fields}
    return parse_event(routing_key, json.dumps(body))


def removal(email: str, external_id: str = "g0"):
    return event("b2b.group.member.removed", external_id, [email])


STATES = {f"g{g}": group(f"g{g}", MEMBERS[g * 50:(g + 1) * 50]) for g in range(4)}  # 200 memberships


def test_a_removal_takes_away_only_current_memberships_and_a_deletion_every_member():
    assert memberships(STATES.values()) == 200
    assert taken_away(removal("m000@acme.com"), STATES["g0"]) == 1
    assert taken_away(removal("m100@acme.com"), STATES["g0"]) == 0  # not a member of g0
    assert taken_away(event("b2b.group.deleted", "g1"), STATES["g1"]) == 50
    assert taken_away(event("b2b.group.member.added", "g1", ["new@acme.com"]), STATES["g1"]) == 0


def test_sixty_removals_of_two_hundred_memberships_hold_those_from_the_fiftieth():
    settings, window = HoldSettings(), RemovalWindow(900)
    removals = [removal(email, f"g{i // 50}") for i, email in enumerate(MEMBERS[:60])]
    assert not needs_total(removals[:49], STATES, window, settings, 0.0)
    decisions = decide(removals, STATES, window, settings, 0.0, total=200)
    assert decisions == [1] * 49 + [-1] * 11
    # The burst goes on: held ones count too, so the next removal waits as well, until the window slides.
    assert decide([removal("m070@acme.com", "g1")], STATES, window, settings, 899.0, 200) == [-1]
    assert decide([removal("m071@acme.com", "g1")], STATES, window, settings, 901.0, 200) == [1]


def test_the_threshold_needs_both_the_share_and_the_minimum():
    settings = HoldSettings(percent=10, minimum=50)
    assert not settings.exceeded(50, 1000)   # 5%: below the share
    assert not settings.exceeded(49, 100)    # 49%: below the minimum
    assert settings.exceeded(50, 400) and not settings.exceeded(40, 400)
    assert not HoldSettings(percent=100).exceeded(10_000, 10_000)


def test_each_worker_counts_its_own_share_of_an_organizations_removals():
    """Until one worker has each organization, two workers sharing a burst hold only past their own share."""
    settings = HoldSettings()
    first, second = RemovalWindow(900), RemovalWindow(900)
    removals = [removal(email, f"g{i // 50}") for i, email in enumerate(MEMBERS[:120])]
    by_first = decide(removals[0::2], STATES, first, settings, 0.0, total=200)
    by_second = decide(removals[1::2], STATES, second, settings, 0.0, total=200)
    assert by_first == by_second == [1] * 49 + [-1] * 11
    assert first.count("acme", 1.0) == second.count("acme", 1.0) == 60
    assert first.count("other", 1.0) == 0
