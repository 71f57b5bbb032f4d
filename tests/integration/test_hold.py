"""The mass-removal hold through the worker: removals past the threshold wait for a person."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import localcouch
from tests.integration.conftest import Broker, World
from tests.integration.test_worker import (  # noqa: F401 (start_worker: a fixture)
    apply_in_process, assert_same_as_uninterrupted, dead_letters, seed, start_worker, wait_until)

GROUPS, SIZE = 4, 50  # 200 memberships
PEOPLE = [f"m{i:03d}@acme.com" for i in range(GROUPS * SIZE)]


def message(routing_key: str, group: int, emails, second: int, **fields) -> tuple[str, bytes]:
    body = {"timestamp": f"2026-06-16T11:{second // 60:02d}:{second % 60:02d}Z", "organizationId": "acme",
            "id": f"g{group}", "members": [{"email": email} for email in emails], **fields}
    return routing_key, json.dumps(body).encode()


def organization() -> list[tuple[str, bytes]]:
    return [message("b2b.group.created", g, PEOPLE[g * SIZE:(g + 1) * SIZE], 0, name=f"Group {g}")
            for g in range(GROUPS)]


def hold(world: World, broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "couchsync", "hold", *args], env=world.cli_env(**broker.env()),
                          capture_output=True, text=True, timeout=120)


def test_a_mass_removal_waits_additions_go_on_and_release_gives_the_in_order_directory(
        couch_server, world, broker, start_worker):  # noqa: F811 (the fixture)
    if world.server.kind != localcouch.COUCHDB:
        pytest.skip("the hold is the broker's side: once, on the reference server, keeps CI short")
    seed(world)
    created = organization()
    apply_in_process(world, created)
    worker = start_worker(world, COUCHSYNC_SETTLE_DELAY="0", COUCHSYNC_PROTECTION_GUARD="false")
    # 60 removals of 200 memberships (beyond 10% and from the 50th: held), additions among them.
    removals = [message("b2b.group.member.removed", i // SIZE, [email], 10 + i) for i, email in enumerate(PEOPLE[:60])]
    additions = [message("b2b.group.member.added", 3, [f"new{i}@acme.com"], 100 + i) for i in range(5)]
    broker.publish(removals[:30] + additions + removals[30:])
    wait_until(lambda: worker.count("applied") == 65, 60, "every message applied or held")
    assert worker.metrics()["couchsync_held_total"] == 11
    assert worker.metrics()["couchsync_held_messages"] == 11

    listed = hold(world, broker, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [waiting] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (waiting["organization"], waiting["messages"], waiting["memberships"]) == ("acme", 11, 11)
    assert "mass removal" in waiting["reason"]

    released = hold(world, broker, "release", "acme")
    assert released.returncode == 0, released.stderr
    assert "released 11 messages" in released.stdout
    assert hold(world, broker, "list").stdout == ""
    assert_same_as_uninterrupted(couch_server, world, created + removals + additions)

    # The window still counts the burst: the next removals wait too; dropped, they are dead letters.
    late = [message("b2b.group.member.removed", 2, [email], 300 + i) for i, email in enumerate(PEOPLE[100:103])]
    broker.publish(late)
    wait_until(lambda: worker.metrics()["couchsync_held_total"] == 14, 30, "the late removals held")
    dropped = hold(world, broker, "drop", "acme", "--reason", "an import gone wrong")
    assert dropped.returncode == 0 and "dropped 3 messages" in dropped.stdout, dropped.stderr
    reasons = [letter["reason"] for letter in dead_letters(world, broker)]
    assert reasons == ["dropped from the hold: an import gone wrong"] * 3
    assert_same_as_uninterrupted(couch_server, world, created + removals + additions)
