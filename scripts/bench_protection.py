"""What the worker's protection sweep costs at 10,000 databases (issue 17), measured on a server of our own.

    PYTHONPATH=. python3 scripts/bench_protection.py [--instances 5000] [--concurrency 16]

Seeds N instance records and their contacts and groups databases (2N databases, each empty but for the
design documents), then times, through `ProtectionGuard.sweep` as the worker runs it:
  install  the first sweep, which installs every protection and lookup view;
  cold     a sweep by a new process (nothing known: every design document read and compared);
  warm     a later sweep of the same process (one HEAD per database, compared with the revision seen good);
and one `_db_updates` longpoll answered by a database creation (the feed's latency).
On Apache CouchDB when a release is at hand (scripts/localcouch.py chooses, as for the tests).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import localcouch
from couchsync import config, design_docs
from couchsync.couch import CouchGateway
from couchsync.documents import CONTACTS, GROUPS, database_name
from couchsync.guard import ProtectionGuard
from couchsync.instances import InstanceDirectory


def seed(server: localcouch.LocalCouch, instances: int, concurrency: int) -> None:
    docs = [localcouch.instance_doc(f"u{i:05d}.bench.test", f"org{i // 50:04d}") for i in range(instances)]
    for start in range(0, len(docs), 1000):
        localcouch.bulk(server, "global/instances", docs[start:start + 1000])
    names = [database_name(f"u{i:05d}.bench.test", doctype) for i in range(instances) for doctype in (CONTACTS, GROUPS)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda name: localcouch.ensure_db(server, name), names))


def timed(what: str, action) -> float:
    started = time.monotonic()
    action()
    seconds = time.monotonic() - started
    print(f"{what}: {seconds:.1f}s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    server = localcouch.server(discover=True)  # the shared Apache CouchDB release when at hand
    try:
        print(f"{server.label} at {server.url}: {args.instances} instances, {2 * args.instances} databases")
        timed("seeding (databases created)", lambda: seed(server, args.instances, args.concurrency))
        settings = config.load_couch(server.url, username=server.sync[0], password=server.sync[1],
                                     pool_size=args.concurrency + 4)
        design = design_docs.load()
        identity = config.load_identity([server.sync[0]])

        def guard(couch: CouchGateway) -> ProtectionGuard:
            directory = InstanceDirectory(couch, "global/instances", indexes=design.global_indexes)
            return ProtectionGuard(couch, directory, design, identity, "couchsync/directory",
                                   concurrency=args.concurrency)
        with CouchGateway(settings) as couch:
            first = guard(couch)
            timed("install sweep (every protection and lookup view written)", lambda: first.sweep(first=True))
            timed("warm sweep (same process: one HEAD per database)", first.sweep)
        with CouchGateway(settings) as couch:
            cold = guard(couch)
            timed("cold sweep (new process: every design document read)", cold.sweep)
            timed("warm sweep, again", cold.sweep)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
