"""Issue 24, parts 4 and 5: a message's own fault condemns that message only.

A group whose state outgrows CouchDB's `max_document_size` fails its own events, the other events of the
batch apply (through `couchsync apply --batch` and through the worker); the state's horizon forgets old
removals and refuses older events; an event stamped too far ahead is dead-lettered, and applies when
replayed once its time has come.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

import localcouch
from couchsync.documents import CONTACTS, GROUPS, group_ids_of, managed_contact_id, managed_group_id
from couchsync.errors import StaleEvent
from couchsync.events import parse_event
from couchsync.state import group_state_id

from tests.integration.conftest import World
from tests.integration.test_worker import dead_letters, drained, seed, start_worker, wait_until  # noqa: F401 (fixture)

DOMAINS = ["acme.twake.app", "alice.acme.twake.app"]
LIMIT_PATH = "/_node/_local/_config/couchdb/max_document_size"
BIG, SMALL = managed_group_id("acme", "big"), managed_group_id("acme", "small")


def message(routing_key: str, minute: int, group: str, **fields) -> tuple[str, bytes]:
    body = {"timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": group, **fields}
    return routing_key, json.dumps(body).encode()


def people(first: int, count: int) -> list[dict[str, str]]:
    return [{"email": f"m{i:03d}@acme.com"} for i in range(first, first + count)]


def state_size(world: World, group: str) -> int:
    """The size of a group's state document as CouchDB measures a body (without `_id` and `_rev`)."""
    doc = group_state(world, group)
    return len(json.dumps({k: v for k, v in doc.items() if k not in ("_id", "_rev")}, separators=(",", ":")))


def group_state(world: World, group: str) -> dict:
    """A group's state document as stored (read as the sync identity, the only reader it has)."""
    return world.gateway().get(world.state_db, group_state_id("acme", group))


@contextlib.contextmanager
def max_document_size(world: World, limit: int) -> Iterator[None]:
    """The node's `max_document_size` lowered for the block, restored (or unset again) after it."""
    before = world.server.request("GET", LIMIT_PATH)
    assert world.server.request("PUT", LIMIT_PATH, data=json.dumps(str(limit))).ok
    try:
        yield
    finally:
        if before.ok:
            world.server.request("PUT", LIMIT_PATH, data=json.dumps(before.json()))
        else:
            world.server.request("DELETE", LIMIT_PATH)


@pytest.fixture
def oversized(world):
    """An organization whose group `big` (30 members) is one event away from CouchDB's limit, and whose
    group `small` has one member; the limit is lowered meanwhile. Yields the limit and the batch: two
    events of `big` that each outgrow it and two of `small`."""
    if world.server.kind == localcouch.POUCHDB:
        pytest.skip("PouchDB Server has no max_document_size")
    seed(world, DOMAINS)
    with world.synchronizer() as sync:
        for routing_key, body in (
                message("b2b.group.created", 0, "big", name="Big", members=people(0, 30)),
                message("b2b.group.created", 1, "small", name="Small", members=[{"email": "alice@acme.com"}])):
            sync.apply(parse_event(routing_key, body))
    # Room for what `small` and the people need, not for ten more members of `big` (about 80 bytes each).
    limit = state_size(world, "big") + 300
    batch = [message("b2b.group.member.added", 5, "big", members=people(30, 10)),
             message("b2b.group.member.added", 6, "small", members=[{"email": "bob@acme.com"}]),
             message("b2b.group.member.added", 7, "big", members=people(40, 10)),
             message("b2b.group.updated", 8, "small", description="Sales team")]
    with max_document_size(world, limit):
        yield limit, batch


def assert_only_small_applied(world: World, big_before: int) -> None:
    for domain in DOMAINS:
        groups = world.docs(domain, GROUPS)
        assert groups[SMALL]["description"] == "Sales team"
        bob = world.docs(domain, CONTACTS)[managed_contact_id("acme", "bob@acme.com")]
        assert group_ids_of(bob) == [SMALL]
        assert managed_contact_id("acme", "m030@acme.com") not in world.docs(domain, CONTACTS)
    assert state_size(world, "big") == big_before  # the state of `big` as it was


def assert_named_reason(reason: str, limit: int) -> None:
    assert "group 'big' of organization 'acme'" in reason
    size = int(reason.split("its directory state (")[1].split(" bytes")[0])
    assert size > limit and f"max_document_size is {limit} bytes" in reason


def test_apply_batch_applies_the_other_groups_events_and_fails_only_the_oversized_groups(world, oversized, tmp_path):
    limit, batch = oversized
    big_before = state_size(world, "big")
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps({"routingKey": key, "body": json.loads(body)}) for key, body in batch))
    done = subprocess.run([sys.executable, "-m", "couchsync", "apply", "--batch", "10", str(events)],
                          env=world.cli_env(), capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 65, done.stdout + done.stderr
    assert lines[0].startswith("1-4: batch of 4 acme/big,small: ok, 2 instances"), lines
    assert "0 refusals, 2 events not applied" in lines[0]
    failed = {line.split(":")[0]: line for line in lines[1:]}
    assert set(failed) == {"1", "3"} and all("GroupStateRefused" in line for line in failed.values()), lines
    assert_named_reason(failed["1"], limit)
    assert_only_small_applied(world, big_before)


def test_the_worker_dead_letters_only_the_oversized_groups_events(
        world, broker, start_worker, oversized):  # noqa: F811 (the fixture)
    limit, batch = oversized
    big_before = state_size(world, "big")
    # Batches gathered for 2 s: the four events are handled together.
    worker = start_worker(world, COUCHSYNC_BATCH_WAIT="2000", COUCHSYNC_SETTLE_DELAY="0")
    broker.publish(batch)
    wait_until(lambda: worker.count("applied") + worker.count("dead_lettered") == 4 and drained(broker, worker),
               90, "the batch is handled")
    assert worker.count("applied") == 2 and worker.count("retried") == 0
    letters = dead_letters(world, broker)
    assert len(letters) == 2 and all(letter["routing_key"] == "b2b.group.member.added" for letter in letters)
    for letter in letters:
        assert "GroupStateRefused" in letter["reason"]
        assert_named_reason(letter["reason"], limit)
    assert_only_small_applied(world, big_before)
    assert "routing_key=batch of 4" in worker.log.read_text()  # handled together, as meant


def day(number: int) -> str:
    return f"{datetime(2026, 1, 1, 10) + timedelta(days=number):%Y-%m-%dT%H:%M:%SZ}"


def test_the_horizon_forgets_old_removals_in_couchdb_and_refuses_an_older_addition(world):
    seed(world, DOMAINS)
    bob = {"email": "bob@acme.com"}

    def event(routing_key: str, number: int, **fields):
        return parse_event(routing_key, json.dumps({"timestamp": day(number), "organizationId": "acme",
                                                    "id": "eng", **fields}))
    with world.synchronizer() as sync:
        sync.apply(event("b2b.group.created", 0, name="Eng", members=[bob, {"email": "alice@acme.com"}]))
        sync.apply(event("b2b.group.member.removed", 2, members=[bob]))
        sync.apply(event("b2b.group.member.added", 150, members=[{"email": "carol@acme.com"}]))
        state = group_state(world, "eng")
        assert sorted(state["members"]) == ["alice@acme.com", "carol@acme.com"]  # bob's removal forgotten
        assert state["stamps"]["horizon"] == "2026-03-02T10:00:00.000000Z"  # 90 days before day 150
        # An addition of bob older than the horizon (and than his forgotten removal) arrives late.
        with pytest.raises(StaleEvent, match="stale: group 'eng' of organization 'acme' refuses events stamped "
                                             "before 2026-03-02T10:00:00.000000Z"):
            sync.apply(event("b2b.group.member.added", 1, members=[bob]))
        # So is a redelivered creation that names him (it would bring him back too); a redelivered recent
        # event is no stale event: it changes nothing.
        with pytest.raises(StaleEvent):
            sync.apply(event("b2b.group.created", 0, name="Eng", members=[bob, {"email": "alice@acme.com"}]))
        assert sync.apply(event("b2b.group.member.added", 150, members=[{"email": "carol@acme.com"}])).writes == 0
    eng = managed_group_id("acme", "eng")
    for domain in DOMAINS:
        related = {doc["twakeDirectory"]["email"] for doc in world.docs(domain, CONTACTS).values()
                   if eng in group_ids_of(doc)}
        assert related == {"alice@acme.com", "carol@acme.com"} - {f"{domain.split('.')[0]}@acme.com"}
    assert group_state(world, "eng")["_rev"] == state["_rev"]  # nothing written for either


def test_an_event_too_far_ahead_is_dead_lettered_and_applies_when_replayed_after_its_time(
        world, broker, start_worker):  # noqa: F811 (the fixture)
    seed(world, DOMAINS)
    worker = start_worker(world, COUCHSYNC_MAX_FUTURE_SKEW="10")
    now = datetime.now(timezone.utc)

    def created(group: str, ahead: float) -> tuple[str, bytes]:
        stamp = f"{now + timedelta(seconds=ahead):%Y-%m-%dT%H:%M:%S.%fZ}"
        return "b2b.group.created", json.dumps({"timestamp": stamp, "organizationId": "acme", "id": group,
                                                "name": group, "members": []}).encode()
    # Margins for a loaded machine: `soon` is still over 5 s ahead if handled within 4 s, `later` still
    # beyond the bound if handled within 8 s.
    broker.publish([created("soon", 9), created("later", 18)])
    wait_until(lambda: worker.count("applied") + worker.count("dead_lettered") == 2 and drained(broker, worker),
               30, "both are handled")
    assert worker.count("applied") == 1 and worker.metrics()["couchsync_future_stamped_events_total"] == 2
    log = worker.log.read_text()
    assert "WARNING" in log and "b2b.group.created stamped " in log and "ahead of this machine's clock" in log
    [letter] = dead_letters(world, broker)
    assert "FutureEvent" in letter["reason"] and "replay it once its time has come" in letter["reason"]
    assert managed_group_id("acme", "later") not in world.docs("acme.twake.app", GROUPS)
    time.sleep(max(0.0, (now + timedelta(seconds=18) - datetime.now(timezone.utc)).total_seconds()))
    replay = subprocess.run([sys.executable, "-m", "couchsync", "dlq", "replay", "--all"],
                            env=world.cli_env(**broker.env()), capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    wait_until(lambda: worker.count("applied") == 2 and drained(broker, worker), 30, "the replayed event is applied")
    assert {managed_group_id("acme", "soon"), managed_group_id("acme", "later")} <= set(
        world.docs("acme.twake.app", GROUPS))
    assert dead_letters(world, broker) == []
