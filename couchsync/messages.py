"""Messages: what the worker (and `apply`) hands the engine, one message or a batch at a time.

Bodies are parsed against the clock (an event stamped ahead of it is said and counted, one too far ahead
refused), applied through a `Synchronizer`, and each message gets its own outcome: its log fields, or
the error that ends it (an event of a batch that failed on its own does not fail the others).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone

from couchsync.config import FUTURE_STAMP_WARNING, SyncSettings
from couchsync.errors import CouchsyncError, FutureEvent
from couchsync.events import Event, GroupEvent, parse_event
from couchsync.sync import MAX_LOGGED_REFUSALS, MAX_LOGGED_TEXT, EventReport, Synchronizer

logger = logging.getLogger(__name__)


class Messages:
    """Messages applied through a Synchronizer; `future_stamped` counts events stamped ahead of the clock."""

    def __init__(self, sync: Synchronizer, settings: SyncSettings,
                 future_stamped: Callable[[], None] | None = None) -> None:
        self._sync = sync
        self._settings = settings
        self._future_stamped = future_stamped or (lambda: None)

    def handle(self, routing_key: str, body: bytes) -> dict[str, object]:
        """Apply one message's event everywhere; its log fields (what the worker gives the consumer).

        Raises:
            InvalidEvent, UnknownOrganization: never applicable as it is.
            InstancesFailed: failed in some instances (InstancesUnavailable: trying again may help).
            CouchError: the global database could not be read.
        """
        return fields_of(self._sync.apply(self.parse(routing_key, body)))

    def parse(self, routing_key: str, body: bytes | str | dict[str, object]) -> Event:
        """The event a message carries, refused beyond the future skew; one stamped more than a few
        seconds ahead of the clock is logged at WARNING and counted (a publisher's clock going astray).

        Raises:
            InvalidEvent: not a valid event (FutureEvent: too far in the future, for now).
        """
        now = datetime.now(timezone.utc)
        try:
            event = parse_event(routing_key, body, not_after=self._settings.not_after(now))
        except FutureEvent as exc:
            self._ahead(routing_key, exc.timestamp, now)
            raise
        if event.timestamp > now + FUTURE_STAMP_WARNING:
            self._ahead(routing_key, event.timestamp, now)
        return event

    def _ahead(self, routing_key: str, timestamp: datetime, now: datetime) -> None:
        logger.warning("%s stamped %s, %.1fs ahead of this machine's clock (events further ahead than %s are "
                       "refused): is the publisher's clock right?", routing_key[:MAX_LOGGED_TEXT],
                       f"{timestamp:%Y-%m-%dT%H:%M:%S.%fZ}", (timestamp - now).total_seconds(),
                       self._settings.max_future_skew)
        self._future_stamped()

    def batch_key(self, routing_key: str, body: bytes) -> str | None:
        """The key of the messages this one may be applied with (its organization: see `handle_batch`);
        None for a message to handle alone, at once: a user.created, or one that is not a valid event."""
        try:
            event = parse_event(routing_key, body, not_after=self._settings.not_after())
        except CouchsyncError:
            return None
        return event.organization_id if isinstance(event, GroupEvent) else None

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> list[Mapping[str, object] | Exception]:
        """Apply messages of one organization together (see `apply_batch`); one outcome per message, in
        order: its log fields, or the error that ends it.

        Every valid event shares the batch's outcome: a failure in some instance fails each of them (each
        is then retried on its own count), except an event that failed on its own (its group's state
        refused by CouchDB, a stale event), which gets its own error while the others apply. The batch's
        totals (writes, refusals, requests) are carried by the first applied one's fields, so that sums
        over messages stay true.
        """
        outcomes: list[Mapping[str, object] | Exception | None] = [None] * len(messages)
        events: list[tuple[int, GroupEvent]] = []
        for position, (routing_key, body) in enumerate(messages):
            try:
                event = self.parse(routing_key, body)
                if not isinstance(event, GroupEvent):
                    outcomes[position] = fields_of(self._sync.apply(event))
                    continue
            except CouchsyncError as exc:
                outcomes[position] = exc
                continue
            events.append((position, event))
        if events:
            for position, outcome in zip((position for position, _ in events),
                                         self._batch_outcomes([event for _, event in events])):
                outcomes[position] = outcome
        handled = [outcome for outcome in outcomes if outcome is not None]
        assert len(handled) == len(messages), "every message has its outcome"
        return handled

    def _batch_outcomes(self, events: Sequence[GroupEvent]) -> list[Mapping[str, object] | Exception]:
        """One outcome per event of a batch: its own error (a condemned event), or the batch's."""
        try:
            report = self._sync.apply_batch(events)
            fields: Mapping[str, object] | Exception = fields_of(report)
        except CouchsyncError as exc:
            return [exc] * len(events)
        condemned = dict(report.condemned)
        outcomes: list[Mapping[str, object] | Exception] = []
        for position in range(len(events)):
            carried = any(isinstance(outcome, Mapping) for outcome in outcomes)
            outcome = condemned.get(position) or fields
            outcomes.append(outcome if isinstance(outcome, Exception) or not carried else {
                **outcome, "writes": 0, "bulk_writes": 0, "refusals": 0})
        return outcomes


def fields_of(report: EventReport) -> dict[str, object]:
    """The log fields of an applied event, once its refusals are said.

    Raises:
        InstancesFailed: it failed in some instances (InstancesUnavailable: trying again may help).
    """
    report.raise_for_failures()
    # Refusals are outcomes, not failures: trying again is refused the same way until someone removes
    # the document in the way, and the other instances are written already. Said, counted, acknowledged.
    for domain, reason in report.refusals[:MAX_LOGGED_REFUSALS]:
        logger.warning("refused in %s: %s", domain[:MAX_LOGGED_TEXT], reason[:MAX_LOGGED_TEXT])
    return report.fields()
