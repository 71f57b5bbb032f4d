"""Partitions on the real RabbitMQ: two `couchsync worker`s share eight organizations' partitions, the one
holding an organization is SIGKILLed and restarted, and their logs show no organization handled by both
at overlapping times.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from couchsync.documents import CONTACTS
from couchsync.partitions import partition_of

from tests.integration.conftest import Broker, World
from tests.integration.test_worker import Message, Worker, drained, seed, wait_until
from tests.integration.test_worker import start_worker  # noqa: F401 (a fixture)

ORGS = [f"org{n}" for n in range(8)]
BATCH_LINE = re.compile(r"batch organization=(\S+) messages=\d+ started=([\d.]+) ended=([\d.]+)")


def domain(org: str) -> str:
    return f"{org}.twake.app"


def created(org: str) -> Message:
    return "b2b.group.created", json.dumps({"timestamp": "2026-06-16T10:00:00Z", "organizationId": org, "id": "g",
                                            "name": "Group", "members": []}).encode()


def added(org: str, number: int) -> Message:
    return "b2b.group.member.added", json.dumps({
        "timestamp": "2026-06-16T11:00:00Z", "organizationId": org, "id": "g",
        "members": [{"email": f"m{number:04d}@{org}.com", "firstName": f"Member {number}"}]}).encode()


class Stream:
    """One member added to every organization per round, each a new person (adds commute)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.rounds = 0

    def round(self) -> None:
        self.broker.publish([added(org, self.rounds) for org in ORGS])
        self.rounds += 1


def held(worker: Worker) -> set[int]:
    return {int(re.search(r'partition="(\d+)"', name).group(1))  # type: ignore[union-attr]
            for name, value in worker.metrics().items() if name.startswith("couchsync_partition_held") and value}


def has_member(world: World, org: str, number: int) -> bool:
    return any(doc.get("email") == f"m{number:04d}@{org}.com" or f"m{number:04d}@{org}.com" in json.dumps(doc)
               for doc in world.docs(domain(org), CONTACTS).values())


def spans(log: Path) -> list[tuple[str, float, float]]:
    return [(m.group(1), float(m.group(2)), float(m.group(3))) for m in BATCH_LINE.finditer(log.read_text())]


def overlapping(logs: list[Path]) -> list[tuple[str, int, int]]:
    """(organization, worker, worker) for each pair of batches of one organization, by two workers, whose
    spans overlap."""
    found = []
    by_worker = [spans(log) for log in logs]
    for a, first in enumerate(by_worker):
        for b in range(a + 1, len(by_worker)):
            for org, start, end in first:
                found += [(org, a, b) for other, s, e in by_worker[b] if other == org and s < end and start < e]
    return found


def test_workers_share_partitions_a_killed_ones_are_taken_over_within_30s_and_a_restarted_one_gets_a_share(
        world, broker, start_worker, tmp_path):  # noqa: F811 (the fixture)
    for org in ORGS:
        seed(world, [domain(org)], org=org)
    first = start_worker(world)
    broker.publish([created(org) for org in ORGS])
    wait_until(lambda: drained(broker, first), 60, "the groups are created")
    second = start_worker(world)
    stream = Stream(broker)

    def both_hold() -> bool:
        stream.round()
        mine, theirs = held(first), held(second)  # while one is handed over, both may count it a moment
        return bool(mine) and bool(theirs) and mine.isdisjoint(theirs)
    wait_until(both_hold, 120, "both workers hold partitions, none both")

    # The first worker dies holding an organization: the second applies that organization's next event.
    org = next(org for org in ORGS if partition_of(org, broker.partitions) in held(first))
    first.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    number = stream.rounds
    stream.round()
    wait_until(lambda: has_member(world, org, number), 30, f"{org}'s event is applied by the other worker")
    taken_over = time.monotonic() - killed_at

    restarted = Worker(world, broker, tmp_path / "restarted.log").start()
    try:
        restarted_at = time.monotonic()

        def restarted_holds() -> bool:
            stream.round()
            return bool(held(restarted))
        wait_until(restarted_holds, 120, "the restarted worker holds a partition")
        share_after = time.monotonic() - restarted_at
        wait_until(lambda: drained(broker, second, restarted), 120, "the queues are drained")
    finally:
        restarted.stop()
    print(f"\ntaken over in {taken_over:.1f}s; the restarted worker held a partition after {share_after:.1f}s; "
          f"{stream.rounds} rounds of {len(ORGS)} events")
    assert all(has_member(world, org, n) for org in ORGS for n in range(stream.rounds))
    logs = [first.log, second.log, restarted.log]
    assert sum(len(spans(log)) for log in logs) > len(ORGS)
    assert overlapping(logs) == []
