"""`couchsync apply` run as an operator runs it: a subprocess, configured by the environment."""

import json
import subprocess
import sys

from couchsync.documents import CONTACTS, GROUPS

ENGINEERING = "b2b-group-eff7808d5b54bb721b52529759597c29"


def test_apply_reads_json_lines_and_prints_a_summary_per_event(world, tmp_path):
    for domain in ("acme.twake.app", "alice.acme.twake.app"):
        world.add_instance(domain, "acme")
    events = tmp_path / "events.jsonl"
    body = {"timestamp": "2026-06-16T10:30:00Z", "organizationId": "acme", "id": "engineering",
            "name": "Engineering", "members": [{"email": "bob@acme.com", "firstName": "Bob"}]}
    events.write_text("\n".join(json.dumps({"routingKey": "b2b.group.created", "body": b}) for b in (body, body)))
    env = world.cli_env()
    password = env["COUCHSYNC_COUCH_PASSWORD"]
    done = subprocess.run([sys.executable, "-m", "couchsync", "--log-level", "INFO", "apply", str(events)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(
        "1: b2b.group.created acme/engineering: ok, 2 instances, 4 writes, 0 refusals")
    assert done.stdout.splitlines()[1].startswith("2: b2b.group.created acme/engineering: ok, 2 instances, 0 writes")
    assert password not in done.stdout + done.stderr
    assert list(world.docs("alice.acme.twake.app", GROUPS)) == [ENGINEERING]
    assert len(world.docs("alice.acme.twake.app", CONTACTS)) == 1


def test_apply_with_wrong_credentials_exits_with_access_denied(world, tmp_path):
    world.add_instance("acme.twake.app", "acme")
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"routingKey": "b2b.group.deleted", "body": {
        "timestamp": "2026-06-16T10:30:00Z", "organizationId": "acme", "id": "engineering"}}))
    env = world.cli_env(COUCHSYNC_COUCH_PASSWORD="wrong-password")
    done = subprocess.run([sys.executable, "-m", "couchsync", "apply", str(events)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 77
    assert "AccessDenied" in done.stdout and "wrong-password" not in done.stdout + done.stderr


def test_apply_reports_hostile_lines_and_applies_every_good_line_around_them(world, tmp_path):
    # Given an organization and a file where good events surround what made `apply` crash (issue 18, finding 4)
    for domain in ("acme.twake.app", "alice.acme.twake.app"):
        world.add_instance(domain, "acme")
    created = {"timestamp": "2026-06-16T10:30:00Z", "organizationId": "acme", "id": "engineering",
               "name": "Engineering"}
    added = {"timestamp": "2026-06-16T10:31:00Z", "organizationId": "acme", "id": "engineering",
             "members": [{"email": "bob@acme.com", "workplaceFqdn": "https://user:s3cretpw@Bob.ACME.twake.app/x"}]}

    def line(routing_key, body):
        return json.dumps({"routingKey": routing_key, "body": body}).encode()

    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join([
        line("b2b.group.created", created),
        b'{"routingKey": "b2b.group.created", "body": {"name": "\xff"}}',
        b'{"routingKey": "b2b.group.created", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        line("b2b.group.created", {**created, "timestamp": "9999-12-31T23:59:59-05:00"}),
        line("b2b.group.created", {**created, "timestamp": "0001-01-01T00:00:00+05:00"}),
        line("b2b.group.member.added", {**added, "members": [{"email": "eve@acme.com", "workplaceFqdn": "["}]}),
        line("b2b.group.member.added", added),
    ]))
    # When it is applied
    done = subprocess.run([sys.executable, "-m", "couchsync", "apply", str(events)],
                          env=world.cli_env(), capture_output=True, text=True, timeout=120)
    # Then each bad line is reported by number, the good ones are applied, and the exit is 65
    assert done.returncode == 65, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    reported = [row.split(":")[0] for row in done.stdout.splitlines() if "InvalidEvent" in row]
    assert reported == ["2", "3", "4", "5", "6"]
    assert done.stdout.splitlines()[0].startswith("1: b2b.group.created acme/engineering: ok")
    assert done.stdout.splitlines()[-1].startswith("7: b2b.group.member.added acme/engineering: ok")
    assert list(world.docs("alice.acme.twake.app", GROUPS)) == [ENGINEERING]
    contacts = list(world.docs("alice.acme.twake.app", CONTACTS).values())
    assert [contact["cozy"][0]["url"] for contact in contacts] == ["https://bob.acme.twake.app"]
    assert contacts[0]["twakeDirectory"]["workplaceFqdn"] == "bob.acme.twake.app"
