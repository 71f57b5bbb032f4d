"""Convergence on the real server, through `couchsync apply`: seeded sequences, in order vs shuffled."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from couchsync.documents import CONTACTS, GROUPS
from couchsync.events import parse_event

from tests.integration.conftest import World

DOMAINS = ["acme.twake.app", "alice.acme.twake.app", "bob.acme.twake.app"]
PEOPLE = [{"email": "alice@acme.com", "firstName": "Alice", "workplaceFqdn": "alice.acme.twake.app"},
          {"email": "bob@acme.com", "firstName": "Bob", "workplaceFqdn": "bob.acme.twake.app"},
          {"email": "Bob@acme.com", "firstName": "Robert", "workplaceFqdn": "bob.acme.twake.app"},
          {"email": "dave@acme.com", "lastName": "Dupont"}]


def generated_sequence(seed: int, length: int = 14) -> list[dict]:
    """Events over two groups and a few people, with colliding timestamps on purpose."""
    rng = random.Random(seed)
    messages = []
    for _ in range(length):
        kind = rng.choice(["created", "updated", "deleted", "member.added", "member.removed", "member.added"])
        body = {"timestamp": f"2026-06-16T10:{rng.randrange(6):02d}:00Z", "organizationId": "acme",
                "id": rng.choice(["engineering", "sales"])}
        if kind == "created":
            body.update(name=rng.choice(["Eng", "Sales"]), members=rng.sample(PEOPLE, rng.randrange(3)))
        elif kind == "updated":
            body.update({rng.choice(["name", "description", "color"]): rng.choice(["", "X", "Y"])})
        elif kind.startswith("member"):
            body["members"] = rng.sample(PEOPLE, rng.randrange(1, 3))
        messages.append({"routingKey": f"b2b.group.{kind}", "body": body})
    return messages


def recreation_sequence(seed: int) -> list[dict]:
    """One group created, deleted, created again (three lives), people added and removed before, between
    and after; minutes collide on purpose."""
    rng = random.Random(seed)
    minute, messages = 0, []

    def add(kind: str, **fields) -> None:
        messages.append({"routingKey": f"b2b.group.{kind}", "body": {
            "timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": "engineering", **fields}})
    for life in range(3):
        minute += rng.randrange(2)
        add("created", name=f"Eng {life}", members=rng.sample(PEOPLE, rng.randrange(3)))
        for _ in range(rng.randrange(1, 4)):
            minute += rng.randrange(3)
            add(rng.choice(["member.added", "member.removed"]), members=rng.sample(PEOPLE, rng.randrange(1, 3)))
        if life < 2:
            minute += rng.randrange(2)
            add("deleted")
    return messages


def apply_with_cli(world: World, messages: list[dict], path, batch: int = 1) -> None:
    path.write_text("\n".join(json.dumps(m) for m in messages))
    done = subprocess.run([sys.executable, "-m", "couchsync", "apply", "--batch", str(batch), str(path)],
                          env=world.cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def directory(world: World) -> dict:
    return {domain: {doctype: {doc_id: {k: v for k, v in doc.items() if k != "_rev"}
                               for doc_id, doc in world.docs(domain, doctype).items()}
                     for doctype in (GROUPS, CONTACTS)} for domain in DOMAINS}


def stamp_of(message: dict) -> str:
    return parse_event(message["routingKey"], json.dumps(message["body"])).stamp


SEEDS = range(1, 11)
BATCHES = (1, 4, 16)


@pytest.mark.parametrize("sequence", ["mixed", "re-creation"])
@pytest.mark.parametrize("seed", SEEDS)
def test_a_shuffled_sequence_with_duplicates_converges_to_the_in_order_directory(couch_server, tmp_path, seed,
                                                                                 sequence):
    # The shuffled run also has the protection deployed: it must converge all the same.
    in_order_world, shuffled_world = World(couch_server), World(couch_server, protected=True)
    for world in (in_order_world, shuffled_world):
        for domain in DOMAINS:
            world.add_instance(domain, "acme", email=f"{domain.split('.')[0]}@acme.com")
    messages = generated_sequence(seed) if sequence == "mixed" else recreation_sequence(seed)
    rng = random.Random(seed * 1000)
    delivered = messages + rng.sample(messages, 4)
    rng.shuffle(delivered)
    try:
        apply_with_cli(in_order_world, sorted(messages, key=stamp_of), tmp_path / "in-order.jsonl")
        # Delivered one by one, or cut into batches (issue 16): each seed takes one batch size.
        apply_with_cli(shuffled_world, delivered, tmp_path / "delivered.jsonl", batch=BATCHES[seed % len(BATCHES)])
        expected = directory(in_order_world)
        assert any(expected[d][CONTACTS] for d in DOMAINS), "the sequence should leave some contacts"
        assert directory(shuffled_world) == expected
    finally:
        in_order_world.cleanup()
        shuffled_world.cleanup()
