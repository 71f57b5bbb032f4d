"""`couchsync deploy-design-docs` on the real server: idempotent, dry run, missing databases, scope, failures."""

from __future__ import annotations

import localcouch
from couchsync.documents import CONTACTS, GROUPS, SETTINGS

from tests.integration.test_protection import deploy

ACME = ["acme.twake.app", "alice.acme.twake.app"]
OTHER = ["other.twake.app"]
DDOCS = {CONTACTS: ["couchsync", "couchsync-protection"], GROUPS: ["couchsync-protection"]}
GLOBAL_DDOCS = ["by-orgdomain", "by-orgid"]


def seed(world, domains_by_org, *, with_databases=True):
    for org, domains in domains_by_org.items():
        for domain in domains:
            world.add_instance(domain, org, email=f"{domain.split('.')[0]}@{org}.com")
            if with_databases:
                for doctype in (CONTACTS, GROUPS):
                    localcouch.ensure_db(world.server, world.db(domain, doctype))


def design_revisions(world, domains):
    """The revision of every couchsync design document, None where it is missing."""
    found = {}
    for domain in domains:
        for doctype, names in DDOCS.items():
            for name in names:
                path = localcouch.db_path(world.db(domain, doctype)) + f"/_design/{name}"
                response = world.server.request("GET", path)
                found[(domain, doctype, name)] = response.json().get("_rev") if response.ok else None
    for name in GLOBAL_DDOCS:
        response = world.server.request("GET", localcouch.db_path(world.global_db) + f"/_design/{name}")
        found[("global", name)] = response.json().get("_rev") if response.ok else None
    return found


def summary(done):
    return done.stdout.strip().splitlines()[-1]


def test_deploying_twice_installs_then_reports_everything_unchanged_with_no_new_revision(world):
    seed(world, {"acme": ACME, "other": OTHER})
    first = deploy(world)
    assert first.returncode == 0, first.stdout + first.stderr
    # One more: the protection of couchsync's own state database, which deploying creates.
    assert summary(first) == ("design documents installed: 12, updated: 0, unchanged: 0; "
                              "databases created: 1, missing: 0, failed: 0")
    revisions = design_revisions(world, ACME + OTHER)
    assert None not in revisions.values()
    second = deploy(world)
    assert second.returncode == 0
    assert second.stdout.splitlines() == ["design documents installed: 0, updated: 0, unchanged: 12; "
                                          "databases created: 0, missing: 0, failed: 0"]
    assert design_revisions(world, ACME + OTHER) == revisions


def test_a_dry_run_lists_each_change_and_writes_nothing(world):
    seed(world, {"acme": ACME})
    done = deploy(world, "--dry-run")
    assert done.returncode == 0, done.stderr
    expected = {f"would install _design/{name} in {world.global_db}" for name in GLOBAL_DDOCS}
    expected |= {f"would install _design/{name} in {world.db(domain, doctype)}"
                 for domain in ACME for doctype, names in DDOCS.items() for name in names}
    expected |= {f"would create {world.state_db}", f"would install _design/couchsync-protection in {world.state_db}"}
    assert set(done.stdout.splitlines()[:-1]) == expected
    assert summary(done).startswith("design documents would be installed: 9, would be updated: 0, unchanged: 0")
    assert set(design_revisions(world, ACME).values()) == {None}


def test_a_new_sync_identity_is_a_change_of_the_protection_only(world):
    seed(world, {"acme": ACME})
    assert deploy(world).returncode == 0
    done = deploy(world, "--dry-run", COUCHSYNC_SYNC_NAMES="couchsync directory-bot")
    assert sorted(done.stdout.splitlines()[:-1]) == sorted(
        [f"would update _design/couchsync-protection in {world.db(domain, doctype)}"
         for domain in ACME for doctype in (CONTACTS, GROUPS)]
        + [f"would update _design/couchsync-protection in {world.state_db}"])


def test_missing_databases_are_reported_and_created_only_when_asked(world):
    seed(world, {"acme": ACME}, with_databases=False)
    done = deploy(world, "--org", "acme")
    assert done.returncode == 0
    missing = {world.db(domain, doctype) for domain in ACME for doctype in (CONTACTS, GROUPS)}
    assert {line.split()[1] for line in done.stdout.splitlines() if line.startswith("missing ")} == missing
    assert summary(done).endswith("databases created: 1, missing: 4, failed: 0")  # the state database
    assert all(world.server.request("HEAD", localcouch.db_path(db)).status_code == 404 for db in missing)
    created = deploy(world, "--org", "acme", "--create-missing")
    assert summary(created) == ("design documents installed: 6, updated: 0, unchanged: 3; "
                                "databases created: 4, missing: 0, failed: 0")
    assert None not in design_revisions(world, ACME).values()


def test_org_and_instance_narrow_the_deployment(world):
    seed(world, {"acme": ACME, "other": OTHER})
    assert deploy(world, "--instance", "alice.acme.twake.app").returncode == 0
    revisions = design_revisions(world, ACME + OTHER)
    assert {key for key, rev in revisions.items() if rev and key[0] != "global"} == {
        ("alice.acme.twake.app", doctype, name) for doctype, names in DDOCS.items() for name in names}
    assert deploy(world, "--org", "other").returncode == 0
    installed = {key[0] for key, rev in design_revisions(world, ACME + OTHER).items() if rev}
    assert installed == {"global", "alice.acme.twake.app", "other.twake.app"}
    unknown = deploy(world, "--instance", "nobody.twake.app")
    assert unknown.returncode == 65 and "no usable instance has the domain 'nobody.twake.app'" in unknown.stderr


def test_databases_that_refuse_the_deployment_are_listed_and_the_exit_is_1(world):
    seed(world, {"acme": ACME})
    databases = [world.db(domain, doctype) for domain in ACME for doctype in (CONTACTS, GROUPS)]
    databases += [world.global_db] + [world.db(domain, SETTINGS) for domain in ACME]
    # A plain member of every database, not an admin: CouchDB refuses their design documents.
    user = world.add_user("intern", databases)
    done = deploy(world, COUCHSYNC_COUCH_USER=user.auth[0], COUCHSYNC_COUCH_PASSWORD=user.auth[1])
    assert done.returncode == 1, done.stdout + done.stderr
    failed = {line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("failed ")}
    assert set(databases[:4]) <= failed
    assert "failed: " in summary(done) and user.auth[1] not in done.stdout + done.stderr
    # (PouchDB Server lets a member create Mango indexes, CouchDB does not: the global database is left out.)
    assert {rev for key, rev in design_revisions(world, ACME).items() if key[0] != "global"} == {None}


def test_the_admin_role_is_refused_as_a_sync_identity_with_exit_78(world):
    seed(world, {"acme": ACME[:1]})
    done = deploy(world, "--sync-role", "_admin")
    assert done.returncode == 78 and "_admin cannot be a sync identity role" in done.stderr
    assert set(design_revisions(world, ACME[:1]).values()) == {None}
