"""The consumer's decisions (pure): error → ack, retry after a delay, or dead letter with the reason."""

from types import SimpleNamespace

import pika
import pika.data
import pytest

from couchsync import config
from couchsync.broker.delivery import (
    ATTEMPT, MAX_HEADERS_BYTES, MAX_REASON, MAX_ROUTING_KEY, REASON, ROUTING_KEY, Delivery, message_digest,
    republish_headers)
from couchsync.broker.disposition import Ack, DeadLetter, Pause, Retry, decide, disposition, retry_delay
from couchsync.dead_letters import DeadMessage
from couchsync.errors import (
    AccessDenied, BrokerUnavailable, ConfigError, CouchUnavailable, DocumentConflict, InstancesFailed,
    InstancesUnavailable, InvalidEvent, UnknownOrganization)

SETTINGS = config.load_amqp("amqp://127.0.0.1", delivery_limit=5, retry_delay=2.0)


@pytest.mark.parametrize("error, attempt, expected", [
    (None, 1, Ack()),
    (None, 5, Ack()),
    (InvalidEvent("body is not JSON", routing_key="b2b.group.created"), 1,
     DeadLetter("InvalidEvent: b2b.group.created: body is not JSON")),
    (UnknownOrganization("organization 'x' has no instance"), 1,
     DeadLetter("UnknownOrganization: organization 'x' has no instance")),
    (InstancesFailed("failed in 1 of 3 instances: a: refused"), 1,
     DeadLetter("InstancesFailed: failed in 1 of 3 instances: a: refused")),
    (AccessDenied("access denied"), 1, DeadLetter("AccessDenied: access denied")),
    (CouchUnavailable("CouchDB unreachable"), 1, Retry(2.0, "CouchUnavailable: CouchDB unreachable")),
    (InstancesUnavailable("failed in 2 of 3"), 2, Retry(4.0, "InstancesUnavailable: failed in 2 of 3")),
    (DocumentConflict("conflict"), 4, Retry(16.0, "DocumentConflict: conflict")),
    (BrokerUnavailable("lost"), 3, Retry(8.0, "BrokerUnavailable: lost")),
    (CouchUnavailable("CouchDB unreachable"), 5,
     DeadLetter("gave up after 5 attempts: CouchUnavailable: CouchDB unreachable")),
    (KeyError("members"), 1, DeadLetter("unexpected KeyError: 'members'")),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_disposition(error, attempt, expected):
    assert disposition(error, attempt, SETTINGS) == expected


@pytest.mark.parametrize("error, attempt, paused, expected", [
    # CouchDB failing (the breaker's reason given): whatever it may be to blame for is paused, even at
    # the last attempt, which a retry would have dead-lettered.
    (CouchUnavailable("CouchDB unreachable"), 5, "couchdb", Pause("couchdb")),
    (InstancesUnavailable("failed in 3 of 3"), 1, "couchdb", Pause("couchdb")),
    (AccessDenied("access denied", status=401), 1, "credentials", Pause("credentials")),
    (InstancesFailed("failed in 3 of 3: unauthorized"), 1, "credentials", Pause("credentials")),
    # The message's own fault is judged as ever, paused or not.
    (InvalidEvent("body is not JSON"), 1, "couchdb", DeadLetter("InvalidEvent: body is not JSON")),
    (UnknownOrganization("no instance"), 1, "couchdb", DeadLetter("UnknownOrganization: no instance")),
    (DocumentConflict("conflict"), 1, "couchdb", Retry(2.0, "DocumentConflict: conflict")),
    (None, 1, "couchdb", Ack()),
    # CouchDB answering (one instance database failed): a retry, then a dead letter, as before.
    (CouchUnavailable("503 in one database"), 1, None, Retry(2.0, "CouchUnavailable: 503 in one database")),
    (CouchUnavailable("503 in one database"), 5, None,
     DeadLetter("gave up after 5 attempts: CouchUnavailable: 503 in one database")),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_decide_pauses_only_what_a_failing_couchdb_may_be_to_blame_for(error, attempt, paused, expected):
    assert decide(error, attempt, SETTINGS, paused) == expected


def test_retry_delays_double_from_the_first_and_are_capped():
    assert [retry_delay(n, 2.0, 30.0) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


QUEUE = "t.couchsync.b2b.group"


def deliver(headers=None, routing_key="b2b.group.deleted", message_id=None, exchange="t.b2b"):
    method = SimpleNamespace(delivery_tag=7, routing_key=routing_key, exchange=exchange)
    return Delivery.of(3, method, pika.BasicProperties(headers=headers, message_id=message_id), b"{}", queue=QUEUE)


def test_a_first_delivery_is_attempt_one_with_its_own_routing_key():
    delivery = deliver()
    assert (delivery.attempt, delivery.routing_key, delivery.generation, delivery.tag) == (1, "b2b.group.deleted", 3, 7)
    assert delivery.message_id == message_digest("b2b.group.deleted", b"{}")


def test_a_retried_delivery_keeps_its_count_and_original_routing_key():
    delivery = deliver({ATTEMPT: 3, ROUTING_KEY: "b2b.group.created"}, routing_key=QUEUE, exchange="",
                       message_id="m-1")
    assert (delivery.attempt, delivery.routing_key, delivery.message_id) == (3, "b2b.group.created", "m-1")


def test_the_brokers_count_is_taken_when_it_is_higher_a_worker_died_on_the_message():
    assert deliver({"x-delivery-count": 4}).attempt == 5
    assert deliver({ATTEMPT: 3, "x-delivery-count": 1}).attempt == 3


def test_a_dead_letter_reads_couchsyncs_reason_or_the_brokers_record():
    ours = DeadMessage.of(SimpleNamespace(routing_key="q.dead", exchange=""), pika.BasicProperties(
        headers={REASON: "InvalidEvent: x", ATTEMPT: 1, ROUTING_KEY: "b2b.group.created"}), b"x", queue=QUEUE)
    assert (ours.routing_key, ours.reason, ours.attempts) == ("b2b.group.created", "InvalidEvent: x", 1)
    theirs = DeadMessage.of(SimpleNamespace(routing_key="q.dead", exchange="q.dlx"), pika.BasicProperties(headers={
        "x-death": [{"reason": "delivery_limit", "count": 1, "routing-keys": ["b2b.group.updated"]}]}), b"y",
        queue=QUEUE)
    assert (theirs.routing_key, theirs.reason) == ("b2b.group.updated", "dead-lettered by the broker: delivery_limit")


def test_amqp_settings_name_the_queues_from_the_prefix_and_default_to_the_local_guest():
    settings = config.load_amqp("amqp://127.0.0.1:5672/%2F", queue_prefix="cs.")
    assert (settings.queue, settings.retry_queue, settings.dead_letter_queue, settings.dead_letter_exchange) == (
        "cs.b2b.group", "cs.b2b.group.retry", "cs.b2b.group.dead", "cs.dlx")
    assert settings.username == "guest" and settings.password.value == "guest"
    assert "guest" not in repr(settings.password)


def test_another_amqp_user_needs_a_password_and_a_url_must_be_amqp():
    with pytest.raises(ConfigError, match="no AMQP password for couchsync"):
        config.load_amqp("amqp://rabbit", username="couchsync")
    with pytest.raises(ConfigError, match="must be amqp"):
        config.load_amqp("http://rabbit")
    assert config.load_amqp("amqps://rabbit:5671/prod", username="couchsync", password="pw").url == \
        "amqps://rabbit:5671/prod"


def test_a_clusters_nodes_are_given_as_several_urls_or_comma_separated_and_kept_in_order_once():
    settings = config.load_amqp(["amqp://r1:5672/%2F, amqp://r2:5672/%2F", "amqp://r3/%2F", "amqp://r1:5672/%2F"])
    assert settings.urls == ("amqp://r1:5672/%2F", "amqp://r2:5672/%2F", "amqp://r3/%2F")
    assert settings.url == "amqp://r1:5672/%2F"
    # The first URL's credentials, if any, serve every node; none is kept in the addresses.
    with_user = config.load_amqp("amqp://sync:pw@r1,amqp://r2", username="")
    assert (with_user.username, with_user.password.value) == ("sync", "pw")
    assert with_user.urls == ("amqp://r1", "amqp://r2")
    with pytest.raises(ConfigError, match="must be amqp"):
        config.load_amqp("amqp://r1,http://r2")
    with pytest.raises(ConfigError, match="no AMQP URL"):
        config.load_amqp(" , ")
    with pytest.raises(ConfigError, match="at most 32"):
        config.load_amqp([f"amqp://r{n}" for n in range(33)])


def test_malformed_count_headers_are_ignored_not_fatal():
    assert deliver({ATTEMPT: "abc", "x-delivery-count": -3}).attempt == 1
    assert deliver({ATTEMPT: True, "x-delivery-count": "7"}).attempt == 1


def test_a_routing_key_header_set_by_a_publisher_is_ignored_and_the_delivery_key_decides():
    # Given a message published to the directory's exchange with couchsync's header set by its publisher
    forged = deliver({ROUTING_KEY: "user.created"}, routing_key="b2b.group.created", exchange="t.b2b")
    # Then the key the exchange routed it by decides
    assert forged.routing_key == "b2b.group.created"
    # And only a message back from couchsync's own path (default exchange, addressed to the queue) keeps its key
    assert deliver({ROUTING_KEY: "user.created"}, routing_key=QUEUE, exchange="").routing_key == "user.created"
    assert deliver({ROUTING_KEY: "user.created"}, routing_key="other.queue", exchange="").routing_key == "other.queue"
    assert deliver({ROUTING_KEY: "b2b." + "A" * 300}, routing_key=QUEUE, exchange="").routing_key == QUEUE


def test_a_republish_of_a_message_with_huge_headers_and_reason_stays_far_below_a_frame():
    hostile = {ROUTING_KEY: "b2b.group." + "A" * 70000, "x-trace": "B" * 100000, "x-nested": {"a": ["C" * 5000]},
               "x-delivery-count": 3, "x-small": "kept", **{f"x-h{i}": "D" * 400 for i in range(50)}}
    reason = disposition(InvalidEvent("x" * 200000), 1, SETTINGS).reason
    headers = republish_headers(hostile, "b2b.group." + "E" * 1000, {ATTEMPT: 2, REASON: reason})
    size = pika.data.encode_table([], headers)
    assert size <= MAX_HEADERS_BYTES + 4 * (MAX_REASON + MAX_ROUTING_KEY) + 200 < 16384
    assert headers["x-small"] == "kept" and "x-trace" not in headers and "x-delivery-count" not in headers
    assert len(headers[REASON]) == MAX_REASON and len(headers[ROUTING_KEY]) == MAX_ROUTING_KEY
