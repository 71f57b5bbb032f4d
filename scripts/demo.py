"""The demo: a local CouchDB-compatible server, a demo organization, its directory events, the result.

Starts PouchDB Server in memory, seeds organization `acme` (the organization instance and three
members; Bob keeps a personal contact of Carol, which couchsync must leave alone) and organization
`other`, runs `couchsync deploy-design-docs` then `couchsync apply scripts/demo-events.jsonl` as an
operator would, shows the protection refusing a hand edit, then prints each instance's directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import localcouch

from couchsync.documents import group_ids_of

HERE = Path(__file__).resolve().parent
GLOBAL_DB = "global/instances"
ACME = {"acme.twake.app": "admin@acme.com", "alice.acme.twake.app": "alice@acme.com",
        "bob.acme.twake.app": "bob@acme.com", "carol.acme.twake.app": "carol@acme.com"}
OTHER = {"other.twake.app": "admin@other.com"}


def seed(couch: localcouch.LocalCouch) -> None:
    docs = [localcouch.instance_doc(domain, "acme", "acme.com") for domain in ACME]
    docs += [localcouch.instance_doc(domain, "other", "other.com") for domain in OTHER]
    localcouch.bulk(couch, GLOBAL_DB, docs)
    for domain, email in {**ACME, **OTHER}.items():
        prefix = domain.replace(".", "-")
        localcouch.bulk(couch, f"{prefix}/io-cozy-settings", [localcouch.settings_doc(email, domain)])
    localcouch.bulk(couch, "bob-acme-twake-app/io-cozy-contacts", [
        {"_id": "carol-personal", "fullname": "Caro (tennis)", "email": [{"address": "carol@acme.com"}]}])


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


def show_protection(couch: localcouch.LocalCouch) -> None:
    """The stack's own admin tries to rename a managed contact in Bob's instance: CouchDB refuses."""
    db = localcouch.db_path("bob-acme-twake-app/io-cozy-contacts")
    rows = couch.request("GET", db + "/_all_docs", params={"include_docs": "true"}).json()["rows"]
    managed = next(row["doc"] for row in rows if row["doc"].get("twakeDirectory", {}).get("managed"))
    response = couch.request("PUT", f"{db}/{managed['_id']}", json={**managed, "fullname": "Renamed by hand"})
    print(f"demo: the stack's admin renames {managed['fullname']!r} in bob.acme.twake.app: "
          f"{response.status_code} {response.json().get('reason')}")


def main() -> int:
    print("demo: starting the local CouchDB-compatible server (PouchDB Server, in memory)")
    couch = localcouch.server()
    try:
        seed(couch)
        print(f"demo: seeded organization acme ({len(ACME)} instances) and other ({len(OTHER)}) at {couch.url}")
        env = {**os.environ, "COUCHSYNC_COUCH_URL": couch.url, "COUCHSYNC_COUCH_USER": couch.sync[0],
               "COUCHSYNC_COUCH_PASSWORD": couch.sync[1], "COUCHSYNC_GLOBAL_DB": GLOBAL_DB}
        print("demo: $ couchsync deploy-design-docs --create-missing")
        status = subprocess.call([sys.executable, "-m", "couchsync", "deploy-design-docs", "--create-missing"], env=env)
        print("demo: $ couchsync apply scripts/demo-events.jsonl")
        status = status or subprocess.call(
            [sys.executable, "-m", "couchsync", "apply", str(HERE / "demo-events.jsonl")], env=env)
        show_protection(couch)
        for domain in [*ACME, *OTHER]:
            print(f"\n{domain}")
            print("\n".join(directory(couch, domain)))
        return status
    finally:
        couch.stop()


if __name__ == "__main__":
    sys.exit(main())
