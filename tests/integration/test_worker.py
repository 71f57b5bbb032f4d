"""`couchsync worker` with the real RabbitMQ and the CouchDB-compatible server, run as systemd runs it.

The worker is a subprocess configured by the environment; the tests publish to the directory's exchange,
break things (SIGKILL, closed connections, CouchDB down, SIGTERM mid fan-out) and compare the directory it
leaves with the one an uninterrupted, in-process run of the same events leaves.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

import localcouch
import localports
from couchsync import config
from couchsync.broker.delivery import ROUTING_KEY
from couchsync.documents import CONTACTS, GROUPS, managed_contact_id, managed_group_id
from couchsync.events import parse_event

from tests.integration.conftest import Broker, World
from tests.integration.test_convergence import DOMAINS as CONVERGENCE_DOMAINS
from tests.integration.test_convergence import generated_sequence, stamp_of

DOMAINS = ["acme.twake.app", "alice.acme.twake.app", "bob.acme.twake.app"]
GROUP_COUNT = 25
Message = tuple[str, bytes]


def seed(world: World, domains: list[str] = DOMAINS, org: str = "acme") -> None:
    for domain in domains:
        world.add_instance(domain, org, email=f"{domain.split('.')[0]}@{org}.com")


def group_messages(members: int, org: str = "acme") -> list[Message]:
    """GROUP_COUNT groups created, then `members` people added, person i to group i % GROUP_COUNT."""
    messages = [("b2b.group.created", {"timestamp": "2026-06-16T10:00:00Z", "organizationId": org, "id": f"g{g}",
                                       "name": f"Group {g}", "members": []}) for g in range(GROUP_COUNT)]
    messages += [("b2b.group.member.added", {
        "timestamp": f"2026-06-16T11:{i // 60 % 60:02d}:{i % 60:02d}Z", "organizationId": org,
        "id": f"g{i % GROUP_COUNT}", "members": [{"email": f"m{i:04d}@{org}.com", "firstName": f"Member {i}"}]})
        for i in range(members)]
    return [(key, json.dumps(body).encode()) for key, body in messages]


def apply_in_process(world: World, messages: list[Message]) -> None:
    """The uninterrupted reference: every event applied once, in-process."""
    with world.synchronizer() as sync:
        for routing_key, body in messages:
            assert sync.apply(parse_event(routing_key, body)).failures == []


def directory(world: World, domains: list[str] = DOMAINS) -> dict:
    return {domain: {doctype: {doc_id: {k: v for k, v in doc.items() if k != "_rev"}
                               for doc_id, doc in world.docs(domain, doctype).items()}
                     for doctype in (GROUPS, CONTACTS)} for domain in domains}


def assert_same_as_uninterrupted(couch_server, world: World, messages: list[Message],
                                 domains: list[str] = DOMAINS) -> None:
    """The directory `world` holds is the one an uninterrupted, in-process run of `messages` leaves."""
    reference = World(couch_server)
    try:
        seed(reference, domains)
        apply_in_process(reference, messages)
        assert directory(world, domains) == directory(reference, domains)
    finally:
        reference.cleanup()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting until {what}")


class Worker:
    """One `couchsync worker` process, its log, its metrics endpoint."""

    def __init__(self, world: World, broker: Broker, log: Path, **env: str) -> None:
        self.port = localports.free_port()
        self.log = log
        self.env = world.cli_env(**broker.env(**env))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "couchsync", "--log-level", "INFO", "worker", "--metrics-port", str(self.port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT)
        wait_until(self.healthy, 30, f"the worker answers /healthz (log: {self.log})")
        return self

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"the worker exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def metrics(self) -> dict[str, float]:
        """Samples by their full name (`couchsync_events_total{outcome="applied",...}`)."""
        text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("couchsync_")}

    def count(self, outcome: str) -> float:
        return sum(value for name, value in self.metrics().items()
                   if name.startswith("couchsync_events_total") and f'outcome="{outcome}"' in name)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout)


@pytest.fixture
def start_worker(broker, tmp_path):
    workers: list[Worker] = []

    def start(world: World, **env: str) -> Worker:
        worker = Worker(world, broker, tmp_path / f"worker-{len(workers)}.log", **env).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.process and worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def drained(broker: Broker, *workers: Worker) -> bool:
    """Nothing waits in couchsync's queues nor is being handled by a running worker (twice, a moment apart)."""
    for _ in range(2):
        depths = broker.depths()
        if any(count for name, count in depths.items() if name != broker.settings.dead_letter_queue):
            return False
        if any(worker.metrics()["couchsync_in_flight"] for worker in workers):
            return False
        time.sleep(0.3)
    return True


def malformed_messages() -> list[tuple[Message, str]]:
    """Fifty bad messages of five kinds, each with the reason expected in the dead-letter queue."""
    bad: list[tuple[Message, str]] = []
    for i in range(10):
        stamp = f"2026-06-16T12:00:{i:02d}Z"
        bad += [(("b2b.group.created", b"{not json " + str(i).encode()), "body is not JSON"),
                (("b2b.group.created", json.dumps({"timestamp": stamp, "organizationId": "acme",
                                                   "name": f"nameless {i}"}).encode()),
                 "'id' is a required property"),
                (("b2b.group.member.added", json.dumps({"timestamp": stamp, "organizationId": "acme", "id": "g1",
                                                        "members": f"bob{i}@acme.com"}).encode()),
                 "must be of type array"),
                (("b2b.group.archived", json.dumps({"timestamp": stamp, "organizationId": "acme",
                                                    "id": f"g{i}"}).encode()), "unknown routing key"),
                (("b2b.group.member.added", json.dumps({"timestamp": stamp, "organizationId": "ghost", "id": "g1",
                                                        "members": [{"email": f"x{i}@ghost.com"}]}).encode()),
                 "UnknownOrganization")]
    return bad


def dead_letters(world: World, broker: Broker) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "couchsync", "dlq", "list", "--json"],
                          env=world.cli_env(**broker.env()), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
def test_a_thousand_events_with_five_percent_malformed_lose_nothing_and_apply_once(world, broker, start_worker):
    seed(world)
    valid = group_messages(950 - GROUP_COUNT)
    bad = malformed_messages()
    # Malformed messages spread through the stream, not bunched.
    stream = list(valid)
    for position, (message, _) in enumerate(bad):
        stream.insert(position * 19 + 7, message)
    assert len(stream) == 1000
    worker = start_worker(world)
    broker.publish(stream)
    wait_until(lambda: worker.count("applied") + worker.count("dead_lettered") >= 1000 and drained(broker, worker), 600,
               "every message is applied or dead-lettered")
    # Every valid event applied, once: each member's contact exists once, in its group, in every other instance.
    groups = {managed_group_id("acme", f"g{g}") for g in range(GROUP_COUNT)}
    for domain in DOMAINS:
        assert set(world.docs(domain, GROUPS)) == groups
        contacts = world.docs(domain, CONTACTS)
        assert len(contacts) == 950 - GROUP_COUNT
        for i in range(950 - GROUP_COUNT):
            contact = contacts[managed_contact_id("acme", f"m{i:04d}@acme.com")]
            assert contact["relationships"]["groups"]["data"] == [
                {"_id": managed_group_id("acme", f"g{i % GROUP_COUNT}"), "_type": GROUPS}]
    # Every bad one in the dead-letter queue, with its reason; none lost, none applied.
    letters = dead_letters(world, broker)
    assert len(letters) == 50
    expected = sorted(reason for _, reason in bad)
    found = sorted(next(reason for reason in set(expected) if reason in letter["reason"]) for letter in letters)
    assert found == expected
    assert broker.depths()[broker.settings.dead_letter_queue] == 50  # listing left them there
    # The metrics tell the same story.
    assert worker.count("applied") == 950 and worker.count("dead_lettered") == 50
    assert worker.metrics()["couchsync_in_flight"] == 0
    assert worker.metrics()['couchsync_fanout_seconds_count{routing_key="b2b.group.member.added"}'] == 925
    wait_until(lambda: worker.metrics()["couchsync_settling_pending"] == 0, 60, "what it wrote is read again")
    assert worker.stop() == 0


def test_dead_letters_are_listed_with_reasons_and_replayed_once_fixed(world, broker, start_worker):
    seed(world)
    ghost = [("b2b.group.created", json.dumps({"timestamp": "2026-06-16T10:00:00Z", "organizationId": "ghost",
                                               "id": "crew", "name": "Crew",
                                               "members": [{"email": "joe@ghost.com"}]}).encode())]
    worker = start_worker(world)
    broker.publish(ghost + [("b2b.group.updated", b"[]")])
    wait_until(lambda: worker.count("dead_lettered") == 2 and drained(broker, worker), 60, "both are dead-lettered")
    letters = {letter["routing_key"]: letter for letter in dead_letters(world, broker)}
    assert "UnknownOrganization" in letters["b2b.group.created"]["reason"]
    assert "not a JSON object" in letters["b2b.group.updated"]["reason"]
    # The organization's instances appear: the operator replays the message that needed them.
    seed(world, ["ghost.twake.app", "joe.ghost.twake.app"], org="ghost")
    replay = subprocess.run([sys.executable, "-m", "couchsync", "dlq", "replay", letters["b2b.group.created"]["id"],
                             "nope"], env=world.cli_env(**broker.env()), capture_output=True, text=True, timeout=60)
    assert replay.returncode == 1 and "not found nope" in replay.stdout
    assert f"replayed {letters['b2b.group.created']['id']}" in replay.stdout
    wait_until(lambda: worker.count("applied") == 1 and drained(broker, worker), 60, "the replayed event is applied")
    assert set(world.docs("ghost.twake.app", GROUPS)) == {managed_group_id("ghost", "crew")}
    assert [letter["routing_key"] for letter in dead_letters(world, broker)] == ["b2b.group.updated"]


def worker_under_load(world, broker, start_worker):
    """A worker on the seeded world, 275 group events published, and some of them applied already."""
    seed(world)
    messages = group_messages(275)
    worker = start_worker(world)
    broker.publish(messages)
    wait_until(lambda: worker.count("applied") >= 60, 120, "some events are applied")
    return worker, messages


def test_a_worker_killed_mid_stream_and_restarted_leaves_the_uninterrupted_directory(
        couch_server, world, broker, start_worker):
    first, messages = worker_under_load(world, broker, start_worker)
    first.stop(signal.SIGKILL)
    second = start_worker(world)
    wait_until(lambda: drained(broker, second), 300, "the queue is drained after the restart")
    assert second.count("dead_lettered") == 0 and broker.depths()[broker.settings.dead_letter_queue] == 0
    assert_same_as_uninterrupted(couch_server, world, messages)


def test_broker_connections_closed_under_load_are_reopened_and_nothing_is_lost(
        couch_server, world, broker, start_worker):
    worker, messages = worker_under_load(world, broker, start_worker)
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "closed by a couchsync test"], check=True,
                   timeout=60)
    wait_until(lambda: worker.metrics().get("couchsync_broker_reconnects_total", 0) >= 1, 60, "it reconnects")
    wait_until(lambda: drained(broker, worker), 300, "the queue is drained")
    assert worker.count("dead_lettered") == 0
    assert_same_as_uninterrupted(couch_server, world, messages)


@pytest.mark.slow
def test_couchdb_down_for_ten_seconds_pauses_the_worker_dead_letters_nothing_and_converges(
        couch_server, broker, start_worker, tmp_path):
    data = tmp_path / "couch-data"
    data.mkdir()
    server = localcouch.restartable(couch_server, data)  # the session's kind, on disk: the data survives
    world = World(server)
    try:
        seed(world)
        messages = group_messages(95)
        worker = start_worker(world)
        broker.publish(messages[:60])
        wait_until(lambda: worker.count("applied") >= 30, 120, "some events are applied")
        server.stop()
        # Events arriving during the outage (a batched worker may have applied everything published before).
        broker.publish(messages[60:])
        time.sleep(10)
        server = localcouch.restartable(couch_server, data, like=server)
        world.server = server
        wait_until(lambda: worker.count("applied") == len(messages) and drained(broker, worker), 300,
                   "every event is applied after CouchDB returns")
        assert worker.count("paused") > 0, "the outage should have paused the worker (events handed back)"
        assert worker.count("dead_lettered") == 0 and broker.depths()[broker.settings.dead_letter_queue] == 0
        assert_same_as_uninterrupted(couch_server, world, messages)
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def big_organization(world: World, size: int) -> list[str]:
    domains = [f"m{i:04d}.big.twake.app" for i in range(size)]
    world.add_instances([localcouch.instance_doc(domain, "big", prefix=world.prefix(domain)) for domain in domains])
    return domains


BIG_GROUP = ("b2b.group.created", json.dumps({
    "timestamp": "2026-06-16T10:00:00Z", "organizationId": "big", "id": "all", "name": "Everyone",
    "members": [{"email": f"p{i}@big.com"} for i in range(3)]}).encode())


def test_sigterm_during_a_fan_out_lets_it_finish_acks_and_exits_0(world, broker, start_worker):
    domains = big_organization(world, 300)
    # A shutdown timeout the fan-out fits in, on any server (Apache CouchDB creates the 600 databases in
    # tens of seconds): the worker must wait for it, not hand it back.
    worker = start_worker(world, COUCHSYNC_CONCURRENCY="4", COUCHSYNC_SHUTDOWN_TIMEOUT="120")
    broker.publish([BIG_GROUP])
    wait_until(lambda: worker.metrics()["couchsync_in_flight"] == 1, 60, "the fan-out is under way")
    started = time.monotonic()
    assert worker.stop(timeout=150) == 0
    assert time.monotonic() - started < 120 + 5
    assert drained(broker)
    group = managed_group_id("big", "all")
    assert all(group in world.docs(domain, GROUPS) for domain in domains)


def test_sigterm_with_a_short_timeout_hands_the_message_back_and_exits_0(world, broker, start_worker):
    domains = big_organization(world, 300)
    worker = start_worker(world, COUCHSYNC_CONCURRENCY="2", COUCHSYNC_SHUTDOWN_TIMEOUT="0.5")
    broker.publish([BIG_GROUP])
    wait_until(lambda: worker.metrics()["couchsync_in_flight"] == 1, 60, "the fan-out is under way")
    started = time.monotonic()
    assert worker.stop(timeout=20) == 0
    assert time.monotonic() - started < 0.5 + 5
    # Handed back to its partition, not lost.
    assert sum(count for name, count in broker.depths().items() if name != broker.settings.dead_letter_queue) == 1
    again = start_worker(world)
    wait_until(lambda: again.count("applied") == 1 and drained(broker, again), 120, "the next worker applies it")
    group = managed_group_id("big", "all")
    assert all(group in world.docs(domain, GROUPS) for domain in domains)


@pytest.mark.parametrize("seed_number", range(1, 11))
def test_shuffled_events_handled_eight_at_a_time_converge_to_the_in_order_directory(
        couch_server, world, broker, start_worker, seed_number):
    seed(world, CONVERGENCE_DOMAINS)
    messages = generated_sequence(seed_number, length=24)
    rng = random.Random(seed_number)
    delivered = messages + rng.sample(messages, 6)
    rng.shuffle(delivered)
    worker = start_worker(world)
    broker.publish([(m["routingKey"], json.dumps(m["body"]).encode()) for m in delivered])
    wait_until(lambda: worker.count("applied") == len(delivered) and drained(broker, worker), 120,
               "every event is applied")
    in_order = [(m["routingKey"], json.dumps(m["body"]).encode()) for m in sorted(messages, key=stamp_of)]
    assert_same_as_uninterrupted(couch_server, world, in_order, CONVERGENCE_DOMAINS)


def test_credentials_the_broker_refuses_exit_78_without_showing_the_password(world, broker):
    env = world.cli_env(**broker.env(COUCHSYNC_AMQP_USER="intruder", COUCHSYNC_AMQP_PASSWORD="s3cret-amqp"))
    done = subprocess.run([sys.executable, "-m", "couchsync", "worker", "--metrics-port", "0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "refused the credentials of intruder" in done.stderr
    assert "s3cret-amqp" not in done.stdout + done.stderr


def test_a_refusal_is_applied_elsewhere_acknowledged_and_counted_and_a_squat_is_never_retried(
        world, broker, start_worker):
    # Issue 18, findings 2 and 12: an unmanaged document at the id of Bob's contact (a squat written before
    # the protection reserved those ids) made every event naming Bob a 409, retried, then dead-lettered.
    seed(world)
    bob_id = managed_contact_id("acme", "bob@acme.com")
    world.put("alice.acme.twake.app", CONTACTS, {"_id": bob_id, "fullname": "x"})
    worker = start_worker(world)
    broker.publish([("b2b.group.created", json.dumps({
        "timestamp": "2026-06-16T10:00:00Z", "organizationId": "acme", "id": "crew", "name": "Crew",
        "members": [{"email": "bob@acme.com"}, {"email": "dan@acme.com"}]}).encode())])
    wait_until(lambda: worker.count("applied") == 1 and drained(broker, worker), 60, "the event is applied")
    assert worker.count("retried") == 0 and worker.count("dead_lettered") == 0
    assert broker.depths()[broker.settings.dead_letter_queue] == 0
    assert worker.metrics()['couchsync_refusals_total{routing_key="b2b.group.created"}'] == 1
    squat = world.docs("alice.acme.twake.app", CONTACTS)[bob_id]
    assert {k: v for k, v in squat.items() if k != "_rev"} == {"_id": bob_id, "fullname": "x"}
    # Everyone else got what the event gives: Dan everywhere, Bob where nothing is in the way.
    assert managed_contact_id("acme", "dan@acme.com") in world.docs("alice.acme.twake.app", CONTACTS)
    assert world.docs("acme.twake.app", CONTACTS)[bob_id]["twakeDirectory"]["managed"] is True
    log = worker.log.read_text()
    assert f"refused in alice.acme.twake.app: an unmanaged document has the managed contact id {bob_id}" in log
    assert worker.stop() == 0


def reconnects(worker: Worker) -> float:
    return worker.metrics().get("couchsync_broker_reconnects_total", 0.0)


def test_messages_with_huge_headers_are_dead_lettered_without_dropping_the_broker_connection(
        world, broker, start_worker):
    # Issue 18, finding 6: the dead-letter republish copied a 70,000-character header (and more), the frame
    # was too big (FRAME_ERROR), the broker closed the connection, again at every redelivery.
    seed(world)
    worker = start_worker(world)
    huge = {ROUTING_KEY: "b2b.group." + "A" * 70000, "x-trace": "B" * 40000, "x-small": "kept"}
    broker.publish_raw([
        (broker.exchange, "b2b.group.created", b"{not json", huge),  # as any publisher on the exchange
        ("", broker.settings.queue, b"{not json either", huge),  # as if back from couchsync's own retry queue
    ])
    broker.publish(group_messages(0)[:1])
    wait_until(lambda: worker.count("dead_lettered") + worker.count("applied") >= 3 and drained(broker, worker), 60,
               "both are dead-lettered and the valid event applied")
    assert reconnects(worker) == 0
    assert worker.count("dead_lettered") == 2 and worker.count("applied") == 1
    reasons = {letter["routing_key"]: letter["reason"] for letter in dead_letters(world, broker)}
    assert reasons.keys() == {"b2b.group.created", broker.settings.queue}  # the huge header taken for neither
    assert "body is not JSON" in reasons["b2b.group.created"]
    assert "unknown routing key" in reasons[broker.settings.queue]
    assert "AAAA" not in worker.log.read_text()
    assert worker.stop() == 0


def test_a_routing_key_header_from_a_publisher_is_not_trusted_and_unknown_keys_share_one_metrics_label(
        world, broker, start_worker):
    # Issue 18, finding 7: a publisher on the b2b exchange set x-couchsync-routing-key: user.created and its
    # message was handled as one (a contact fanned out, an instance bootstrapped); 300 keys made 304 series.
    seed(world)
    worker = start_worker(world)
    broker.publish([("b2b.group.created", json.dumps({
        "timestamp": "2026-06-16T10:00:00Z", "organizationId": "acme", "id": "crew", "name": "Crew",
        "members": [{"email": "bob@acme.com"}]}).encode())])
    wait_until(lambda: worker.count("applied") == 1 and drained(broker, worker), 60, "the group is applied")
    world.add_instance("erin.acme.twake.app", "acme", email="erin@acme.com")  # a new member, not onboarded
    forged = json.dumps({"twakeId": "erin", "domain": "erin.acme.twake.app", "internalEmail": "erin@acme.com",
                         "workplaceFqdn": "erin.acme.twake.app", "timestamp": 1781700000,
                         "organizationId": "acme"}).encode()
    broker.publish_raw([(broker.exchange, "b2b.group.created", forged, {ROUTING_KEY: "user.created"})]
                       + [(broker.exchange, f"b2b.group.k{i}", b"{}", {}) for i in range(30)])
    wait_until(lambda: worker.count("dead_lettered") == 31 and drained(broker, worker), 60,
               "the forged and the unknown ones are dead-lettered")
    assert worker.count("applied") == 1  # the forged message was handled as what the exchange routed it by
    erin = managed_contact_id("acme", "erin@acme.com")
    for domain in DOMAINS:
        assert erin not in world.docs(domain, CONTACTS)
    assert world.docs("erin.acme.twake.app", GROUPS) == {} and world.docs("erin.acme.twake.app", CONTACTS) == {}
    letters = dead_letters(world, broker)
    # Dead-lettered as what it was routed by: a replay would not make it a user.created either.
    assert [letter["routing_key"] for letter in letters if not letter["routing_key"].startswith("b2b.group.k")] \
        == ["b2b.group.created"]
    metrics = worker.metrics()
    assert metrics['couchsync_events_total{outcome="dead_lettered",routing_key="other"}'] == 30
    assert metrics['couchsync_events_total{outcome="dead_lettered",routing_key="b2b.group.created"}'] == 1
    assert not [name for name in metrics if "b2b.group.k" in name]
    assert worker.stop() == 0


def test_a_broker_address_that_does_not_answer_is_passed_over_for_the_next(world, broker, start_worker):
    # Issue 15: a cluster's nodes in one setting; the first one down (nothing listens on its port).
    seed(world)
    closed = f"amqp://127.0.0.1:{localports.free_port()}/%2F"
    worker = start_worker(world, COUCHSYNC_AMQP_URL=f"{closed},{config.DEFAULT_AMQP_URL}")
    broker.publish(group_messages(0)[:1])
    wait_until(lambda: worker.count("applied") == 1 and drained(broker, worker), 60, "the event is applied")
    assert f"at {config.DEFAULT_AMQP_URL}" in worker.log.read_text()
    assert worker.stop() == 0
