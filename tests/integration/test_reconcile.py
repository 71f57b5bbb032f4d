"""`couchsync reconcile` against the real server: drift injected by hand is listed exactly, then repaired."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from couchsync.documents import CONTACTS, GROUPS, TAG, managed_contact_id, managed_group_id
from couchsync.plan import upsert_contact
from couchsync.events import Member

from tests.integration.conftest import World
from tests.integration.test_onboarding import MEMBERS, NEW, ORG, acme  # noqa: F401 (the fixture)

ALICE, BOB, CAROL = MEMBERS
G0, G1 = managed_group_id("acme", "g0"), managed_group_id("acme", "g1")
GHOST = managed_contact_id("acme", "ghost@acme.com")


def reconcile(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "couchsync", "reconcile", "--org", "acme", *args],
                          env=world.cli_env(), capture_output=True, text=True, timeout=300)


def report(world: World, *args: str) -> dict[str, dict]:
    done = reconcile(world, "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return {entry["domain"]: entry for entry in json.loads(done.stdout)["instances"]}


def drift(entries: dict[str, dict]) -> set[tuple[str, str, str]]:
    return {(domain, item["drift"], item["id"]) for domain, entry in entries.items() for item in entry["items"]}


@pytest.fixture
def converged(acme):  # noqa: F811 (the fixture)
    """The organization with every instance holding its whole directory (members' contacts included, which
    the user.created events, never sent here, would have given)."""
    done = reconcile(acme)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every instance, the organization instance included: the state, not it, is the reference.
    assert reconcile(acme).stdout.strip().splitlines()[-1] == "5 instances: 5 ok"
    return acme


def inject_drift(world: World) -> dict[str, bytes]:
    """A restored backup, a forged contact, a hand edit, and the user's own look-alikes (as the sync identity,
    since the protection refuses everyone else). Returns the look-alikes as stored."""
    gateway = world.gateway()
    bob_groups = world.docs(BOB, GROUPS)
    assert gateway.bulk_write(world.db(BOB, GROUPS), [
        {"_id": G1, "_rev": bob_groups[G1]["_rev"], "_deleted": True},
        {**bob_groups[G0], "name": "Hacked"}])[0].ok
    ghost = upsert_contact(None, Member("ghost@acme.com", name="Ghost"), "acme")
    assert gateway.bulk_write(world.db(ALICE, CONTACTS), [ghost])[0].ok
    m01 = next(doc for doc in world.docs(CAROL, CONTACTS).values()
               if (doc.get(TAG) or {}).get("email") == "m01@acme.com")
    world.put(CAROL, CONTACTS, {"_id": "my-m01", "fullname": m01["fullname"], "email": m01["email"]})
    world.put(CAROL, GROUPS, {"_id": "my-group-0", "name": "Group 0"})
    return {"contact": world.raw(CAROL, CONTACTS, "my-m01"), "group": world.raw(CAROL, GROUPS, "my-group-0")}


def test_dry_run_lists_exactly_the_drift_then_the_repair_leaves_nothing_to_do(converged):
    world = converged
    look_alikes = inject_drift(world)
    before = {domain: world.revisions(domain) for domain in MEMBERS}
    dry = report(world, "--dry-run")
    assert drift(dry) == {(BOB, "missing group", G1), (BOB, "different group: name", G0),
                          (ALICE, "extra contact", GHOST)}
    assert {domain: entry["status"] for domain, entry in dry.items()} == {
        ORG: "ok", ALICE: "drift", BOB: "drift", CAROL: "ok", NEW: "ok"}
    assert {domain: world.revisions(domain) for domain in MEMBERS} == before

    repaired = report(world)
    assert drift(repaired) == drift(dry)
    assert {domain: entry["status"] for domain, entry in repaired.items()} == {
        ORG: "ok", ALICE: "repaired", BOB: "repaired", CAROL: "ok", NEW: "ok"}
    assert world.docs(BOB, GROUPS)[G0]["name"] == "Group 0"
    assert {k: v for k, v in world.docs(BOB, GROUPS)[G1].items() if k != "_rev"} == {
        k: v for k, v in world.docs(ORG, GROUPS)[G1].items() if k != "_rev"}
    assert GHOST not in world.docs(ALICE, CONTACTS)
    assert look_alikes == {"contact": world.raw(CAROL, CONTACTS, "my-m01"),
                           "group": world.raw(CAROL, GROUPS, "my-group-0")}

    after = {domain: world.revisions(domain) for domain in MEMBERS}
    again = reconcile(world)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == "5 instances: 5 ok"
    assert {domain: world.revisions(domain) for domain in MEMBERS} == after


def test_more_deletions_than_the_threshold_are_refused_until_forced(converged):
    world = converged
    gateway = world.gateway()
    ghosts = [upsert_contact(None, Member(f"ghost{i}@world.com"), "acme") for i in range(5)]
    assert all(result.ok for result in gateway.bulk_write(world.db(CAROL, CONTACTS), ghosts))
    before = world.revisions(CAROL)
    refused = reconcile(world, "--instance", CAROL, "--max-deletions", "2")
    assert refused.returncode == 1
    assert "would delete 5 of its" in refused.stdout and "--max-deletions 2 allows (2)" in refused.stdout
    assert world.revisions(CAROL) == before
    assert reconcile(world, "--instance", CAROL, "--max-deletions", "5%").returncode == 1
    forced = report(world, "--instance", CAROL, "--max-deletions", "2", "--force")
    assert forced[CAROL]["status"] == "repaired" and forced[CAROL]["extra"] == 5
    assert not {doc["_id"] for doc in ghosts} & set(world.docs(CAROL, CONTACTS))


@pytest.mark.parametrize("args, message", [
    (["--instance", "nobody.acme.twake.app"], "is not an instance"),
    (["--max-deletions", "lots"], "--max-deletions takes a count"),
])
def test_wrong_arguments_are_clear_errors(acme, args, message):  # noqa: F811 (the fixture)
    done = reconcile(acme, *args)
    assert done.returncode != 0 and message in done.stderr
