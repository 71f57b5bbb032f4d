"""Hostile or broken records in the global instances database, on the real server (issue 18, finding 10).

A record is used only when its domain and prefix are instance names and no other record maps to the same
databases; a skipped record is reported and never stops the others; several candidates for the
organization instance are an error naming them, never a silent pick.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys

import pytest

from couchsync.documents import CONTACTS, GROUPS, managed_group_id
from couchsync.errors import AmbiguousOrganization
from couchsync.events import parse_event
from couchsync.instances import INVALID, InstanceDirectory

from tests.integration.conftest import World

ACME = ["acme.twake.app", "alice.acme.twake.app", "bob.acme.twake.app"]


def seed(world: World) -> None:
    for domain in ACME:
        world.add_instance(domain, "acme", email=f"{domain.split('.')[0]}@acme.com")
    world.add_instance("other.twake.app", "other", email="admin@other.com")


def created(org: str, group: str = "crew") -> bytes:
    return json.dumps({"timestamp": "2026-06-16T10:00:00Z", "organizationId": org, "id": group, "name": "Crew",
                       "members": [{"email": f"dan@{org}.com"}]}).encode()


def record(domain: object, org_id: str, **fields: object) -> dict[str, object]:
    return {"_id": secrets.token_hex(16), "domain": domain, "org_id": org_id, "context": "default", **fields}


def all_dbs(world: World) -> set[str]:
    response = world.server.request("GET", "/_all_dbs")
    response.raise_for_status()
    return set(response.json())


def test_a_record_with_another_instances_prefix_is_skipped_and_nothing_crosses_organizations(world, caplog):
    seed(world)
    bob = world.prefix("bob.acme.twake.app")
    mallory = record("mallory.other.test", "other", prefix=bob.upper())  # Bob's databases, in other case
    world.add_instances([mallory])
    with world.synchronizer() as sync, caplog.at_level(logging.WARNING, logger="couchsync.instances"):
        report = sync.apply(parse_event("b2b.group.created", created("other")))
        assert report.failures == []
        assert [instance.domain for instance in report.instances] == ["other.twake.app"]
        # Before: the other organization's group was written into Bob's databases.
        assert world.docs("bob.acme.twake.app", GROUPS) == {}
        assert world.docs("bob.acme.twake.app", CONTACTS) == {}
        assert set(world.docs("other.twake.app", GROUPS)) == {managed_group_id("other", "crew")}
        # Which of the two owns the databases cannot be told: neither is written to until it is mended.
        acme = sync.apply(parse_event("b2b.group.created", created("acme")))
        assert sorted(instance.domain for instance in acme.instances) == ["acme.twake.app", "alice.acme.twake.app"]
    assert world.docs("bob.acme.twake.app", GROUPS) == {}
    shared = [r.getMessage() for r in caplog.records if "would share the databases" in r.getMessage()]
    assert any(mallory["_id"] in message and "bob.acme.twake.app" in message for message in shared)
    assert any("mallory.other.test" in message for message in shared)


def test_several_organization_instance_candidates_are_an_error_naming_them_and_nothing_is_written(world):
    seed(world)
    world.add_instance("acme.evil.test", "acme")  # a stranger's instance whose first label is the organization id
    with world.synchronizer() as sync:
        with pytest.raises(AmbiguousOrganization, match="acme.evil.test, acme.twake.app"):
            sync.apply(parse_event("b2b.group.created", created("acme")))
    for domain in [*ACME, "acme.evil.test"]:
        assert world.docs(domain, GROUPS) == {} and world.docs(domain, CONTACTS) == {}
    # reconcile refuses to take either as its reference (before: --dry-run listed everything as extra)
    done = subprocess.run([sys.executable, "-m", "couchsync", "reconcile", "--org", "acme", "--dry-run"],
                          env=world.cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 65, done.stdout + done.stderr
    assert "acme.evil.test, acme.twake.app" in done.stderr
    # The protection still goes to each of them: a deployment takes no reference.
    deploy = subprocess.run([sys.executable, "-m", "couchsync", "deploy-design-docs", "--org", "acme", "--dry-run"],
                            env=world.cli_env(), capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert world.db("acme.evil.test", GROUPS) in deploy.stdout


def test_malformed_records_are_skipped_and_reported_and_the_rest_of_the_organization_is_applied(world, caplog):
    seed(world)
    junk = f"t{world.tag}-x/../../_replicator"
    bad = [record("junk.acme.twake.app", "acme", prefix=junk),
           record(["a.acme.twake.app", "b.acme.twake.app"], "acme"),
           record("users.acme.twake.app", "acme", prefix="_users"),
           record(42, "acme"),
           record("bad.acme.twake.app", ["acme"])]
    world.add_instances(bad)
    before = all_dbs(world)
    with world.synchronizer() as sync, caplog.at_level(logging.WARNING, logger="couchsync.instances"):
        report = sync.apply(parse_event("b2b.group.created", created("acme")))
    assert report.failures == []
    assert sorted(instance.domain for instance in report.instances) == ACME
    for domain in ACME:
        assert set(world.docs(domain, GROUPS)) == {managed_group_id("acme", "crew")}
    # Nothing outside this world's own prefix was created, nothing written to CouchDB's own databases.
    assert {db for db in all_dbs(world) - before if not db.startswith(f"t{world.tag}-")} == set()
    assert not any("_replicator/" in db for db in all_dbs(world))
    users = world.server.request("GET", "/_users/_all_docs").json()["rows"]
    assert not [row["id"] for row in users if row["id"].startswith("b2b-")]
    skipped = " ".join(r.getMessage() for r in caplog.records if "skipped the instance record" in r.getMessage())
    for doc in bad:
        assert str(doc["_id"]) in skipped
    # Each is reported once to what counts them (the worker's couchsync_instance_records_rejected_total).
    rejected: list[str] = []
    directory = InstanceDirectory(world.gateway(), world.global_db, on_rejected=rejected.append)
    assert sorted(instance.domain for instance in directory.instances_of("acme")) == ACME
    assert sorted(instance.domain for instance in directory.instances_of("acme")) == ACME
    assert rejected == [INVALID] * len(bad)


def test_bad_records_do_not_stop_a_deployment_to_every_other_instance(world):
    seed(world)
    world.add_instances([record("junk.acme.twake.app", "acme", prefix=f"t{world.tag}-x/../../_replicator"),
                         record("users.acme.twake.app", "acme", prefix="_users")])
    done = subprocess.run([sys.executable, "-m", "couchsync", "deploy-design-docs", "--dry-run"],
                          env=world.cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "_replicator" not in done.stdout and "_users" not in done.stdout
    assert "skipped the instance record" in done.stderr
    assert world.db("alice.acme.twake.app", GROUPS) in done.stdout  # the others are listed
