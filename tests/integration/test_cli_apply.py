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
