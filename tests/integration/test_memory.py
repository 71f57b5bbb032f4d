"""The directory state lost without the directory being lost: nothing is deleted, the state is seeded again.

On Apache CouchDB only (purge, a database deleted under a running worker, a second server admin's
403): PouchDB Server neither purges nor enforces what these tests are about the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import localcouch
from couchsync.documents import CONTACTS, GROUPS, group_ids_of, managed_contact_id
from couchsync.events import parse_event
from couchsync.state import group_state_id

from tests.integration.conftest import World
from tests.integration.test_worker import DOMAINS, seed, start_worker, wait_until  # noqa: F401 (a fixture)

GROUP = "b2b-group-eff7808d5b54bb721b52529759597c29"  # acme/engineering
ALICE = {"email": "alice@acme.com", "firstName": "Alice"}
BOB = {"email": "bob@acme.com", "firstName": "Bob"}
CAROL = {"email": "carol@acme.com", "firstName": "Carol"}


@pytest.fixture
def couch_world(world):
    if world.server.kind != localcouch.COUCHDB:
        pytest.skip("Apache CouchDB only: purge, deletion under a worker and a second admin's 403")
    seed(world)
    return world


def message(routing_key: str, minute: int, members=(), **fields) -> tuple[str, bytes]:
    body = {"timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme", "id": "engineering",
            "members": list(members), **fields}
    return routing_key, json.dumps(body).encode()


CREATED = message("b2b.group.created", 30, [ALICE], name="Engineering")
ADDED = message("b2b.group.member.added", 40, [BOB])
ADDED_LATER = message("b2b.group.member.added", 50, [CAROL])


def apply(world: World, *messages: tuple[str, bytes]) -> None:
    with world.synchronizer() as sync:
        for routing_key, body in messages:
            assert sync.apply(parse_event(routing_key, body)).failures == []


def assert_group_everywhere(world: World, *people: dict) -> None:
    for domain in DOMAINS:
        assert GROUP in world.docs(domain, GROUPS), domain
        contacts = world.docs(domain, CONTACTS)
        for person in people:
            contact = contacts.get(managed_contact_id("acme", person["email"]))
            if domain.startswith(person["email"].split("@")[0] + "."):
                continue  # nobody is in their own instance
            assert contact is not None and group_ids_of(contact) == [GROUP], (domain, person["email"])


def purge(world: World, doc_id: str) -> None:
    """What a second server admin can do: purge a state document (every revision)."""
    path = localcouch.db_path(world.state_db)
    rev = world.server.request("GET", f"{path}/{doc_id}").json()["_rev"]
    world.server.request("POST", f"{path}/_purge", json={doc_id: [rev]}).raise_for_status()


def test_a_purged_group_state_then_member_added_keeps_the_group_alive_with_its_members(couch_world):
    apply(couch_world, CREATED)
    purge(couch_world, group_state_id("acme", "engineering"))
    apply(couch_world, ADDED)
    assert_group_everywhere(couch_world, ALICE, BOB)
    state = couch_world.server.request(
        "GET", f"{localcouch.db_path(couch_world.state_db)}/{group_state_id('acme', 'engineering')}").json()
    assert state["alive"] is True and set(state["members"]) == {"alice@acme.com", "bob@acme.com"}


def test_the_state_database_deleted_under_a_running_worker_deletes_nothing_and_is_seeded_again(
        couch_world, broker, start_worker):  # noqa: F811 (the fixture)
    world = couch_world
    worker = start_worker(world, COUCHSYNC_SETTLE_DELAY="0", COUCHSYNC_PROTECTION_GUARD="false")
    broker.publish([CREATED])
    wait_until(lambda: worker.count("applied") == 1, 30, "the creation applied")
    world.server.request("DELETE", localcouch.db_path(world.state_db)).raise_for_status()
    broker.publish([ADDED_LATER])
    wait_until(lambda: worker.count("applied") == 2, 30, "the addition applied")
    assert_group_everywhere(world, ALICE, CAROL)
    seeded = worker.metrics()['couchsync_state_seeded_total{reason="missing"}']
    assert seeded == 2  # the first take-over, then the lost database
    assert "seeded again" in worker.log.read_text()
    worker.stop()
    assert_second_admin_refused(world)


def assert_second_admin_refused(world: World) -> None:
    response = world.server.request("PUT", f"{localcouch.db_path(world.state_db)}/forged", json={"x": 1})
    assert response.status_code == 403, response.text


def test_apply_after_the_state_database_was_deleted_recreates_it_protected(couch_world, tmp_path):
    world = couch_world
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"routingKey": key, "body": json.loads(body)}) + "\n"
                              for key, body in (CREATED, ADDED)))
    run = [sys.executable, "-m", "couchsync", "apply", str(events)]
    assert subprocess.run(run, env=world.cli_env(), capture_output=True).returncode == 0
    world.server.request("DELETE", localcouch.db_path(world.state_db)).raise_for_status()
    done = subprocess.run(run, env=world.cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "seeded again" in done.stderr
    assert_second_admin_refused(world)
    assert_group_everywhere(world, ALICE, BOB)


def test_reconcile_reports_a_group_the_state_lacks_and_deletes_it_nowhere(couch_world):
    world = couch_world
    apply(world, CREATED, ADDED)
    # A state restored from a backup older than the group (here: its document deleted by the sync identity).
    gateway = world.gateway()
    state_id = group_state_id("acme", "engineering")
    rev = gateway.get(world.state_db, state_id)["_rev"]
    assert gateway.bulk_write(world.state_db, [{"_id": state_id, "_rev": rev, "_deleted": True}])[0].ok
    for args in (["--dry-run"], []):
        done = subprocess.run([sys.executable, "-m", "couchsync", "reconcile", "--org", "acme", "--json", *args],
                              env=world.cli_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        entries = {entry["domain"]: entry for entry in json.loads(done.stdout)["instances"]}
        assert {domain: [(item["drift"], item["id"]) for item in entry["items"] if item["id"] == GROUP]
                for domain, entry in entries.items()} == {
            domain: [("unknown to the state: group", GROUP)] for domain in DOMAINS}
        assert all(entry["status"] == "drift" for entry in entries.values())
    assert_group_everywhere(world, ALICE, BOB)
