"""The mass-removal hold's arithmetic (pure: the clock is given): what a removal takes away, and when to hold.

A broken publisher (a directory bug, an import gone wrong) can send `member.removed` for a whole
organization, and every member's contacts would be emptied within seconds. So, per organization and
over a sliding window, the worker counts the memberships that removals and group deletions would take
away, read from the state *before* they are merged; once the count is above the threshold (more than
`percent` of the organization's memberships and at least `minimum`), further removals and deletions
are held for a person to release or drop. What is held counts in the window too: a hold goes on while
the burst does.

Each worker counts the removals it handled itself. With partitions (`couchsync.partitions`) an
organization is served by one worker at a time, so that is the organization's count; when its partition
passes to another worker (a failover, a rebalance) the new one starts from zero, and at worst twice the
threshold is applied within one window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from couchsync.events import GroupEvent, GroupEventKind
from couchsync.state import GroupState

DEFAULT_WINDOW = 900.0  # seconds: 15 minutes
DEFAULT_PERCENT = 10.0
DEFAULT_MINIMUM = 50


@dataclass(frozen=True, slots=True)
class HoldSettings:
    """When removals are held: past `percent` of the organization's memberships and `minimum` at least,
    within `window` seconds. A `percent` of 100 turns the hold off."""

    window: float = DEFAULT_WINDOW
    percent: float = DEFAULT_PERCENT
    minimum: int = DEFAULT_MINIMUM

    @property
    def enabled(self) -> bool:
        return self.percent < 100

    def exceeded(self, count: int, total: int) -> bool:
        """Whether taking `count` memberships of an organization holding `total` is a mass removal."""
        return self.enabled and count >= self.minimum and count * 100 > total * self.percent


def taken_away(event: GroupEvent, state: GroupState) -> int:
    """How many memberships the event would take away from the group's state as it is (before the merge)."""
    if event.kind is GroupEventKind.DELETED:
        return sum(1 for email in state.members if state.is_member(email))
    if event.kind is GroupEventKind.MEMBERS_REMOVED:
        return sum(1 for member in event.members if state.is_member(member.email))
    return 0


def memberships(states: Iterable[GroupState]) -> int:
    """The organization's memberships now: every member of every living group."""
    return sum(1 for state in states for email in state.members if state.is_member(email))


@dataclass
class RemovalWindow:
    """One worker's count, per organization, of memberships taken away (or held) over the last `window`."""

    window: float
    _seen: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def count(self, organization_id: str, now: float) -> int:
        """Memberships counted for the organization within the window ending `now`."""
        seen = self._seen.get(organization_id)
        if seen is None:
            return 0
        while seen and seen[0][0] <= now - self.window:
            seen.popleft()
        if not seen:
            del self._seen[organization_id]
            return 0
        return sum(taken for _, taken in seen)

    def add(self, organization_id: str, now: float, taken: int) -> None:
        if taken > 0:
            self._seen.setdefault(organization_id, deque()).append((now, taken))

    def withdraw(self, organization_id: str, now: float, taken: int) -> None:
        """Take back a count added for removals that were neither applied nor held (they come again)."""
        if taken > 0:
            self._seen.setdefault(organization_id, deque()).append((now, -taken))


def decide(events: Iterable[GroupEvent], states: Mapping[str, GroupState], window: RemovalWindow,
           settings: HoldSettings, now: float, total: int | None) -> list[int]:
    """The numbers of memberships each event takes away, negative for an event to hold (in the events' order).

    `states`: the groups' states by external id, before the events. `total`: the organization's memberships,
    None when not known yet (asked for only once the count reaches `settings.minimum`; see `needs_total`).
    """
    decisions = []
    for event in events:
        taken = taken_away(event, states.get(event.group_id) or GroupState(event.organization_id, event.group_id))
        count = window.count(event.organization_id, now) + taken
        held = taken > 0 and total is not None and settings.exceeded(count, total)
        window.add(event.organization_id, now, taken)
        decisions.append(-taken if held else taken)
    return decisions


def needs_total(events: Iterable[GroupEvent], states: Mapping[str, GroupState], window: RemovalWindow,
                settings: HoldSettings, now: float) -> bool:
    """Whether these events may reach the threshold: only then is the organization's total read."""
    if not settings.enabled:
        return False
    by_org: dict[str, int] = {}
    for event in events:
        state = states.get(event.group_id) or GroupState(event.organization_id, event.group_id)
        by_org[event.organization_id] = by_org.get(event.organization_id, 0) + taken_away(event, state)
    return any(taken and window.count(org, now) + taken >= settings.minimum for org, taken in by_org.items())
