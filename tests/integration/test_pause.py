"""The worker pauses when CouchDB fails and resumes by itself (issue 24): a stopped CouchDB, a wrong password,
a protection guard started before CouchDB. Nothing that is not a message's own fault is dead-lettered.

The outage tests stop and start a CouchDB node of their own (`localcouch.restartable`); the outage test
also runs on a RabbitMQ node of its own whose `consumer_timeout` is 60 s, shorter than the outage, so that
a worker holding a delivery through the outage would have its channel closed by the broker.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

import pika
import pytest
import requests

import localcouch
import localrabbit
from couchsync.documents import CONTACTS

from tests.integration.conftest import Broker, World
from tests.integration.test_ops import following, protection_rev
from tests.integration.test_worker import (
    GROUP_COUNT, Message, Worker, assert_same_as_uninterrupted, dead_letters, drained, group_messages, seed,
    wait_until)

PROBE = "1"  # seconds between two probes of CouchDB while paused (5 by default)
PAUSED_COUCHDB = 'couchsync_paused{reason="couchdb"}'
PAUSED_CREDENTIALS = 'couchsync_paused{reason="credentials"}'
MALFORMED: list[tuple[Message, str]] = [
    (("b2b.group.created", b"{not json"), "body is not JSON"),
    (("b2b.group.created", json.dumps({"timestamp": "2026-06-16T12:00:00Z", "organizationId": "acme",
                                       "name": "nameless"}).encode()), "'id' is a required property"),
    (("b2b.group.member.added", json.dumps({"timestamp": "2026-06-16T12:00:01Z", "organizationId": "acme",
                                            "id": "g1", "members": "bob@acme.com"}).encode()), "must be of type array"),
    (("b2b.group.archived", json.dumps({"timestamp": "2026-06-16T12:00:02Z", "organizationId": "acme",
                                        "id": "g2"}).encode()), "unknown routing key"),
    (("b2b.group.updated", b"[]"), "not a JSON object"),
]


def needs_couchdb(server: localcouch.LocalCouch) -> None:
    if server.kind != localcouch.COUCHDB or localcouch.find_release() is None:
        pytest.skip("stops and starts an Apache CouchDB node of its own (the outages measured are CouchDB's)")


def log_tail(worker: Worker) -> str:
    """The worker's log without the line of each message: what a failed test shows."""
    lines = [line for line in worker.log.read_text().splitlines() if "couchsync.broker.settlement: event" not in line]
    return "\n".join(lines)[-4000:]


def health(worker: Worker) -> tuple[int, str]:
    answer = requests.get(f"http://127.0.0.1:{worker.port}/healthz", timeout=5)
    return answer.status_code, answer.text.strip()


class OwnCouch:
    """An Apache CouchDB node of the test's own, its data on disk, to stop and start again; a world on it."""

    def __init__(self, session: localcouch.LocalCouch, data: Path) -> None:
        data.mkdir()
        self.data = data
        self.server = localcouch.restartable(session, data)
        self.world = World(self.server)

    def restart(self) -> None:
        """Start it again as it was (its port, credentials and data), once stopped."""
        self.server = localcouch.restartable(self.server, self.data, like=self.server)
        self.world.server = self.server


@pytest.fixture
def own_couch(couch_server, tmp_path):
    needs_couchdb(couch_server)
    node = OwnCouch(couch_server, tmp_path / "couch-data")
    yield node
    node.server.stop()
    shutil.rmtree(node.data, ignore_errors=True)


@pytest.fixture
def start(tmp_path):
    """Start a worker that probes CouchDB every second while paused; killed at the end if still running."""
    workers: list[Worker] = []

    def start(world: World, broker: Broker, *, unset: tuple[str, ...] = (), **env: str) -> Worker:
        worker = Worker(world, broker, tmp_path / f"worker-{len(workers)}.log", COUCHSYNC_PAUSE_PROBE=PROBE, **env)
        for name in unset:
            del worker.env[name]
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        if worker.process and worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


@pytest.fixture
def short_timeout_broker():
    """A RabbitMQ node of the test's own whose consumer_timeout is 60 s (30 min by default)."""
    if not localrabbit.available():
        pytest.skip("RabbitMQ is not installed here")
    node = localrabbit.start_cluster(1)
    try:
        node.ctl_ok(0, "eval", "application:set_env(rabbit, consumer_timeout, 60000).")
        assert node.ctl_ok(0, "eval", "application:get_env(rabbit, consumer_timeout).").strip() == "{ok,60000}"
        yield Broker(pika.URLParameters(node.urls[0]), urls=(node.urls[0],))
    finally:
        node.stop()


def spread(valid: list[Message], bad: list[Message], chunks: int) -> list[list[Message]]:
    """The valid messages with the bad ones among them, cut into `chunks` parts published apart."""
    stream = list(valid)
    for position, message in enumerate(bad):
        stream.insert(GROUP_COUNT + position * 14, message)
    size = -(-len(stream) // chunks)
    return [stream[start:start + size] for start in range(0, len(stream), size)]


@pytest.mark.slow
def test_couchdb_down_three_minutes_pauses_dead_letters_only_the_malformed_and_outlasts_a_60s_consumer_timeout(
        couch_server, own_couch, short_timeout_broker, start, record_property):
    broker, world = short_timeout_broker, own_couch.world
    seed(world)
    valid = group_messages(95 - GROUP_COUNT)
    chunks = spread(valid, [message for message, _ in MALFORMED], 4)
    worker = start(world, broker)
    # When: CouchDB stops for 3 minutes, and the 100 events arrive during the outage, in four parts.
    own_couch.server.stop()
    down = time.monotonic()
    samples: list[tuple[float, int, str, float]] = []
    published = 0
    while time.monotonic() - down < 180:
        if published < len(chunks) and time.monotonic() - down >= published * 45:
            broker.publish(chunks[published])
            published += 1
        status, text = health(worker)
        samples.append((time.monotonic() - down, status, text, worker.metrics()[PAUSED_COUCHDB]))
        time.sleep(3)
    own_couch.restart()
    back = time.monotonic()
    wait_until(lambda: worker.count("applied") == len(valid) and drained(broker, worker), 60,
               "every valid event is applied within 60 s of CouchDB's return")
    applied_after = time.monotonic() - back
    record_property("seconds_to_apply_all_after_return", round(applied_after, 1))
    print(f"all {len(valid)} valid events applied {applied_after:.1f}s after CouchDB returned")
    # Then: paused (503, gauge 1) from the first failure on, through the outage.
    paused = [sample for sample in samples if sample[0] >= 15]
    assert paused and all(sample[1:] == (503, "paused: couchdb", 1.0) for sample in paused), samples
    # Exactly the 5 malformed dead-lettered, each with its reason; the broker never closed the channel.
    letters = dead_letters(world, broker)
    assert sorted(reason for _, reason in MALFORMED) == sorted(
        next(reason for _, reason in MALFORMED if reason in letter["reason"]) for letter in letters)
    assert worker.count("dead_lettered") == 5 and worker.count("retried") == 0
    assert worker.count("paused") > 0
    assert worker.metrics().get("couchsync_broker_reconnects_total", 0) == 0
    assert worker.metrics()[PAUSED_COUCHDB] == 0 and health(worker) == (200, "ok")
    assert_same_as_uninterrupted(couch_server, world, valid)


@pytest.fixture
def own_admin(world):
    """A server admin of the test's own: CouchDB locks out a user after repeated failed logins, and the
    session's sync identity must stay usable by the other tests."""
    name, password = f"couchsync-{world.tag}", secrets.token_hex(8)
    path = f"/_node/_local/_config/admins/{name}"
    if not world.server.request("PUT", path, json=password).ok:
        pytest.skip(f"{world.server.label} has no configuration API to add a server admin")
    yield name, password
    world.server.request("DELETE", path)


def test_a_wrong_password_pauses_the_worker_and_fixing_the_password_file_resumes_it(
        world, broker, own_admin, start, tmp_path, record_property):
    seed(world)
    user, password = own_admin
    password_file = tmp_path / "couch-password"
    password_file.write_text("an-old-password\n")
    worker = start(world, broker, unset=("COUCHSYNC_COUCH_PASSWORD",), COUCHSYNC_COUCH_USER=user,
                   COUCHSYNC_COUCH_PASSWORD_FILE=str(password_file))
    messages = group_messages(0)[:10]
    broker.publish(messages)
    wait_until(lambda: health(worker) == (503, "paused: credentials"), 30, "the worker pauses")
    assert worker.metrics()[PAUSED_CREDENTIALS] == 1
    time.sleep(5)  # a pause, not a retry: still nothing dead-lettered a few probes later
    assert worker.count("dead_lettered") == worker.count("retried") == 0
    assert broker.depths()[broker.settings.dead_letter_queue] == 0
    log = worker.log.read_text()
    assert f"refuses the sync identity {user}" in log and str(password_file) in log
    assert "an-old-password" not in log and password not in log
    # When: the operator fixes the file; the worker resumes without a restart.
    password_file.write_text(password + "\n")
    fixed = time.monotonic()
    wait_until(lambda: health(worker) == (200, "ok"), 10, "the worker resumes within 10 s")
    resumed = time.monotonic() - fixed
    wait_until(lambda: worker.count("applied") == len(messages) and drained(broker, worker), 60,
               "every event is applied")
    record_property("seconds_to_resume", round(resumed, 1))
    print(f"resumed {resumed:.1f}s after the password file was fixed")
    assert worker.count("dead_lettered") == 0 and worker.metrics()[PAUSED_CREDENTIALS] == 0
    assert password not in worker.log.read_text()
    assert worker.stop() == 0


def test_a_worker_started_before_couchdb_follows_the_feed_once_it_is_up_and_protects_within_5s(
        own_couch, broker, start, record_property):
    world = own_couch.world
    world.add_instance("acme.twake.app", "acme")
    own_couch.server.stop()
    worker = start(world, broker, COUCHSYNC_PROTECTION_FEED_RETRY="1")
    time.sleep(10)
    assert worker.metrics()["couchsync_protection_feed_following"] == 0
    own_couch.restart()
    # When: the stack creates a new member's contacts database once CouchDB is up.
    db = world.db("new.acme.twake.app", CONTACTS)
    created = time.monotonic()
    localcouch.ensure_db(own_couch.server, db)
    while protection_rev(world, db) is None and time.monotonic() - created < 5:
        time.sleep(0.2)
    assert protection_rev(world, db) is not None, f"not protected within 5 s; the worker's log:\n{log_tail(worker)}"
    record_property("seconds_to_protection", round(time.monotonic() - created, 1))
    print(f"protected {time.monotonic() - created:.1f}s after its creation")
    assert following(worker)
