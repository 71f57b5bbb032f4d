"""Issue 24: what condemns a message alone (and only it), and the warning of an event stamped ahead."""

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest

from couchsync import config, design_docs
from couchsync.broker.disposition import DeadLetter, disposition
from couchsync.couch import CouchGateway
from couchsync.errors import FutureEvent, GroupStateRefused, InvalidEvent, StaleEvent
from couchsync.instances import InstanceDirectory
from couchsync.messages import Messages
from couchsync.sync import Synchronizer

AMQP = config.load_amqp("amqp://127.0.0.1", delivery_limit=5, retry_delay=2.0)


@pytest.mark.parametrize("error", [
    GroupStateRefused("group 'big' of organization 'acme': its directory state (4117 bytes) was refused", size=4117,
                      limit=2977),
    StaleEvent("stale: group 'eng' of organization 'acme' refuses events stamped before 2026-03-02"),
    FutureEvent("timestamp: 2999-01-01T00:00:00Z is too far in the future", routing_key="b2b.group.created",
                timestamp=datetime(2999, 1, 1, tzinfo=timezone.utc)),
], ids=lambda error: type(error).__name__)
def test_a_messages_own_fault_is_dead_lettered_at_once_with_its_reason(error):
    decision = disposition(error, 1, AMQP)
    assert isinstance(decision, DeadLetter) and decision.reason == f"{type(error).__name__}: {error}"


@pytest.fixture
def sync():
    counted = []
    gateway = CouchGateway(config.load_couch("http://couch.test:5984"))  # never asked: parsing does no I/O
    settings = config.load_sync(max_future_skew=timedelta(seconds=60))
    with Synchronizer(gateway, InstanceDirectory(gateway, "global/instances"), design_docs.load(),
                      settings) as synchronizer:
        yield Messages(synchronizer, settings, future_stamped=lambda: counted.append(1)), counted


def created(ahead: float) -> bytes:
    stamp = datetime.now(timezone.utc) + timedelta(seconds=ahead)
    return json.dumps({"timestamp": f"{stamp:%Y-%m-%dT%H:%M:%S.%fZ}", "organizationId": "acme", "id": "eng",
                       "name": "Eng", "members": []}).encode()


def test_an_event_stamped_more_than_five_seconds_ahead_is_logged_and_counted_yet_accepted(sync, caplog):
    messages, counted = sync
    caplog.set_level(logging.WARNING, logger="couchsync.messages")
    assert messages.parse("b2b.group.created", created(1)).group_id == "eng"
    assert counted == [] and caplog.records == []  # a second ahead: ordinary drift
    assert messages.parse("b2b.group.created", created(30)).group_id == "eng"
    assert counted == [1] and "ahead of this machine's clock" in caplog.records[0].getMessage()
    assert caplog.records[0].levelno == logging.WARNING


def test_an_event_beyond_the_future_skew_is_refused_counted_and_said_replayable(sync):
    messages, counted = sync
    with pytest.raises(FutureEvent, match="replay it once its time has come") as caught:
        messages.parse("b2b.group.created", created(120))
    assert isinstance(caught.value, InvalidEvent) and counted == [1]
