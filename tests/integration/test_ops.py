"""Operations that heal themselves (issue 17), on the real servers: the worker's protection guard, `deploy-design-docs
--check`, `reconcile --all` (resumed after a SIGKILL), and the queue figures the worker exposes.

The feed tests need CouchDB's `_db_updates` (Apache CouchDB; PouchDB Server answers 400 and the worker sweeps).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

import localcouch
from couchsync.design_docs import VERSION_FIELD
from couchsync.documents import CONTACTS, GROUPS, TAG, managed_contact_id, managed_group_id
from couchsync.events import Member, parse_event
from couchsync.plan import upsert_contact

from tests.integration.conftest import World
from tests.integration.test_protection import deploy
from tests.integration.test_worker import start_worker, wait_until  # noqa: F401 (the fixture)

PROTECTION = "_design/couchsync-protection"
NEEDS_FEED = "PouchDB Server serves no _db_updates feed (it answers 400): the worker sweeps instead"


def needs_feed(world: World) -> None:
    if world.server.kind == localcouch.POUCHDB:
        pytest.skip(NEEDS_FEED)


def forged_contact(doc_id: str) -> dict:
    return {"_id": doc_id, "fullname": "Mallory",
            TAG: {"managed": True, "kind": "contact", "organizationId": "acme", "email": "mallory@acme.com"}}


def put_as_second_admin(world: World, db: str, doc: dict) -> int:
    return world.server.request("PUT", f"{localcouch.db_path(db)}/{doc['_id']}", json=doc).status_code


def protection_rev(world: World, db: str) -> str | None:
    response = world.server.request("GET", f"{localcouch.db_path(db)}/{PROTECTION}")
    return response.json()["_rev"] if response.ok else None


def following(worker) -> bool:
    return worker.metrics().get("couchsync_protection_feed_following") == 1.0


def test_a_contacts_database_created_while_the_worker_runs_refuses_a_forged_managed_contact_within_5s(
        world, start_worker, record_property):  # noqa: F811 (the fixture)
    needs_feed(world)
    world.add_instance("acme.twake.app", "acme")
    worker = start_worker(world)
    wait_until(lambda: following(worker), 30, "the worker follows _db_updates")
    # When: the stack creates a new member's databases, and a second admin forges managed contacts at once.
    db = world.db("new.acme.twake.app", CONTACTS)
    created = time.monotonic()
    localcouch.ensure_db(world.server, db)
    attempt, status = 0, 201
    while status != 403 and time.monotonic() - created < 10:
        attempt += 1
        status = put_as_second_admin(world, db, forged_contact(f"forged-{attempt}"))
        time.sleep(0.05)
    elapsed = time.monotonic() - created
    record_property("seconds_to_403", round(elapsed, 3))
    print(f"new database refuses a forged managed contact after {elapsed:.2f}s ({attempt} attempts)")
    assert status == 403 and elapsed < 5
    groups = world.db("new.acme.twake.app", GROUPS)
    localcouch.ensure_db(world.server, groups)
    wait_until(lambda: protection_rev(world, groups) is not None, 5, "the groups database is protected")
    assert world.server.request("GET", f"{localcouch.db_path(db)}/_design/couchsync").ok  # the lookup view too
    assert worker.metrics().get("couchsync_protection_installed_total", 0) >= 2
    assert worker.metrics().get("couchsync_protection_restored_total") == 0


def test_a_deleted_changed_or_forged_newer_protection_is_back_within_5s_and_counted(
        world, start_worker, record_property):  # noqa: F811 (the fixture)
    needs_feed(world)
    world.protected = True
    world.add_instance("acme.twake.app", "acme")
    world.add_instance("alice.acme.twake.app", "acme")
    worker = start_worker(world)
    wait_until(lambda: following(worker), 30, "the worker follows _db_updates")
    contacts, groups = world.db("alice.acme.twake.app", CONTACTS), world.db("alice.acme.twake.app", GROUPS)
    # A second admin deletes one protection...
    rev = protection_rev(world, contacts)
    deleted = time.monotonic()
    assert world.server.request("DELETE", f"{localcouch.db_path(contacts)}/{PROTECTION}", params={"rev": rev}).ok
    wait_until(lambda: protection_rev(world, contacts) is not None, 5, "the deleted protection is back")
    back = time.monotonic() - deleted
    # ... and rewrites another to let everyone through.
    path = f"{localcouch.db_path(groups)}/{PROTECTION}"
    changed = world.server.request("GET", path).json()
    changed["validate_doc_update"] = "function (newDoc, oldDoc, userCtx) {}"
    edited = time.monotonic()
    assert world.server.request("PUT", path, json=changed).ok
    wait_until(lambda: "function (newDoc, oldDoc, userCtx) {}" != world.server.request("GET", path).json().get(
        "validate_doc_update"), 5, "the changed protection is put back")
    restored = time.monotonic() - edited
    # ... and then stamps a permissive one with a version from the future (the seal it kept is of other content).
    forged = {**world.server.request("GET", path).json(), "validate_doc_update": "function () {}",
              VERSION_FIELD: "99.0.0"}
    assert world.server.request("PUT", path, json=forged).ok
    wait_until(lambda: world.server.request("GET", path).json().get(VERSION_FIELD) != "99.0.0", 5,
               "the forged newer protection is put back")
    record_property("seconds_deleted_back", round(back, 3))
    record_property("seconds_changed_back", round(restored, 3))
    print(f"deleted protection back after {back:.2f}s, changed one after {restored:.2f}s")
    wait_until(lambda: worker.metrics().get("couchsync_protection_restored_total") == 3, 5, "all three are counted")
    assert put_as_second_admin(world, contacts, forged_contact("forged")) == 403
    assert deploy(world, "--check").returncode == 0


def test_a_restarted_worker_resumes_the_feed_and_protects_what_was_created_while_it_was_down(
        world, start_worker):  # noqa: F811 (the fixture)
    needs_feed(world)
    world.add_instance("acme.twake.app", "acme")
    first = start_worker(world)
    wait_until(lambda: following(first), 30, "the worker follows _db_updates")
    assert first.stop() == 0
    # A database of an instance the global database does not list yet: no sweep would find it, only the feed.
    db = world.db("unlisted.acme.twake.app", CONTACTS)
    localcouch.ensure_db(world.server, db)
    second = start_worker(world)
    wait_until(lambda: protection_rev(world, db) is not None, 10, "the database created meanwhile is protected")
    assert "following _db_updates from the saved sequence" in second.log.read_text()


def test_without_the_feed_the_worker_says_so_and_its_sweep_protects_every_instance(
        world, start_worker):  # noqa: F811 (the fixture)
    if world.server.kind != localcouch.POUCHDB:
        pytest.skip("Apache CouchDB serves the _db_updates feed (the sweep fallback is PouchDB Server's)")
    for domain in ("acme.twake.app", "alice.acme.twake.app"):
        world.add_instance(domain, "acme")
        localcouch.ensure_db(world.server, world.db(domain, CONTACTS))
    worker = start_worker(world)
    wait_until(lambda: all(protection_rev(world, world.db(domain, CONTACTS))
                           for domain in ("acme.twake.app", "alice.acme.twake.app")), 20, "the sweep protects")
    assert "serves no _db_updates feed" in worker.log.read_text()
    assert worker.metrics().get("couchsync_protection_feed_following") == 0.0


def test_check_lists_exactly_the_databases_broken_by_hand_and_exits_0_once_restored(world):
    domains = ["acme.twake.app", "alice.acme.twake.app", "bob.acme.twake.app"]
    for domain in domains:
        world.add_instance(domain, "acme")
    assert deploy(world, "--create-missing").returncode == 0
    assert deploy(world, "--check").returncode == 0
    # Broken by hand: one protection deleted, one changed.
    alice = world.db("alice.acme.twake.app", CONTACTS)
    bob = world.db("bob.acme.twake.app", GROUPS)
    assert world.server.request("DELETE", f"{localcouch.db_path(alice)}/{PROTECTION}",
                                params={"rev": protection_rev(world, alice)}).ok
    path = f"{localcouch.db_path(bob)}/{PROTECTION}"
    assert world.server.request("PUT", path, json={**world.server.request("GET", path).json(),
                                                   "validate_doc_update": "function () {}"}).ok
    done = deploy(world, "--check", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert {entry["db"]: entry["design_docs"] for entry in report["broken"]} == {
        alice: {PROTECTION: "missing"}, bob: {PROTECTION: "differs"}}
    text = deploy(world, "--check")
    assert text.returncode == 1
    expected = [f"{alice}: {PROTECTION} missing", f"{bob}: {PROTECTION} differs"]
    assert sorted(text.stdout.splitlines()[:-1]) == sorted(expected)
    assert deploy(world).returncode == 0
    again = deploy(world, "--check")
    assert again.returncode == 0, again.stdout
    assert again.stdout.splitlines()[-1].startswith("checked 7 databases: 0 with design documents missing")


def test_bootstrap_member_installs_the_protection_before_it_copies(world):
    world.add_instance("acme.twake.app", "acme", email="admin@acme.com")
    world.add_instance("new.acme.twake.app", "acme", email="new@acme.com")
    done = subprocess.run([sys.executable, "-m", "couchsync", "bootstrap-member", "new.acme.twake.app"],
                          env=world.cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for doctype in (CONTACTS, GROUPS):
        assert protection_rev(world, world.db("new.acme.twake.app", doctype)) is not None
    assert put_as_second_admin(world, world.db("new.acme.twake.app", CONTACTS), forged_contact("forged")) == 403


ORGS = ["org-a", "org-b", "org-c"]


def org_domains(org: str) -> list[str]:
    return [f"{org}.twake.app", f"alice.{org}.twake.app", f"bob.{org}.twake.app"]


def seed_organizations(world: World) -> None:
    """Three organizations, each with two groups of ten people."""
    world.protected = True
    with world.synchronizer() as sync:
        for org in ORGS:
            for domain in org_domains(org):
                world.add_instance(domain, org, email=f"{domain.split('.')[0]}@{org}.com")
            for g in range(2):
                members = [{"email": f"m{g}{i}@{org}.com", "firstName": f"M{g}{i}"} for i in range(10)]
                body = {"timestamp": "2026-06-16T10:00:00Z", "organizationId": org, "id": f"g{g}",
                        "name": f"Group {g}", "members": members}
                assert sync.apply(parse_event("b2b.group.created", json.dumps(body))).failures == []


def inject_drift(world: World) -> int:
    """In each organization: a group lost and a group renamed at bob's, a contact for nobody at alice's
    (as the sync identity: the protection refuses everyone else). The drift items injected."""
    gateway = world.gateway()
    for org in ORGS:
        bob, alice = f"bob.{org}.twake.app", f"alice.{org}.twake.app"
        g0, g1 = managed_group_id(org, "g0"), managed_group_id(org, "g1")
        groups = world.docs(bob, GROUPS)
        results = gateway.bulk_write(world.db(bob, GROUPS), [
            {"_id": g1, "_rev": groups[g1]["_rev"], "_deleted": True}, {**groups[g0], "name": "Hacked"}])
        assert all(result.ok for result in results)
        ghost = upsert_contact(None, Member(f"ghost@{org}.com", name="Ghost"), org)
        assert ghost["_id"] == managed_contact_id(org, f"ghost@{org}.com")
        assert gateway.bulk_write(world.db(alice, CONTACTS), [ghost])[0].ok
    return 3 * len(ORGS)


def reconcile_all(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "couchsync", "reconcile", "--all", *args],
                          env=world.cli_env(), capture_output=True, text=True, timeout=300)


def organization_lines(stdout: str) -> dict[str, dict]:
    return {entry["organization"]: entry for entry in map(json.loads, (
        line for line in stdout.splitlines() if line.startswith("{")))}


def textfile_samples(path) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in path.read_text().splitlines()
            if line and not line.startswith("#")}


def test_reconcile_all_repairs_the_drift_of_every_organization_and_a_second_run_finds_none(world, tmp_path):
    seed_organizations(world)
    baseline = reconcile_all(world)  # the members' own contacts, which no user.created gave here
    assert baseline.returncode == 0, baseline.stdout + baseline.stderr
    injected = inject_drift(world)
    textfile = tmp_path / "couchsync-reconcile.prom"
    started = time.time()
    done = reconcile_all(world, "--json", "--textfile", str(textfile))
    assert done.returncode == 0, done.stdout + done.stderr
    found = organization_lines(done.stdout)
    assert sorted(found) == ORGS
    assert {org: (entry["found"], entry["repaired"]) for org, entry in found.items()} == {org: (3, 3) for org in ORGS}
    assert done.stdout.splitlines()[-1] == (f"3 organizations (0 by the interrupted run): 3 ok, 0 failed; "
                                            f"drift found {injected}, repaired {injected}")
    samples = textfile_samples(textfile)
    assert samples["couchsync_reconcile_drift_found"] == injected
    assert samples["couchsync_reconcile_drift_repaired"] == injected
    assert samples["couchsync_reconcile_last_success_timestamp_seconds"] >= started
    again = reconcile_all(world, "--json")
    assert again.returncode == 0
    assert {org: entry["found"] for org, entry in organization_lines(again.stdout).items()} == dict.fromkeys(ORGS, 0)


def test_a_reconcile_all_killed_midway_is_finished_by_the_next_without_redoing_an_organization(world):
    seed_organizations(world)
    assert reconcile_all(world).returncode == 0
    inject_drift(world)
    # When: a run, one organization at a time, is killed (SIGKILL) as soon as it reports the first one.
    process = subprocess.Popen([sys.executable, "-m", "couchsync", "reconcile", "--all", "--json",
                                "--org-concurrency", "1"], env=world.cli_env(), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    first = json.loads(process.stdout.readline())
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    killed = organization_lines(json.dumps(first) + "\n" + process.stdout.read())
    process.stdout.close()
    assert 1 <= len(killed) < len(ORGS), killed
    # Then: the next run resumes, reconciles only the others, and repairs what is left.
    resumed = reconcile_all(world, "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.splitlines()[0].startswith("resuming the run started at ")
    redone = organization_lines(resumed.stdout)
    assert set(redone).isdisjoint(killed) and set(redone) | set(killed) == set(ORGS)
    assert all(entry["repaired"] == 3 for entry in redone.values())
    final = reconcile_all(world, "--json")
    assert {org: entry["found"] for org, entry in organization_lines(final.stdout).items()} == dict.fromkeys(ORGS, 0)


def test_the_worker_exposes_its_queue_depths(world, broker, start_worker):  # noqa: F811 (the fixture)
    world.add_instance("acme.twake.app", "acme")
    worker = start_worker(world)
    broker.publish([("b2b.group.created", b"{not json")])
    wait_until(lambda: worker.count("dead_lettered") == 1, 30, "the malformed message is dead-lettered")
    wait_until(lambda: worker.metrics().get('couchsync_queue_messages{queue="dead"}') == 1.0, 15,
               "the dead-letter queue's depth shows")
    samples = worker.metrics()
    assert samples['couchsync_queue_messages{queue="main"}'] == 0.0
    assert samples["couchsync_oldest_message_age_seconds"] == 0.0
