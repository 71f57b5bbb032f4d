"""A CouchDB node of one worker stopped for 2 minutes on the three-node clusters (issue 24): that worker
(the one serving the organization's partition) pauses, its partition passes to another, the others go
on, nothing is dead-lettered, and the directory is the in-order one."""

from __future__ import annotations

import time

import pytest
import requests

from tests.cluster.test_scale_out import (  # noqa: F401 (fixtures)
    DOMAINS, NO_HOLD, cluster_broker, cluster_world, conflicted, differences, running, scale_out_events)
from tests.integration.conftest import World
from tests.integration.test_worker import Worker, apply_in_process, directory, drained, seed, wait_until

EVENTS = 300  # the first of the scale-out events: enough for the others to go on, quick to drain

pytestmark = pytest.mark.cluster


def in_order_directory(couch_server, messages) -> dict:
    """The directory an in-order, one-by-one, in-process run of the events leaves (on one node)."""
    world = World(couch_server)
    try:
        seed(world, DOMAINS)
        apply_in_process(world, messages)
        return directory(world, DOMAINS)
    finally:
        world.cleanup()


def health(worker: Worker) -> tuple[int, str]:
    answer = requests.get(f"http://127.0.0.1:{worker.port}/healthz", timeout=5)
    return answer.status_code, answer.text.strip()


@pytest.mark.slow
def test_the_couchdb_node_of_one_worker_stopped_two_minutes_pauses_that_worker_only_and_dead_letters_nothing(
        couch_server, couch_cluster, rabbit_cluster, cluster_world, cluster_broker, tmp_path,  # noqa: F811
        running, record_property):  # noqa: F811
    world, broker, urls = cluster_world, cluster_broker, rabbit_cluster.urls
    seed(world, DOMAINS)
    for number in range(3):  # each worker on its own CouchDB node, and its own RabbitMQ node first
        running.append(Worker(world, broker, tmp_path / f"worker-{number}.log", COUCHSYNC_PAUSE_PROBE="1",
                              **NO_HOLD, COUCHSYNC_COUCH_URL=couch_cluster.nodes[number].url,
                              COUCHSYNC_AMQP_URL=",".join(urls[number:] + urls[:number])).start())
    valid = scale_out_events()[:EVENTS]
    # One worker at a time serves acme's partition: the first event tells which.
    broker.publish(valid[:1])
    wait_until(lambda: any(worker.count("applied") for worker in running), 60, "the first event is applied")
    number = next(number for number, worker in enumerate(running) if worker.count("applied"))
    stopped, others = running[number], [worker for worker in running if worker is not running[number]]
    # When: the CouchDB node of that worker stops for 2 minutes while the other events arrive.
    couch_cluster.stop_node(number)
    down = time.monotonic()
    broker.publish(valid[1:])
    in_order = in_order_directory(couch_server, valid)  # meanwhile: the reference, on the single node
    samples = []
    while time.monotonic() - down < 120:
        samples.append((round(time.monotonic() - down), health(stopped), [health(worker) for worker in others]))
        time.sleep(5)
    handled_meanwhile = sum(worker.count("applied") for worker in others)
    couch_cluster.start_node(number)
    back = time.monotonic()
    wait_until(lambda: health(stopped) == (200, "ok"), 10, "the paused worker resumes within 10 s")
    resumed = time.monotonic() - back
    wait_until(lambda: drained(broker, *running), 600, "every event is applied")
    record_property("seconds_to_resume", round(resumed, 1))
    print(f"the others applied {handled_meanwhile:g} events during the outage; the paused worker resumed "
          f"{resumed:.1f}s after its node returned")
    # Then: only that worker paused (from its first failure on), the others consumed throughout.
    later = [sample for sample in samples if sample[0] >= 15]
    assert later and all(mine == (503, "paused: couchdb") for _, mine, _ in later), samples
    assert all(theirs == [(200, "ok"), (200, "ok")] for _, _, theirs in samples), samples
    assert handled_meanwhile > 0 and stopped.count("paused") > 0
    assert sum(worker.count("dead_lettered") for worker in running) == 0
    assert broker.depths()[broker.settings.dead_letter_queue] == 0
    wait_until(lambda: not any(worker.metrics()["couchsync_settling_pending"] for worker in running)
               and not conflicted(world, couch_cluster.first), 180, "every worker has settled")
    deadline = time.monotonic() + 30
    while (lines := differences(directory(world, DOMAINS), in_order)) and time.monotonic() < deadline:
        time.sleep(1)
    assert lines == []
    for worker in running:
        assert worker.stop() == 0
