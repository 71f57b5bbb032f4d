"""user.created and `couchsync bootstrap-member` against the real server: a new member gets the directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import directory
from couchsync.couch import CouchGateway
from couchsync.documents import CONTACTS, GROUPS, TAG, group_ids_of, managed_group_id
from couchsync.errors import AmbiguousOrganization, CouchUnavailable, UnknownOrganization
from couchsync.events import parse_event

from tests.integration.conftest import World
from tests.integration.test_worker import dead_letters, drained, start_worker, wait_until  # noqa: F401 (fixture)

ORG = "acme.twake.app"
MEMBERS = ["alice.acme.twake.app", "bob.acme.twake.app", "carol.acme.twake.app"]
NEW = "erin.acme.twake.app"
SECRETS = {"hash": "SECRET-HASH-6c1f", "privateKey": "SECRET-KEY-93ab", "publicKey": "pub", "key": "k",
           "iterations": 10000}


def owner(domain: str) -> str:
    name = domain.split(".")[0]
    return f"{'admin' if name == 'acme' else name}@acme.com"


def directory_events() -> list[tuple[str, dict]]:
    """3 groups and 40 people: person i in group i % 3, every fifth one in the next group too.

    Alice and Bob, who have instances, are among them; Carol, who has one too, is in no group.
    """
    events = [("b2b.group.created", {"timestamp": "2026-06-16T10:00:00Z", "organizationId": "acme", "id": f"g{g}",
                                     "name": f"Group {g}", "color": "#3366FF", "members": []}) for g in range(3)]
    people = [{"email": f"m{i:02d}@acme.com", "firstName": f"Member {i}", "lastName": "Acme"} for i in range(38)]
    people += [{"email": "alice@acme.com", "username": "alice", "workplaceFqdn": "alice.acme.twake.app"},
               {"email": "bob@acme.com", "name": "Bob Martin", "workplaceFqdn": "bob.acme.twake.app"}]
    for i, person in enumerate(people):
        groups = [i % 3] + ([(i + 1) % 3] if i % 5 == 0 else [])
        events += [("b2b.group.member.added", {"timestamp": f"2026-06-16T11:00:{i:02d}Z", "organizationId": "acme",
                                               "id": f"g{g}", "members": [person]}) for g in groups]
    return events


def user_created(**fields) -> bytes:
    body = {"twakeId": "erin", "domain": NEW, "internalEmail": "erin@acme.com", "workplaceFqdn": NEW,
            "mobile": "+33 6 12 34 56 78", "timestamp": 1781700000, "organizationId": "acme", **SECRETS, **fields}
    return json.dumps({key: value for key, value in body.items() if value is not None}).encode()


@pytest.fixture
def acme(couch_server):
    """The organization with its directory applied by the engine, and a new instance not yet onboarded;
    protected as in production (the engine tests show the protection changes nothing for the sync)."""
    world = World(couch_server, protected=True)
    for domain in [ORG, *MEMBERS]:
        world.add_instance(domain, "acme", email=owner(domain), org_domain="acme.com")
    with world.synchronizer() as sync:
        for routing_key, body in directory_events():
            assert sync.apply(parse_event(routing_key, json.dumps(body))).failures == []
    world.add_instance(NEW, "acme", email="erin@acme.com", org_domain="acme.com")
    world.add_instance("other.twake.app", "other", email="admin@other.com", org_domain="other.com")
    yield world
    world.cleanup()


def by_email(world: World, domain: str) -> dict[str, dict]:
    """Managed contacts by email, without what may differ between instances (id, revision)."""
    return {doc[TAG]["email"]: {k: v for k, v in doc.items() if k not in ("_id", "_rev")}
            for doc in world.docs(domain, CONTACTS).values() if TAG in doc}


def without_rev(docs: dict[str, dict]) -> dict[str, dict]:
    return {doc_id: {k: v for k, v in doc.items() if k != "_rev"} for doc_id, doc in docs.items()}


def assert_onboarded(world: World) -> None:
    # The groups, ids and memories included, are the organization instance's.
    assert without_rev(world.docs(NEW, GROUPS)) == without_rev(world.docs(ORG, GROUPS))
    assert len(world.docs(NEW, GROUPS)) == 3
    # The contacts, matched by email, are the organization instance's, relationships included ...
    reference, copied = by_email(world, ORG), by_email(world, NEW)
    del reference["erin@acme.com"]  # given to the organization instance by the same event
    assert len(reference) == 40
    assert {email: copied[email] for email in reference} == reference
    # ... plus one for each member instance's owner the directory does not name (Carol); not Erin's own.
    assert set(copied) - set(reference) == {"carol@acme.com"}
    assert copied["carol@acme.com"]["cozy"] == [{"url": "https://carol.acme.twake.app", "primary": True}]
    # Every other instance of the organization has the new user's contact.
    for domain in [ORG, *MEMBERS]:
        erin = by_email(world, domain)["erin@acme.com"]
        assert erin["cozy"] == [{"url": f"https://{NEW}", "primary": True}]
        assert erin["phone"] == [{"number": "+33 6 12 34 56 78", "primary": True}]
        assert group_ids_of(erin) == []
    assert "erin@acme.com" not in by_email(world, "other.twake.app")


def assert_no_secret_stored(world: World) -> None:
    for domain in [ORG, *MEMBERS, NEW]:
        for doctype in (GROUPS, CONTACTS):
            text = json.dumps(world.docs(domain, doctype))
            assert "SECRET-" not in text


@pytest.mark.parametrize("organization", ["by id", "by domain"])
def test_user_created_gives_the_new_instance_the_directory_and_everyone_the_new_user(acme, organization):
    fields = {"organizationId": None, "organizationDomain": "acme.com"} if organization == "by domain" else {}
    with acme.synchronizer() as sync:
        report = sync.apply(parse_event("user.created", user_created(**fields)))
        assert report.failures == [] and report.refusals == []
        assert report.organization_id == "acme" and report.subject == NEW
        assert_onboarded(acme)
        assert_no_secret_stored(acme)
        before = {domain: acme.revisions(domain) for domain in [ORG, *MEMBERS, NEW]}
        again = sync.apply(parse_event("user.created", user_created(**fields)))
    assert again.writes == 0 and again.failures == []
    assert {domain: acme.revisions(domain) for domain in [ORG, *MEMBERS, NEW]} == before


@pytest.mark.parametrize("fields", [{"organizationId": "ghost"},
                                    {"organizationId": None, "organizationDomain": "ghost.example"}])
def test_user_created_for_an_unknown_organization_is_a_clear_error(acme, fields):
    with acme.synchronizer() as sync, pytest.raises(UnknownOrganization, match="ghost"):
        sync.apply(parse_event("user.created", user_created(**fields)))


def test_user_created_by_a_domain_two_organizations_claim_copies_nothing(acme):
    acme.add_instance("stranger.twake.app", "evil", email="eve@evil.com", org_domain="acme.com")
    fields = {"organizationId": None, "organizationDomain": "acme.com"}
    with acme.synchronizer() as sync, pytest.raises(AmbiguousOrganization, match="acme, evil"):
        sync.apply(parse_event("user.created", user_created(**fields)))
    assert acme.docs(NEW, CONTACTS) == {} and acme.docs(NEW, GROUPS) == {}


class CrashingGateway(CouchGateway):
    """A gateway that goes down after a number of bulk writes, as a crashing process would stop.

    (The first write into a missing database is two calls: it creates the database on the way.)
    """

    def __init__(self, settings, writes_left: int) -> None:
        super().__init__(settings)
        self.writes_left = writes_left

    def bulk_write(self, db, docs, **kwargs):
        if self.writes_left == 0:
            raise CouchUnavailable("simulated crash", db=db)
        self.writes_left -= 1
        return super().bulk_write(db, docs, **kwargs)


def test_a_bootstrap_cut_short_is_finished_by_the_next_run(acme, monkeypatch):
    with acme.synchronizer(page_size=7) as sync:
        crashing = CrashingGateway(acme.couch_settings(), writes_left=5)
        acme.gateways.append(crashing)
        monkeypatch.setattr(sync.copier, "_couch", crashing)
        monkeypatch.setattr(sync.writer, "_couch", crashing)
        with pytest.raises(CouchUnavailable):
            sync.bootstrap(NEW)
    partial = by_email(acme, NEW)
    assert 0 < len(partial) < 41
    with acme.synchronizer(page_size=7) as sync:
        report = sync.bootstrap(NEW)
    assert report.written > 0 and report.refusals == []
    reference = by_email(acme, ORG)
    copied = by_email(acme, NEW)
    assert {email: copied[email] for email in reference} == reference
    assert without_rev(acme.docs(NEW, GROUPS)) == without_rev(acme.docs(ORG, GROUPS))


class DeletionMeanwhile(CouchGateway):
    """Lets a group's deletion be applied everywhere just before the copy's first page of contacts is written."""

    def __init__(self, settings, world: World, deletion) -> None:
        super().__init__(settings)
        self.world, self.deletion, self.applied = world, deletion, False

    def bulk_write(self, db, docs, **kwargs):
        if db == self.world.db(NEW, CONTACTS) and not self.applied:
            self.applied = True
            with self.world.synchronizer() as other:
                assert other.apply(self.deletion).failures == []
        return super().bulk_write(db, docs, **kwargs)


def test_a_page_planned_before_a_deletion_is_planned_again_when_the_states_moved_under_it(acme, monkeypatch):
    """The copy plans its page of contacts from the states, group 0 among them; then group 0 is deleted
    everywhere (the new instance has no contact yet: only the group goes), then the page is written. No
    409 stops it (the contacts are new), so the copy must see that the states it planned from moved,
    and plan again: no contact is left related to the deleted group."""
    deletion = parse_event("b2b.group.deleted", json.dumps({
        "timestamp": "2026-06-16T12:00:00Z", "organizationId": "acme", "id": "g0"}))
    with acme.synchronizer() as sync:
        meanwhile = DeletionMeanwhile(acme.couch_settings(), acme, deletion)
        acme.gateways.append(meanwhile)
        monkeypatch.setattr(sync.writer, "_couch", meanwhile)
        assert sync.bootstrap(NEW).refusals == []
    assert meanwhile.applied
    deleted = managed_group_id("acme", "g0")
    assert deleted not in acme.docs(NEW, GROUPS)
    copied = by_email(acme, NEW)
    assert [email for email, doc in copied.items() if deleted in group_ids_of(doc)] == []
    assert group_ids_of(copied["m00@acme.com"]) == [managed_group_id("acme", "g1")]


def bootstrap_cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scripts/bootstrap-member", *args], env=world.cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_bootstrap_member_script_copies_then_has_nothing_left_to_write(acme):
    dry = bootstrap_cli(acme, NEW, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would write 3 (missing group)" in dry.stdout and acme.docs(NEW, GROUPS) == {}
    done = bootstrap_cli(acme, NEW)
    assert done.returncode == 0, done.stderr
    # 40 directory contacts and the 3 member owners (Alice and Bob are in it: 41 people compared, 1 created).
    assert done.stdout.strip().splitlines()[-1] == (
        f"{NEW}: groups 3, contacts 43, written 44, unchanged 2, refused 0")
    again = bootstrap_cli(acme, NEW)
    assert again.stdout.strip().splitlines()[-1] == (
        f"{NEW}: groups 3, contacts 43, written 0, unchanged 46, refused 0")
    unknown = bootstrap_cli(acme, "nobody.acme.twake.app")
    assert unknown.returncode == 65 and "nobody.acme.twake.app" in unknown.stderr


def test_the_worker_onboards_from_the_auth_exchange_and_dead_letters_an_unknown_organization(
        acme, broker, start_worker):  # noqa: F811 (the fixture)
    worker = start_worker(acme)
    broker.publish([("user.created", user_created(organizationId=None, organizationDomain="acme.com")),
                    ("user.created", user_created(organizationId="ghost", domain="x.ghost.example"))])
    wait_until(lambda: worker.count("applied") + worker.count("dead_lettered") == 2 and drained(broker, worker),
               60, "both messages are handled")
    assert worker.count("applied") == 1
    assert_onboarded(acme)
    [letter] = dead_letters(acme, broker)
    assert letter["routing_key"] == "user.created"
    assert "UnknownOrganization" in letter["reason"] and "ghost" in letter["reason"]
    assert worker.stop() == 0


def peak_rss_mb(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run a command in a fresh parent whose only child it is: the child's peak resident set, in MB."""
    measure = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", measure, *command], env=env, capture_output=True, text=True,
                          timeout=900)
    return int(done.stderr.strip().splitlines()[-1]) / 1024, done


@pytest.mark.slow
def test_bootstrap_of_5000_contacts_and_100_groups_stays_under_150_mb_and_runs_again_writing_nothing(world):
    for domain in (ORG, NEW):
        world.add_instance(domain, "acme", email=owner(domain))
    directory.seed(world.server, world.db(ORG, GROUPS), world.db(ORG, CONTACTS), "acme", 5000, 100)
    command = [sys.executable, "-m", "couchsync", "bootstrap-member", NEW]
    peak, done = peak_rss_mb(command, world.cli_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        f"{NEW}: groups 100, contacts 5000, written 5100, unchanged 0, refused 0")
    assert peak < 150, f"peak RSS {peak:.0f} MB"
    revisions = world.revisions(NEW)
    assert len(revisions) == 5100
    _, again = peak_rss_mb(command, world.cli_env())
    assert again.stdout.strip().splitlines()[-1] == (
        f"{NEW}: groups 100, contacts 5000, written 0, unchanged 5100, refused 0")
    assert world.revisions(NEW) == revisions
    reference, copied = by_email(world, ORG), by_email(world, NEW)
    assert copied == reference
    print(f"bootstrap of 5,000 contacts and 100 groups: peak RSS {peak:.0f} MB")
