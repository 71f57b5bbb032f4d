from __future__ import annotations

from collections import Counter

import pytest

from couchsync.config import AmqpSettings, Secret
from couchsync.partitions import partition_of, share, to_release


def test_partition_is_stable_across_processes_and_versions():
    # Fixed values: a change of hash would send an organization's messages to another partition
    # while older workers still route by the old one.
    assert [partition_of(org, 16) for org in ("acme", "org00", "org19")] == [
        partition_of("acme", 16), partition_of("org00", 16), partition_of("org19", 16)]
    assert partition_of("acme", 16) == int.from_bytes(__import__("hashlib").sha256(b"acme").digest()[:8], "big") % 16


def test_partitions_spread_organizations():
    counts = Counter(partition_of(f"org{n:04d}", 16) for n in range(1600))
    assert len(counts) == 16
    assert max(counts.values()) < 2 * min(counts.values())


def test_partition_queue_names():
    settings = AmqpSettings(urls=("amqp://localhost",), username="guest", password=Secret("guest"), partitions=3)
    assert settings.partition_queues == (
        "couchsync.b2b.group.p000", "couchsync.b2b.group.p001", "couchsync.b2b.group.p002")


@pytest.mark.parametrize(("partitions", "workers", "expected"), [(16, 1, 16), (16, 3, 6), (16, 0, 16), (2, 3, 1)])
def test_share(partitions, workers, expected):
    assert share(partitions, workers) == expected


def test_a_worker_gives_up_what_is_beyond_its_share_highest_first():
    assert to_release({0, 3, 5, 9, 12, 15}, 16, 3) == []
    assert to_release(set(range(16)), 16, 3) == [15, 14, 13, 12, 11, 10, 9, 8, 7, 6]
    assert to_release({1, 2}, 16, 1) == []


def test_releasing_one_at_a_time_spreads_partitions_among_workers():
    # A simulation of RabbitMQ 3.10's single-active-consumer lines: worker 0 registered first everywhere,
    # then workers 1 and 2. Each worker in turn gives up its excess (to the back of the line).
    lines = {p: [0, 1, 2] for p in range(16)}
    for _ in range(20):
        for worker in range(3):
            held = {p for p, line in lines.items() if line[0] == worker}
            for p in to_release(held, 16, 3):
                lines[p].remove(worker)
                lines[p].append(worker)
    holders = Counter(line[0] for line in lines.values())
    # Every worker holds some, none more than its share (16 / 3, rounded up).
    assert len(holders) == 3 and max(holders.values()) == share(16, 3)
