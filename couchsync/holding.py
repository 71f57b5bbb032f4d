"""The worker's handlers with the mass-removal hold in front of them (see `couchsync.hold`).

A batch's removals and group deletions are counted against the state as it is before the batch is
merged; those past the threshold are parked in the hold queue (`couchsync.held_queue`) and acknowledged
as held, the rest of the batch (additions, updates, removals below the threshold) is applied as usual.
Nothing held is in the state, so releasing it later gives what applying it in time would have: stamps
decide.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from couchsync.errors import CouchsyncError, UnknownOrganization
from couchsync.events import GroupEvent, GroupEventKind, parse_event
from couchsync.held_queue import Parcel, Parking
from couchsync.hold import HoldSettings, RemovalWindow, decide, memberships, needs_total
from couchsync.state import GroupState, group_state_id
from couchsync.sync import Synchronizer

logger = logging.getLogger(__name__)

TOTAL_SECONDS = 60.0  # an organization's memberships, read when a hold may start, kept this long
REMOVALS = (GroupEventKind.MEMBERS_REMOVED, GroupEventKind.DELETED)
Outcome = Mapping[str, object] | Exception


class HoldingHandler:
    """`handle` and `handle_batch` as the consumer calls them, holding mass removals."""

    def __init__(self, sync: Synchronizer, apply_batch: Callable[[Sequence[tuple[str, bytes]]], Sequence[Outcome]],
                 parking: Parking, settings: HoldSettings, not_after: Callable[[], datetime],
                 on_held: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._sync = sync  # its state store: what a removal would take away
        self._apply_batch = apply_batch  # what is not held (`Messages.handle_batch`)
        self._not_after = not_after
        self._parking = parking
        self._settings = settings
        self._on_held = on_held or (lambda messages: None)
        self._clock = clock
        self._window = RemovalWindow(settings.window)
        self._totals: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()  # batches are handled on several threads: one count

    def handle(self, routing_key: str, body: bytes) -> Mapping[str, object]:
        """One message (see `Messages.handle`), held when it is a removal past the threshold."""
        outcome = self.handle_batch([(routing_key, body)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        """Messages of one organization (see `Messages.handle_batch`): the held ones parked."""
        removals = self._removals(messages)
        held = self._to_hold(removals) if removals else {}
        if not held:
            return list(self._apply_batch(messages))
        try:
            self._park([(messages[p], removals[p], taken) for p, taken in sorted(held.items())])
            parked: Outcome | None = None
        except CouchsyncError as exc:
            parked = exc  # retried: not acknowledged before the hold queue has it
            with self._lock:  # and counted again when they come back, not twice
                self._window.withdraw(removals[min(held)].organization_id, self._clock(), sum(held.values()))
        rest = [message for position, message in enumerate(messages) if position not in held]
        applied = iter(self._apply_batch(rest) if rest else [])
        return [next(applied) if p not in held else parked or _held_fields(removals[p], held[p])
                for p in range(len(messages))]

    def _removals(self, messages: Sequence[tuple[str, bytes]]) -> dict[int, GroupEvent]:
        """The removals and group deletions among the messages, by position (the others pass untouched)."""
        found = {}
        for position, (routing_key, body) in enumerate(messages):
            try:
                event = parse_event(routing_key, body, not_after=self._not_after())
            except CouchsyncError:
                continue  # handled (dead-lettered) by the synchronizer, with its reason
            if isinstance(event, GroupEvent) and event.kind in REMOVALS:
                found[position] = event
        return found

    def _to_hold(self, removals: dict[int, GroupEvent]) -> dict[int, int]:
        """The positions of the removals to hold, each with the memberships it would take away."""
        events = list(removals.values())
        organization_id = events[0].organization_id
        try:
            # The state must be whole before it is counted against: a lost one is seeded again first, or
            # every removal would take away nothing and none would be held when memory is gone.
            self._sync.instances_of(organization_id)
        except UnknownOrganization:
            return {}  # dead-lettered by the synchronizer, with its reason
        ids = {event.group_id: group_state_id(organization_id, event.group_id) for event in events}
        stored = self._sync.states.read(list(ids.values()))
        states = {group_id: found.state for group_id, state_id in ids.items()
                  if (found := stored.get(state_id)) is not None and isinstance(found.state, GroupState)}
        with self._lock:
            now = self._clock()
            total = self._total(organization_id, now) if needs_total(
                events, states, self._window, self._settings, now) else None
            decisions = decide(events, states, self._window, self._settings, now, total)
        return {position: -taken for position, taken in zip(removals, decisions) if taken < 0}

    def _total(self, organization_id: str, now: float) -> int:
        """The organization's memberships now (read at most every TOTAL_SECONDS)."""
        known = self._totals.get(organization_id)
        if known is None or now - known[0] >= TOTAL_SECONDS:
            known = (now, memberships(stored.state for stored in self._sync.states.groups(organization_id)))
            self._totals[organization_id] = known
        return known[1]

    def _park(self, held: list[tuple[tuple[str, bytes], GroupEvent, int]]) -> None:
        reason = (f"mass removal: more than {self._settings.percent:g}% of the organization's memberships "
                  f"and at least {self._settings.minimum} within {self._settings.window:g}s")
        self._parking.park([Parcel(routing_key, body, event.organization_id, reason, taken)
                            for (routing_key, body), event, taken in held])
        logger.warning("hold: %d removals of %s held (%d memberships): release with `couchsync hold release`, "
                       "or drop", len(held), held[0][1].organization_id, sum(taken for _, _, taken in held))
        self._on_held(len(held))


def _held_fields(event: GroupEvent, taken: int) -> dict[str, object]:
    return {"routing_key": event.routing_key, "organization": event.organization_id, "subject": event.group_id,
            "held": taken, "instances": 0, "writes": 0, "refusals": 0}
