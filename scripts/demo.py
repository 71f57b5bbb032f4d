"""The demo: a local CouchDB server, a demo organization, its directory events, the result.

Starts Apache CouchDB when a release is at hand (COUCHSYNC_COUCHDB_RELEASE, or the shared one beside the
checkout; its data in a temporary folder), else PouchDB Server in memory, seeds organization `acme` (the
organization instance and three members; Bob keeps a personal contact of Carol, which couchsync must leave
alone) and organization `other`, runs `couchsync deploy-design-docs`, starts `couchsync worker` on the local
RabbitMQ and publishes the directory's scripted events (scripts/demo-events.jsonl, and one broken message)
as the directory would, stops the worker with SIGTERM, lists the dead letters, shows the protection refusing a hand
edit, then prints each instance's directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import localbroker
import localcouch
import localports
import pika
import pika.exceptions
import requests

from couchsync.cli.apply import read_messages
from couchsync.documents import group_ids_of

HERE = Path(__file__).resolve().parent
GLOBAL_DB = "global/instances"
ACME = {"acme.twake.app": "admin@acme.com", "alice.acme.twake.app": "alice@acme.com",
        "bob.acme.twake.app": "bob@acme.com", "carol.acme.twake.app": "carol@acme.com"}
OTHER = {"other.twake.app": "admin@other.com"}
NEW_MEMBER = "erin.acme.twake.app"  # created once the directory is in place, then announced by user.created
# The demo's own exchange and queues: never the directory's `b2b`, which the stack's consumers may share.
EXCHANGE = "couchsync-demo.b2b"
AUTH_EXCHANGE = "couchsync-demo.auth"
QUEUE_PREFIX = "couchsync-demo."


def seed(couch: localcouch.LocalCouch) -> None:
    for domain in ACME:
        add_instance(couch, domain, "acme", ACME[domain])
    for domain in OTHER:
        add_instance(couch, domain, "other", OTHER[domain])
    localcouch.bulk(couch, "bob-acme-twake-app/io-cozy-contacts", [
        {"_id": "carol-personal", "fullname": "Caro (tennis)", "email": [{"address": "carol@acme.com"}]}])


def add_instance(couch: localcouch.LocalCouch, domain: str, org_id: str, email: str) -> None:
    """What the stack does when it creates an instance: its global document, its settings."""
    localcouch.bulk(couch, GLOBAL_DB, [localcouch.instance_doc(domain, org_id, f"{org_id}.com")])
    localcouch.bulk(couch, f"{domain.replace('.', '-')}/io-cozy-settings", [localcouch.settings_doc(email, domain)])


def new_member_event() -> list[tuple[str, bytes]]:
    """The directory announces Erin's new instance (the organization by its domain; secrets included)."""
    body = {"twakeId": "erin", "domain": NEW_MEMBER, "internalEmail": "erin@acme.com", "workplaceFqdn": NEW_MEMBER,
            "mobile": "+33 6 12 34 56 78", "timestamp": 1781700000, "organizationDomain": "acme.com",
            "name": "Erin Leroy", "hash": "never-stored", "privateKey": "never-stored", "iterations": 10000}
    return [("user.created", json.dumps(body).encode())]


def directory(couch: localcouch.LocalCouch, domain: str) -> list[str]:
    prefix = domain.replace(".", "-")
    lines = []
    groups = couch.request("GET", localcouch.db_path(f"{prefix}/io-cozy-contacts-groups") + "/_all_docs",
                           params={"include_docs": "true"}).json().get("rows", [])
    contacts = couch.request("GET", localcouch.db_path(f"{prefix}/io-cozy-contacts") + "/_all_docs",
                             params={"include_docs": "true"}).json().get("rows", [])
    contacts = [row["doc"] for row in contacts if not row["id"].startswith("_design/")]
    for row in groups:
        if row["id"].startswith("_design/"):
            continue
        members = sorted(c["fullname"] for c in contacts if row["id"] in group_ids_of(c))
        lines.append(f"  group {row['doc']['name']!r}: {', '.join(members) or '(nobody here)'}")
    for contact in sorted(contacts, key=lambda c: c.get("fullname", "")):
        managed = "managed" if contact.get("twakeDirectory", {}).get("managed") else "personal, untouched"
        lines.append(f"  contact {contact.get('fullname')!r} <{contact['email'][0]['address']}> ({managed})")
    return lines or ["  (empty)"]


def lose_a_group(couch: localcouch.LocalCouch, domain: str) -> None:
    """A backup restored in one instance: its Sales group is gone (deleted as the sync identity, the only
    one the protection lets delete it). Reconcile lists the drift, then repairs it."""
    db = localcouch.db_path(f"{domain.replace('.', '-')}/io-cozy-contacts-groups")
    rows = couch.request("GET", db + "/_all_docs", params={"include_docs": "true"}).json()["rows"]
    sales = next(row["doc"] for row in rows if row["doc"].get("name") == "Sales")
    requests.delete(f"{couch.url}{db}/{sales['_id']}", params={"rev": sales["_rev"]}, auth=couch.sync,
                    timeout=10).raise_for_status()
    print(f"\ndemo: a backup restored in {domain} lost its Sales group; reconcile lists the drift, then repairs it")


def show_protection(couch: localcouch.LocalCouch) -> None:
    """The stack's own admin tries to rename a managed contact in Bob's instance: CouchDB refuses."""
    db = localcouch.db_path("bob-acme-twake-app/io-cozy-contacts")
    rows = couch.request("GET", db + "/_all_docs", params={"include_docs": "true"}).json()["rows"]
    managed = next(row["doc"] for row in rows if row["doc"].get("twakeDirectory", {}).get("managed"))
    response = couch.request("PUT", f"{db}/{managed['_id']}", json={**managed, "fullname": "Renamed by hand"})
    print(f"demo: the stack's admin renames {managed['fullname']!r} in bob.acme.twake.app: "
          f"{response.status_code} {response.json().get('reason')}")


def couchsync(env: dict[str, str], *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    print(f"demo: $ couchsync {' '.join(args)}")
    return subprocess.Popen([sys.executable, "-m", "couchsync", *args], env=env, **popen)


def publish(messages: list[tuple[str, bytes]], exchange: str = EXCHANGE, auth_exchange: str = AUTH_EXCHANGE) -> None:
    """What the directory does: publish its events to its topic exchanges (group events, user events)."""
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        channel = connection.channel()
        for name in (exchange, auth_exchange):
            channel.exchange_declare(name, "topic", durable=True)
        channel.confirm_delivery()
        for routing_key, body in messages:
            channel.basic_publish(auth_exchange if routing_key.startswith("user.") else exchange, routing_key, body,
                                  pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def scripted_events() -> list[tuple[str, bytes]]:
    with (HERE / "demo-events.jsonl").open(encoding="utf-8") as lines:
        events = [(key, json.dumps(body).encode()) for _, key, body in read_messages(lines)]
    return events + [("b2b.group.member.added", b'{"organizationId": "acme", "id": "sales"')]  # broken on purpose


def run_worker(env: dict[str, str], events: list[tuple[str, bytes]]) -> int:
    """Start the worker, publish the events, wait until it handled them all, stop it with SIGTERM."""
    port = localports.free_port()
    worker = couchsync(env, "--log-level", "INFO", "worker", "--metrics-port", str(port))
    try:
        deadline = time.monotonic() + 60
        while localbroker.events_handled(port) < 0 and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        print(f"demo: publishing {len(events)} directory events")
        publish(events)
        while localbroker.events_handled(port) < len(events) and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        status = worker.wait(60)
    print(f"demo: the worker stopped on SIGTERM with exit status {status}")
    return status


def main() -> int:
    kind, _ = localcouch.choose(discover=True)
    print(f"demo: starting the local CouchDB server ({localcouch.KIND_NAMES.get(kind, 'yours')})")
    couch = localcouch.server(discover=True)
    print(f"demo: {couch.label} at {couch.url}")
    env = {**os.environ, "COUCHSYNC_COUCH_URL": couch.url, "COUCHSYNC_COUCH_USER": couch.sync[0],
           "COUCHSYNC_COUCH_PASSWORD": couch.sync[1], "COUCHSYNC_GLOBAL_DB": GLOBAL_DB,
           "COUCHSYNC_EXCHANGE": EXCHANGE, "COUCHSYNC_AUTH_EXCHANGE": AUTH_EXCHANGE,
           "COUCHSYNC_QUEUE_PREFIX": QUEUE_PREFIX, "COUCHSYNC_RETRY_DELAY": "0.5"}
    try:
        seed(couch)
        print(f"demo: seeded organization acme ({len(ACME)} instances) and other ({len(OTHER)}) at {couch.url}")
        status = couchsync(env, "deploy-design-docs", "--create-missing").wait()
        print(f"demo: the directory's events (one of them broken) go to the exchange {EXCHANGE}")
        status = status or run_worker(env, scripted_events())
        couchsync(env, "dlq", "list").wait()
        show_protection(couch)
        print(f"\ndemo: the stack creates {NEW_MEMBER}; the directory announces it on {AUTH_EXCHANGE}")
        add_instance(couch, NEW_MEMBER, "acme", "erin@acme.com")
        status = status or run_worker(env, new_member_event())
        lose_a_group(couch, "carol.acme.twake.app")
        couchsync(env, "reconcile", "--org", "acme", "--dry-run").wait()
        status = status or couchsync(env, "reconcile", "--org", "acme").wait()
        for domain in [*ACME, NEW_MEMBER, *OTHER]:
            print(f"\n{domain}")
            print("\n".join(directory(couch, domain)))
        return status
    finally:
        couch.stop()
        remove_demo_queues()


def remove_demo_queues() -> None:
    """The demo's exchanges and queues go with it (a real worker's, named couchsync.*, are not touched)."""
    localbroker.remove(QUEUE_PREFIX, EXCHANGE, AUTH_EXCHANGE)


if __name__ == "__main__":
    sys.exit(main())
