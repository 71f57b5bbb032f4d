"""couchsync's benchmarks, each a ratio against a baseline measured in the same run on the same server.

    scripts/bench [--runs 3] [--only fanout,groups,...,burst] [--json F] [--scale 1]

Against Apache CouchDB when a release is at hand (COUCHSYNC_COUCHDB_RELEASE, or the shared one beside the
checkout), else PouchDB Server (in memory), or the CouchDB that COUCHSYNC_TEST_COUCH_URL names (with admin
credentials, as for the tests). The baselines are minimal clients doing the same writes:
one pooled requests.Session, the same concurrency, no planning, no retries; where couchsync writes into
protected databases, so do they (the server validates every write alike).

1. fanout    one member.added applied to an organization of 1,000 instances; baseline: per instance,
             read + write the group, read + write the contact.
2. groups    a group created with 20 members in 200 instances; baseline: the same 21 documents per
             instance, read then written per database.
   Both also against a second baseline that, like couchsync, finds the members' contacts by email
   through the `couchsync/lookup` view before writing them: the part of the gap that is the server's
   index rather than couchsync. Each baseline writes into databases of its own (protected like
   couchsync's), so that nobody's view
   indexes another's documents.
3. bootstrap 10,000 contacts and 200 groups copied into a new instance; baselines: paged `_find` +
             `_bulk_docs` of the same documents, and `_replicate` with a selector where it is honoured.
4. worker    2,000 events for a 20-instance organization through RabbitMQ: events per second.
5. rss       peak RSS of `couchsync bootstrap-member` at 1,000 and at 10,000 contacts.
6. planning  the pure projection of one group.created of 1,000, 2,000, 4,000 and 8,000 members (no server):
             each doubling against twice the time of the size before, i.e. against linear growth.
7. bigevent  `couchsync apply` of one group.created of 10,000 members to 3 instances (wall time; CPU and
             peak RSS in the note); baseline: the same documents read + written raw per database.
8. burst     500 member.added (5 groups x 100 people) for one organization of 200 instances through the
             worker; baseline: a raw client writing the documents the burst leaves (one `_bulk_docs` per
             database): wall time and `_bulk_docs` requests to instances.
9. workers   1,000 events over 20 organizations (40 instances) through 1, 2 and 3 workers sharing partitions, each
             on its own node of a three-node CouchDB cluster and a three-node RabbitMQ cluster (started for
             the case, from the release): events per second, and the document writes to the instances per
             second; baseline: the cluster's raw write rate (one document a request through its three
             nodes) measured in the same run.

Each figure is the median of --runs runs (min and max beside it); couchsync and its baseline alternate,
so that a server warming up or slowing down weighs on both alike. On Apache CouchDB each figure also
shows, from the server's own counters, the requests each side made and the seconds couchjs spent
validating their writes and indexing views for them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

import directory
import localbroker
import localcouch
import localports
from couchsync import config, design_docs
from couchsync.couch import CouchGateway
from couchsync.design_docs import LOOKUP_DDOC, LOOKUP_VIEW
from couchsync.documents import (
    CONTACTS, GROUPS, SETTINGS, database_name, lookup_keys, managed_group_id, with_groups)
from couchsync.events import Member, parse_event
from couchsync.instances import InstanceDirectory
from couchsync.plan import InstanceView, group_doc, plan_group_event, upsert_contact
from couchsync.state import GroupState, PersonState
from couchsync.sync import Synchronizer

CONCURRENCY = config.DEFAULT_CONCURRENCY
PROFILE_RATE = 50  # py-spy's samples per second with --profile: light enough not to slow what it records
RAW, LOOKUP = "raw", "lookup"  # the fan-out baselines, each writing into databases of its own


@dataclass(frozen=True)
class Cost:
    """What the server did for a measured action, from its own counters (`/_node/_local/_stats`)."""

    requests: int
    validation: float  # seconds in couchjs running validate_doc_update
    indexing: float  # seconds in couchjs mapping documents into view indexes
    client: float  # CPU seconds of the benchmark's own process (couchsync's, where it runs in it)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.requests - other.requests, self.validation - other.validation,
                    self.indexing - other.indexing, self.client - other.client)


@dataclass
class Figure:
    """One measured case: couchsync's samples, its baseline's, in the same unit, and the server's cost of
    each sample (where the server counts it: Apache CouchDB)."""

    case: str
    unit: str
    couchsync: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: float | None = None  # the ratio to stay under
    note: str = ""
    couchsync_costs: list[Cost] = field(default_factory=list)
    baseline_costs: list[Cost] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if not self.couchsync or not self.baseline:
            return None
        return statistics.median(self.couchsync) / statistics.median(self.baseline)

    def as_json(self) -> dict[str, Any]:
        def stats(samples: list[float]) -> dict[str, float] | None:
            return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
                    "runs": len(samples)} if samples else None

        def costs(measured: list[Cost]) -> dict[str, float] | None:
            return {"requests": statistics.median(c.requests for c in measured),
                    "validation_seconds": statistics.median(c.validation for c in measured),
                    "indexing_seconds": statistics.median(c.indexing for c in measured),
                    "client_cpu_seconds": statistics.median(c.client for c in measured)} if measured else None
        return {"case": self.case, "unit": self.unit, "couchsync": stats(self.couchsync),
                "baseline": stats(self.baseline), "baseline_name": self.baseline_name, "ratio": self.ratio,
                "target": self.target, "met": None if self.ratio is None or self.target is None
                else self.ratio <= self.target, "note": self.note,
                "server": {"couchsync": costs(self.couchsync_costs), "baseline": costs(self.baseline_costs)}}


class Bench:
    """An organization world on the server, named apart from everything else."""

    def __init__(self, server: localcouch.LocalCouch, profile: Path | None = None) -> None:
        self.server = server
        self.profile = profile  # where py-spy's recordings of couchsync's runs go (--profile)
        self.tag = f"bench{secrets.token_hex(3)}"
        self.global_db = f"{self.tag}-global/instances"
        self.session = requests.Session()
        self.session.auth = server.sync
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=CONCURRENCY))

    def cost(self) -> Cost | None:
        """The server's counters now; None where it keeps none (PouchDB Server)."""
        if self.server.kind == "pouchdb-server":
            return None
        stats = self.server.request("GET", "/_node/_local/_stats/couchdb").json()
        times = stats["query_server"]["time"]
        return Cost(int(stats["httpd"]["requests"]["value"]), times["ddoc_vdu"]["value"] / 1e6,
                    times["map"]["value"] / 1e6, time.process_time())

    def measure(self, samples: list[float], costs: list[Cost], action: Callable[[], object],
                profile: str | None = None) -> None:
        """Time the action into `samples` and what the server did for it into `costs` (nothing else runs
        against the server meanwhile: couchsync and its baselines take turns). `profile`: the case's name,
        when couchsync is what runs; with --profile, py-spy records it (see scripts/profile_split.py).

        CouchDB indexes views in the background after writes (`ken`): each side starts once the server has
        finished what the one before left it, and is charged (in `costs`, not in time) for what it left.
        """
        self.quiet()
        before = self.cost()
        with self.recording(profile):
            samples.append(timed(action))
        self.quiet()
        after = self.cost()
        if before is not None and after is not None:
            costs.append(after - before)

    @contextmanager
    def recording(self, name: str | None) -> Iterator[None]:
        """py-spy recording this process and its children (the worker, `couchsync apply`) meanwhile, into
        --profile's folder; nothing without --profile or a name."""
        if self.profile is None or name is None:
            yield
            return
        self.profile.mkdir(parents=True, exist_ok=True)
        output = self.profile / f"{name}-{len(list(self.profile.glob(f'{name}-*.txt'))) + 1}.txt"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--subprocesses", "--idle",
                                "--threads", "--nonblocking", "--rate", str(PROFILE_RATE), "--format", "raw",
                                "-o", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)  # attached before the action starts
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)

    def quiet(self, timeout: float = 900) -> None:
        """Wait until the server has indexed nothing for a second (its `_active_tasks`)."""
        if self.server.kind == "pouchdb-server":
            return
        deadline, idle_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            tasks = self.server.request("GET", "/_active_tasks").json()
            if any(task.get("type") == "indexer" for task in tasks):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= 1:
                return
            time.sleep(0.2)

    def prefix(self, domain: str) -> str:
        return f"{self.tag}-{domain}"

    def db(self, domain: str, doctype: str, baseline: str | None = None) -> str:
        """An instance's database, or the one of the same instance that a baseline writes into."""
        prefix = self.prefix(domain) if baseline is None else f"{self.tag}-{baseline}-{domain}"
        return database_name(prefix, doctype)

    def add_baselines(self, domains: list[str], *baselines: str, protected: bool = False) -> None:
        """Databases for these baselines in each instance; the lookup view where a baseline looks up;
        `protected`: the protection too, so that the server validates the baseline's writes as couchsync's."""
        design = design_docs.load()
        lookup = design.lookup
        protection = design.protection(config.load_identity([self.server.sync[0]]))

        def prepare(domain: str) -> None:
            for baseline in baselines:
                for doctype in (GROUPS, CONTACTS):
                    localcouch.ensure_db(self.server, self.db(domain, doctype, baseline))
                if protected:
                    prefix = f"{self.tag}-{baseline}-{domain}"
                    for target in design.instance_targets(prefix, protection):
                        assert design_docs.deploy(gateway, target).error is None
                if baseline == LOOKUP:
                    db = self.db(domain, CONTACTS, baseline)
                    design_docs.ensure(gateway, db, LOOKUP_DDOC, lookup)
                    gateway.view(db, LOOKUP_DDOC, LOOKUP_VIEW, [["email", "warm-up"]])  # built, as couchsync's
        with self.gateway() as gateway, ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(prepare, domains))

    def url(self, db: str, *path: str) -> str:
        return "/".join([self.server.url + localcouch.db_path(db), *path])

    def add_instances(self, domains: list[str], org: str) -> None:
        docs = [localcouch.instance_doc(domain, org, f"{org}.example", prefix=self.prefix(domain))
                for domain in domains]
        for start in range(0, len(docs), 1000):
            localcouch.bulk(self.server, self.global_db, docs[start:start + 1000])

        def prepare(domain: str) -> None:
            localcouch.bulk(self.server, self.db(domain, SETTINGS),
                            [localcouch.settings_doc(f"owner@{domain}", domain)])
            for doctype in (GROUPS, CONTACTS):
                localcouch.ensure_db(self.server, self.db(domain, doctype))
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(prepare, domains))

    def deploy(self, domains: list[str]) -> None:
        """The protection and the lookup view, as `deploy-design-docs` installs them."""
        design = design_docs.load()
        protection = design.protection(config.load_identity([self.server.sync[0]]))
        targets = [target for domain in domains for target in design.instance_targets(self.prefix(domain), protection)]
        with self.gateway() as gateway:
            outcomes = list(design_docs.deploy_all(gateway, targets, concurrency=CONCURRENCY))
        assert not any(outcome.error for outcome in outcomes)

    def gateway(self) -> CouchGateway:
        user, password = self.server.sync
        return CouchGateway(config.load_couch(self.server.url, username=user, password=password,
                                              pool_size=CONCURRENCY))

    def synchronizer(self, gateway: CouchGateway) -> Synchronizer:
        """As the commands make it: the state database, made by whichever case comes first, protected (its
        writes validated as in production, `couchsync apply`'s included)."""
        design = design_docs.load()
        settings = config.load_sync(global_db=self.global_db, concurrency=CONCURRENCY)
        identity = config.load_identity([self.server.sync[0]])
        return Synchronizer(gateway, InstanceDirectory(gateway, self.global_db, indexes=design.global_indexes),
                            design, settings, state_target=design.state_target(settings.state_db, identity))

    def cli_env(self) -> dict[str, str]:
        user, password = self.server.sync
        return {**os.environ, "COUCHSYNC_COUCH_URL": self.server.url, "COUCHSYNC_COUCH_USER": user,
                "COUCHSYNC_COUCH_PASSWORD": password, "COUCHSYNC_GLOBAL_DB": self.global_db}

    # --- the baselines' raw requests -------------------------------------------------------------------

    def read_write(self, db: str, docs: list[dict[str, Any]]) -> None:
        """Read these documents by id, then write them (with the revisions found) in one _bulk_docs."""
        rows = self.rows(self.session.post(self.url(db, "_all_docs"), json={"keys": [doc["_id"] for doc in docs]},
                                           timeout=60))
        revs = {row["id"]: row["value"]["rev"] for row in rows if "value" in row and not row["value"].get("deleted")}
        self.write(db, docs, revs)

    def look_up_write(self, db: str, docs: list[dict[str, Any]], keys: list[list[str]]) -> None:
        """Find contacts through the lookup view by these keys, then write the documents over those found."""
        rows = self.rows(self.session.post(self.url(db, "_design", LOOKUP_DDOC, "_view", LOOKUP_VIEW),
                                           json={"keys": keys, "include_docs": True}, timeout=60))
        self.write(db, docs, {row["id"]: row["doc"]["_rev"] for row in rows if row.get("doc")})

    @staticmethod
    def rows(response: requests.Response) -> list[dict[str, Any]]:
        """A view's rows. An error answer (CouchDB's carries no `rows`) stops the benchmark with the
        server's reason: a baseline that skipped its work would only look fast."""
        if not response.ok or "rows" not in response.json():
            raise RuntimeError(f"{response.request.method} {response.url.split('?')[0]}: "
                               f"{response.status_code} {response.text[:300]}")
        return list(response.json()["rows"])

    def write(self, db: str, docs: list[dict[str, Any]], revs: dict[str, str]) -> None:
        written = [{**doc, **({"_rev": revs[doc["_id"]]} if doc["_id"] in revs else {})} for doc in docs]
        response = self.session.post(self.url(db, "_bulk_docs"), json={"docs": written}, timeout=60)
        response.raise_for_status()


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def member(org: str, n: int) -> dict[str, str]:
    return {"email": f"member{n}@{org}.example", "firstName": "Member", "lastName": str(n),
            "workplaceFqdn": f"member{n}.{org}.example"}


def event(routing_key: str, org: str, group: str, second: int, **fields: Any) -> Any:
    body = {"timestamp": f"2026-06-16T10:{second // 60 % 60:02d}:{second % 60:02d}Z", "organizationId": org,
            "id": group, **fields}
    return parse_event(routing_key, json.dumps(body))


def fan_out(bench: Bench, runs: int, instances: int, members: int, case: str) -> list[Figure]:
    """`members` people added (one event) to a group in every instance, against raw read + write per
    database, and against the same with the contacts looked up through the view."""
    org = f"{bench.tag}{case}"
    domains = [org + ".example"] + [f"i{n:05d}.{org}.example" for n in range(instances - 1)]
    bench.add_instances(domains, org)
    bench.deploy(domains)
    # The baselines' databases are protected too: the server validates their writes as it does couchsync's.
    bench.add_baselines(domains, RAW, LOOKUP, protected=True)
    note = f"{instances} instances, {members} member(s), {instances * (members + 1)} documents written per run"
    figure = Figure(case, "seconds", baseline_name="raw read + write per database, same concurrency", target=1.25,
                    note=note)
    looked_up = Figure(f"{case} vs raw + lookup", "seconds", note=note,
                       baseline_name="the same, contacts found through the lookup view first")
    with bench.gateway() as gateway, bench.synchronizer(gateway) as sync:
        # Warm-up, unmeasured: the group exists, each lookup view and the owners' cache are built (a member
        # to look up makes couchsync read each owner, whom it keeps for ten minutes).
        assert not sync.apply(event("b2b.group.created", org, "warm", 0, name="Warm",
                                    members=[member(org, -1)])).failures
        for run in range(runs):
            people = [member(org, run * members + i) for i in range(members)]
            if case == "fanout":
                routing = ("b2b.group.member.added", dict(members=people))
            else:
                routing = ("b2b.group.created", dict(name=f"Group {run}", members=people))
            group = "warm" if case == "fanout" else f"g{run}"
            bench.measure(figure.baseline, figure.baseline_costs,
                          lambda: baseline_fan_out(bench, domains, org, group, people, RAW))
            bench.measure(looked_up.baseline, looked_up.baseline_costs,
                          lambda: baseline_fan_out(bench, domains, org, group, people, LOOKUP))
            report = None

            def apply() -> None:
                nonlocal report
                report = sync.apply(event(routing[0], org, group, run + 1, **routing[1]))
            bench.measure(figure.couchsync, figure.couchsync_costs, apply, profile=case)
            assert report is not None and not report.failures and report.writes >= instances * members, \
                report.fields() if report else None
    looked_up.couchsync, looked_up.couchsync_costs = figure.couchsync, figure.couchsync_costs
    return [figure, looked_up]


def baseline_fan_out(bench: Bench, domains: list[str], org: str, group: str, people: list[dict[str, str]],
                     baseline: str) -> None:
    """The same documents (see `final_contact`), written the plainest way into the baseline's databases: per
    instance, read + write the group, then read (by id, or through the lookup view by email and host) + write
    the contacts."""
    contacts = [final_contact(org, person, group) for person in people]

    def one(domain: str) -> None:
        bench.read_write(bench.db(domain, GROUPS, baseline), [final_group(org, group)])
        db = bench.db(domain, CONTACTS, baseline)
        if baseline == LOOKUP:
            bench.look_up_write(db, contacts, lookup_keys([p["email"] for p in people],
                                                          [p["workplaceFqdn"] for p in people]))
        else:
            bench.read_write(db, contacts)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, domains))


def bootstrap(bench: Bench, runs: int, contacts: int, groups: int) -> list[Figure]:
    """The directory copied into a new instance by couchsync, by paged _find + _bulk_docs, by _replicate."""
    org = f"{bench.tag}boot"
    source = f"{org}.example"
    bench.add_instances([source], org)
    directory.seed(bench.server, bench.db(source, GROUPS), bench.db(source, CONTACTS), org, contacts, groups)
    copy = Figure("bootstrap", "seconds", baseline_name="paged _find (1,000, bookmarks) + _bulk_docs", target=1.2,
                  note=f"{contacts} contacts, {groups} groups")
    replicate = Figure("bootstrap vs _replicate", "seconds", baseline_name="_replicate with a selector",
                       note=copy.note)
    honours_selector = bench.server.kind != "pouchdb-server"
    if not honours_selector:
        replicate.note += "; not measured: PouchDB Server ignores a replication selector (servers.md)"
    with bench.gateway() as gateway, bench.synchronizer(gateway) as sync:
        # Unmeasured: the organization's state taken over from its organization instance, once (a first
        # event or bootstrap of a directory the stack wrote does it; every later one reads the state).
        sync.instances_of(org)
        for run in range(runs):
            raw, mine = f"raw{run}.{org}.example", f"new{run}.{org}.example"
            bench.add_instances([raw, mine], org)
            bench.measure(copy.baseline, copy.baseline_costs, lambda: baseline_copy(bench, source, raw, org))
            bench.measure(copy.couchsync, copy.couchsync_costs, lambda: sync.bootstrap(mine), profile="bootstrap")
            if honours_selector:
                replicated = f"rep{run}.{org}.example"
                bench.add_instances([replicated], org)
                bench.measure(replicate.baseline, replicate.baseline_costs,
                              lambda: baseline_replicate(bench, source, replicated, org))
                replicate.couchsync, replicate.couchsync_costs = copy.couchsync, copy.couchsync_costs
    return [copy, replicate]


def baseline_copy(bench: Bench, source: str, target: str, org: str) -> None:
    selector = {"twakeDirectory.managed": True, "twakeDirectory.organizationId": org}
    for doctype in (GROUPS, CONTACTS):
        bookmark, skip = None, 0
        while True:
            query: dict[str, Any] = {"selector": selector, "limit": 1000}
            query.update({"bookmark": bookmark} if bookmark else {"skip": skip})
            page = bench.session.post(bench.url(bench.db(source, doctype), "_find"), json=query, timeout=120).json()
            docs = [{k: v for k, v in doc.items() if k != "_rev"} for doc in page["docs"]]
            if docs:
                bench.session.post(bench.url(bench.db(target, doctype), "_bulk_docs"), json={"docs": docs},
                                   timeout=120).raise_for_status()
            if len(docs) < 1000:
                break
            bookmark = page.get("bookmark")
            skip += len(docs)


def baseline_replicate(bench: Bench, source: str, target: str, org: str) -> None:
    for doctype in (GROUPS, CONTACTS):
        body = {"source": bench.url(bench.db(source, doctype)).replace("://", f"://{':'.join(bench.server.sync)}@"),
                "target": bench.url(bench.db(target, doctype)).replace("://", f"://{':'.join(bench.server.sync)}@"),
                "selector": {"twakeDirectory.managed": True, "twakeDirectory.organizationId": org}}
        bench.session.post(bench.server.url + "/_replicate", json=body, timeout=600).raise_for_status()


def peak_rss(bench: Bench, runs: int, groups: int, sizes: tuple[int, ...]) -> Figure:
    """Peak RSS of `couchsync bootstrap-member` at each directory size (MB); the ratio is largest / smallest."""
    figure = Figure("rss", "MB", baseline_name=f"the same at {sizes[0]} contacts", target=1.2,
                    note=f"bootstrap-member at {sizes[0]} then {sizes[-1]} contacts, {groups} groups")
    for size in sizes:
        org = f"{bench.tag}rss{size}"
        source = f"{org}.example"
        bench.add_instances([source], org)
        directory.seed(bench.server, bench.db(source, GROUPS), bench.db(source, CONTACTS), org, size, groups)
        samples = figure.baseline if size == sizes[0] else figure.couchsync
        for run in range(runs):
            target = f"new{run}.{org}.example"
            bench.add_instances([target], org)
            samples.append(child_peak_rss([sys.executable, "-m", "couchsync", "bootstrap-member", target],
                                          bench.cli_env()))
    return figure


def child_peak_rss(command: list[str], env: dict[str, str]) -> float:
    """The command's peak resident set in MB, measured by a fresh parent whose only child it is."""
    return child_usage(command, env)[2]


def child_usage(command: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[float, float, float]:
    """The command's wall time (s), CPU time (user + system, s) and peak resident set (MB), measured by a
    fresh parent whose only child it is."""
    measure = ("import resource, subprocess, sys, time; started = time.perf_counter(); "
               "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
               "wall = time.perf_counter() - started; usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", measure, *command], env=env, input=stdin, capture_output=True,
                          check=True, timeout=3600)
    wall, cpu, rss = done.stdout.decode().strip().splitlines()[-1].split()
    return float(wall), float(cpu), int(rss) / 1024


def planning(runs: int, sizes: tuple[int, ...]) -> list[Figure]:
    """The pure projection of one group.created into an empty instance, per doubling of its members."""
    times: dict[int, list[float]] = {}
    for size in sizes:
        people = [member("acme", i) for i in range(size)]
        created = event("b2b.group.created", "acme", "all", 0, name="All", members=people)
        state = GroupState("acme", "all").merged(created)
        profiles = {m.email.lower(): PersonState.of("acme", m, created.stamp) for m in created.members}
        times[size] = [timed(lambda: plan_group_event(state, profiles, InstanceView("x.acme.example"),
                                                      named=set(profiles))) for _ in range(runs)]
    return [Figure(f"planning {size:,} members", "seconds", couchsync=times[size],
                   baseline=[2 * sample for sample in times[before]], target=1.5,
                   baseline_name=f"twice the time for {before:,} (linear growth)", note="no server")
            for before, size in zip(sizes, sizes[1:])]


def big_event(bench: Bench, runs: int, members: int, instances: int) -> Figure:
    """`couchsync apply` of one group.created with `members` people to `instances` instances."""
    figure = Figure("bigevent", "seconds", baseline_name="raw read + write per database, same concurrency, "
                    "into databases protected alike", target=1.5,
                    note=f"one group.created of {members:,} members to {instances} instances")
    usages = []
    for run in range(runs):
        org = f"{bench.tag}big{run}"
        domains = [org + ".example"] + [f"i{n}.{org}.example" for n in range(instances - 1)]
        bench.add_instances(domains, org)
        bench.deploy(domains)
        bench.add_baselines(domains, RAW, protected=True)
        people = [member(org, i) for i in range(members)]
        line = json.dumps({"routingKey": "b2b.group.created", "body": {
            "timestamp": "2026-06-16T10:00:00Z", "organizationId": org, "id": "all", "name": "All",
            "members": people}})
        bench.measure(figure.baseline, figure.baseline_costs,
                      lambda: baseline_fan_out(bench, domains, org, "all", people, RAW))
        walls: list[float] = []
        bench.measure(walls, figure.couchsync_costs, profile="bigevent", action=lambda: usages.append(
            child_usage([sys.executable, "-m", "couchsync", "apply", "-"], bench.cli_env(), line.encode())))
        figure.couchsync.append(usages[-1][0])  # the command's own wall time, without the measuring parent's
    figure.note += "; couchsync CPU {:.1f} s, peak RSS {:.0f} MB (medians)".format(
        statistics.median(u[1] for u in usages), statistics.median(u[2] for u in usages))
    return figure


def worker_throughput(bench: Bench, runs: int, events: int, instances: int) -> Figure:
    """Events per second through RabbitMQ, from the first publish to the last one handled."""
    figure = Figure("worker", "events/s", note=f"{events} member.added/removed events, {instances} instances, "
                    "20 groups; one worker process, default prefetch, concurrency and batching")
    for run in range(runs):
        org = f"{bench.tag}w{run}"
        domains = [f"{org}.example"] + [f"i{n}.{org}.example" for n in range(instances - 1)]
        bench.add_instances(domains, org)
        bench.deploy(domains)
        with running_worker(bench, org) as (port, exchange):
            messages = [("b2b.group.created", {"timestamp": "2026-06-16T09:00:00Z", "organizationId": org,
                                               "id": f"g{g}", "name": f"Group {g}", "members": []})
                        for g in range(20)]
            messages += [("b2b.group.member.removed" if i % 4 == 3 else "b2b.group.member.added", {
                "timestamp": f"2026-06-16T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "organizationId": org,
                "id": f"g{i % 20}", "members": [member(org, i % 500)]}) for i in range(events - 20)]
            started = time.perf_counter()
            publish(exchange, messages)
            wait_for(lambda: localbroker.events_handled(port) >= events, 3600)
            figure.couchsync.append(events / (time.perf_counter() - started))
    return figure


def burst(bench: Bench, runs: int, instances: int, groups: int, people: int) -> list[Figure]:
    """`groups` x `people` member.added for one organization, through the worker (batched, the default),
    against a raw client writing the documents the burst leaves: per instance one `_bulk_docs` of the groups
    and one of the contacts, into databases protected alike (the empty groups there beforehand, as the
    worker's creations leave them, their revisions known). Wall time, and `_bulk_docs` requests to instances."""
    note = f"{groups * people} member.added ({groups} groups x {people} people), {instances} instances"
    raw = "a raw client writing the final documents, one _bulk_docs per database, protected alike"
    seconds = Figure("burst", "seconds", baseline_name=raw, target=2, note=note)
    writes = Figure("burst instance-writes", "requests", baseline_name=raw,
                    note=note + "; `_bulk_docs` requests to instance databases")
    for run in range(runs):
        org = f"{bench.tag}b{run}"
        domains = [f"{org}.example"] + [f"i{n}.{org}.example" for n in range(instances - 1)]
        bench.add_instances(domains, org)
        bench.deploy(domains)
        bench.add_baselines(domains, RAW, protected=True)
        added = [("b2b.group.member.added", {
            "timestamp": f"2026-06-16T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "organizationId": org,
            "id": f"g{i % groups}", "members": [member(org, i)]}) for i in range(groups * people)]
        with running_worker(bench, org) as (port, exchange):
            publish(exchange, [("b2b.group.created", {"timestamp": "2026-06-16T09:00:00Z", "organizationId": org,
                                                      "id": f"g{g}", "name": f"Group {g}", "members": []})
                               for g in range(groups)])
            wait_for(lambda: localbroker.events_handled(port) >= groups, 600)
            before = localbroker.metric_total(port, "couchsync_bulk_writes_total")

            def apply() -> None:
                publish(exchange, added)
                wait_for(lambda: localbroker.events_handled(port) >= groups + len(added), 3600)
            bench.measure(seconds.couchsync, seconds.couchsync_costs, apply, profile="burst")
            writes.couchsync.append(localbroker.metric_total(port, "couchsync_bulk_writes_total") - before)
        final = baseline_burst_documents(org, groups, [member(org, i) for i in range(groups * people)])
        revs = baseline_seed_groups(bench, domains, final[0])
        bench.measure(seconds.baseline, seconds.baseline_costs, lambda: baseline_burst(bench, domains, final, revs))
        writes.baseline.append(2 * len(domains))
    return [seconds, writes]


def baseline_burst_documents(org: str, groups: int,
                             people: list[dict[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The groups and contacts a burst leaves in each instance: person i in group i % groups."""
    group_docs = [final_group(org, f"g{g}", f"Group {g}") for g in range(groups)]
    contacts = [final_contact(org, person, f"g{i % groups}") for i, person in enumerate(people)]
    return group_docs, contacts


def final_group(org: str, group: str, name: str | None = None) -> dict[str, Any]:
    """The managed group document couchsync writes, built by its own function: the baselines write what
    couchsync writes, so that the server validates and indexes the same documents for both."""
    values = {"name": name or group, "createdAt": "2026-06-16T10:00:00Z"}
    return group_doc(GroupState(org, group, alive=True, values=values), None)


def final_contact(org: str, person: dict[str, str], group: str) -> dict[str, Any]:
    """The managed contact couchsync writes for a member of one group, built by its own functions."""
    profile = Member(person["email"], first_name=person["firstName"], last_name=person["lastName"],
                     workplace_fqdn=person["workplaceFqdn"])
    return with_groups(upsert_contact(None, profile, org), {managed_group_id(org, group): True})


def baseline_seed_groups(bench: Bench, domains: list[str], groups: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The empty groups written into the baseline's databases (unmeasured): their revisions by instance."""
    def seed(domain: str) -> dict[str, str]:
        empty = [{"_id": doc["_id"], "name": doc["name"]} for doc in groups]
        response = bench.session.post(bench.url(bench.db(domain, GROUPS, RAW), "_bulk_docs"), json={"docs": empty},
                                      timeout=60)
        response.raise_for_status()
        return {row["id"]: row["rev"] for row in response.json()}
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return dict(zip(domains, pool.map(seed, domains)))


def baseline_burst(bench: Bench, domains: list[str], final: tuple[list[dict[str, Any]], list[dict[str, Any]]],
                   revs: dict[str, dict[str, str]]) -> None:
    groups, contacts = final

    def one(domain: str) -> None:
        bench.write(bench.db(domain, GROUPS, RAW), groups, revs[domain])
        bench.write(bench.db(domain, CONTACTS, RAW), contacts, {})
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, domains))


def scale_out(runs: int, instances: int, events: int) -> list[Figure]:
    """Events per second through 1, 2 and 3 workers on the same queues, each on its own node of a three-node
    CouchDB cluster and of a three-node RabbitMQ cluster started for the case; baseline: the raw write rate
    of the same CouchDB cluster in the same run (one document a request through its three nodes)."""
    release = localcouch.find_release()
    if release is None:
        print("bench: workers needs an Apache CouchDB release for its cluster: skipped", file=sys.stderr)
        return []
    import localrabbit  # only this case needs the RabbitMQ cluster

    couch, rabbit = localcouch.start_couchdb_cluster(release), None
    try:
        rabbit = localrabbit.start_cluster(3)
        bench = Bench(couch.first)
        figures = {count: (Figure(f"workers x{count}", "events/s", baseline_name="raw writes/s of the cluster",
                                  note=f"{events} member.added/removed events over {ORGANIZATIONS} organizations, "
                                  f"{instances} instances, 2 groups each; "
                                  f"{count} worker(s), each on its own CouchDB and RabbitMQ node"),
                           Figure(f"workers x{count} writes", "writes/s", baseline_name="raw writes/s of the cluster",
                                  note="the same run's document writes to the instances per second (their "
                                  "databases' update sequences), against the cluster's raw write rate"))
                   for count in (1, 2, 3)}
        for run in range(runs):
            for count, (rate, writes) in figures.items():
                raw = raw_write_rate(bench, couch, f"r{run}x{count}", instances)
                rate.baseline.append(raw)
                writes.baseline.append(raw)
                events_per_second, writes_per_second = workers_rate(
                    bench, couch, rabbit, f"{bench.tag}s{run}x{count}", count, instances, events)
                rate.couchsync.append(events_per_second)
                writes.couchsync.append(writes_per_second)
        return [figure for pair in figures.values() for figure in pair]
    finally:
        if rabbit is not None:
            rabbit.stop()
        couch.stop()


ORGANIZATIONS = 20  # of the workers case: partitions spread organizations, not one organization's events


def workers_rate(bench: Bench, couch: localcouch.CouchCluster, rabbit: Any, org: str, count: int, instances: int,
                 events: int) -> tuple[float, float]:
    """Events and instance writes per second through `count` workers, from the first publish to the last
    event handled: twenty organizations of `instances` / 20 instances each (at least one), `events` spread
    over them. `org` names the run's queues and exchanges."""
    organizations = [f"{org}-o{k:02d}" for k in range(ORGANIZATIONS)]
    databases = []
    for name in organizations:
        domains = [f"{name}.example"] + [f"i{n}.{name}.example" for n in range(max(0, instances // ORGANIZATIONS - 1))]
        bench.add_instances(domains, name)
        bench.deploy(domains)
        databases += [bench.db(domain, doctype) for domain in domains for doctype in (GROUPS, CONTACTS)]
    messages = [("b2b.group.created", {"timestamp": "2026-06-16T09:00:00Z", "organizationId": name,
                                       "id": f"g{g}", "name": f"Group {g}", "members": []})
                for name in organizations for g in range(2)]
    messages += [("b2b.group.member.removed" if i % 4 == 3 else "b2b.group.member.added", {
        "timestamp": f"2026-06-16T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "organizationId": organizations[i % 20],
        "id": f"g{i // 20 % 2}", "members": [member(organizations[i % 20], i // 20 % 25)]})
        for i in range(events - len(messages))]
    urls = list(rabbit.urls)
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(running_worker(bench, org, broker_port=rabbit.nodes[number].amqp_port,
                                                    COUCHSYNC_COUCH_URL=couch.nodes[number].url,
                                                    COUCHSYNC_AMQP_URL=",".join(urls[number:] + urls[:number])))[0]
                 for number in range(count)]
        exchange = f"{org}.b2b"
        before = updates(couch.first, databases)
        started = time.perf_counter()
        publish(exchange, messages, rabbit.nodes[0].amqp_port)
        wait_for(lambda: sum(localbroker.events_handled(port) for port in ports) >= events, 3600)
        seconds = time.perf_counter() - started
        # The copies read may trail the nodes the workers wrote through: counted once they stop moving.
        after, previous = updates(couch.first, databases), -1
        while after != previous:
            time.sleep(3)
            previous, after = after, updates(couch.first, databases)
        return events / seconds, (after - before) / seconds


def updates(server: localcouch.LocalCouch, databases: list[str]) -> int:
    """The documents written to these databases so far: the sum of their update sequences' counts (a
    cluster's `N-…` sequence counts the updates of one copy of each shard)."""
    total = 0
    for db in databases:
        seq = server.request("GET", localcouch.db_path(db)).json()["update_seq"]
        total += int(str(seq).split("-", 1)[0])
    return total


def raw_write_rate(bench: Bench, couch: localcouch.CouchCluster, name: str, instances: int) -> float:
    """Documents per second a minimal client writes into the cluster, one per request, into `instances`
    databases, through its nodes in turn, CONCURRENCY threads per node."""
    databases = [database_name(f"{bench.tag}-raw{name}-i{n}", CONTACTS) for n in range(instances)]
    for db in databases:
        localcouch.ensure_db(couch.first, db)
    sessions = []
    for node in couch.nodes:
        session = requests.Session()
        session.auth = node.sync
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=CONCURRENCY))
        sessions.append((session, node.url))
    writes = 100 * instances

    def write(number: int) -> None:
        session, url = sessions[number % len(sessions)]
        db = localcouch.db_path(databases[number % len(databases)])
        session.post(url + db, json={"_id": f"doc{number}", "n": number}, timeout=60).raise_for_status()
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY * len(sessions)) as pool:
        list(pool.map(write, range(writes)))
    return writes / (time.perf_counter() - started)


@contextmanager
def running_worker(bench: Bench, org: str, broker_port: int = 5672, **env: str) -> Iterator[tuple[int, str]]:
    """A `couchsync worker` on queues and exchanges of the organization's own: its metrics port, its exchange.
    `broker_port`: where its queues are (the machine's RabbitMQ; a cluster's queues go with the cluster)."""
    exchange, prefix = f"{org}.b2b", f"{org}.couchsync."
    port = localports.free_port()
    # Its log is kept, to read when a run hangs (a burst once waited for 7 of its 255 events, never handled).
    with open(Path(tempfile.gettempdir()) / f"{org}-worker.log", "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "couchsync", "worker", "--metrics-port", str(port)],
                                  env={**bench.cli_env(), "COUCHSYNC_EXCHANGE": exchange, "COUCHSYNC_AUTH_EXCHANGE":
                                       f"{org}.auth", "COUCHSYNC_QUEUE_PREFIX": prefix, **env},
                                  stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(lambda: localbroker.consuming(port), 60)  # before, a publish could find no queue bound
            yield port, exchange
        finally:
            worker.terminate()
            worker.wait(60)
            if broker_port == 5672:
                localbroker.remove(prefix, exchange, f"{org}.auth")


def publish(exchange: str, messages: list[tuple[str, dict[str, Any]]], port: int = 5672) -> None:
    """Publish (routing key, body) pairs to the exchange, as the directory does."""
    import pika  # only the worker's cases need the broker

    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        for routing_key, body in messages:
            channel.basic_publish(exchange, routing_key, json.dumps(body).encode())
    finally:
        connection.close()


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark's worker did not get there in time")
        time.sleep(0.1)


def print_table(figures: list[Figure]) -> None:
    print(f"{'case':<24} {'unit':<9} {'couchsync median [min-max]':<30} {'baseline median [min-max]':<30} "
          f"{'ratio':>6} {'target':>7}")
    for figure in figures:
        def cell(samples: list[float]) -> str:
            if not samples:
                return "-"
            return f"{statistics.median(samples):.2f} [{min(samples):.2f}-{max(samples):.2f}]"
        ratio = f"{figure.ratio:.2f}" if figure.ratio is not None else "-"
        target = f"<={figure.target:g}" if figure.target else "-"
        print(f"{figure.case:<24} {figure.unit:<9} {cell(figure.couchsync):<30} {cell(figure.baseline):<30} "
              f"{ratio:>6} {target:>7}")
        print(f"{'':<24} {figure.note}; baseline: {figure.baseline_name or '-'}")
        if figure.couchsync_costs and figure.baseline_costs:
            def median(costs: list[Cost], value: Callable[[Cost], float]) -> float:
                return statistics.median(value(cost) for cost in costs)
            mine, theirs = figure.couchsync_costs, figure.baseline_costs
            print(f"{'':<24} server, couchsync vs baseline: requests {median(mine, lambda c: c.requests):.0f} vs "
                  f"{median(theirs, lambda c: c.requests):.0f}; couchjs validation "
                  f"{median(mine, lambda c: c.validation):.2f} s vs {median(theirs, lambda c: c.validation):.2f} s; "
                  f"view indexing {median(mine, lambda c: c.indexing):.2f} s vs "
                  f"{median(theirs, lambda c: c.indexing):.2f} s; the bench process's CPU "
                  f"{median(mine, lambda c: c.client):.2f} s vs {median(theirs, lambda c: c.client):.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="fanout,groups,bootstrap,worker,rss,planning,bigevent,burst,workers")
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    parser.add_argument("--scale", type=float, default=1.0, help="size factor (0.1 for a quick look)")
    parser.add_argument("--profile", type=Path, help="a folder: py-spy records each couchsync run there "
                        f"(at {PROFILE_RATE} Hz; split them with scripts/profile_split.py --rate {PROFILE_RATE})")
    args = parser.parse_args()
    if args.profile is not None and shutil.which("py-spy") is None:
        parser.error("--profile records with py-spy: pip install py-spy")
    cases = set(args.only.split(","))

    def n(value: int) -> int:
        return max(int(value * args.scale), 2)

    server = localcouch.server(discover=True)
    figures: list[Figure] = []
    try:
        bench = Bench(server, args.profile)
        print(f"bench: {server.label} at {server.url}, {args.runs} runs per figure", file=sys.stderr)
        measures: dict[str, Callable[[], list[Figure]]] = {
            "fanout": lambda: fan_out(bench, args.runs, n(1000), 1, "fanout"),
            "groups": lambda: fan_out(bench, args.runs, n(200), 20, "groups"),
            "bootstrap": lambda: bootstrap(bench, args.runs, n(10_000), n(200)),
            "worker": lambda: [worker_throughput(bench, args.runs, n(2000), 20)],
            "rss": lambda: [peak_rss(bench, args.runs, n(200), (n(1000), n(10_000)))],
            "planning": lambda: planning(args.runs, tuple(n(size) for size in (1000, 2000, 4000, 8000))),
            "bigevent": lambda: [big_event(bench, args.runs, n(10_000), 3)],
            "burst": lambda: burst(bench, args.runs, n(200), 5, n(100)),
            "workers": lambda: scale_out(args.runs, n(40), n(1000)),
        }
        for case, measure in measures.items():
            if case in cases:
                # Each case's figures are shown and saved as soon as they are measured: a long run cut
                # short keeps what it measured.
                measured = measure()
                print_table(measured)
                figures += measured
                save(args, server, figures)
    finally:
        server.stop()
    print(f"bench: figures written to {args.json}", file=sys.stderr)
    return 0


def save(args: argparse.Namespace, server: localcouch.LocalCouch, figures: list[Figure]) -> None:
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump({"server": server.kind, "version": server.version, "runs": args.runs, "scale": args.scale,
                   "figures": [figure.as_json() for figure in figures]}, out, indent=2)


if __name__ == "__main__":
    sys.exit(main())
