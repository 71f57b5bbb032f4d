"""The worker's Prometheus metrics (names and labels defined here only) and their HTTP endpoint.

`GET /metrics` is the Prometheus exposition; `GET /healthz` answers 200 while the worker is connected
to the broker and consuming, 503 with the reason otherwise (`not consuming`, `paused: couchdb`,
`paused: credentials`), for a load balancer or a readiness probe.

`reconcile --all` is a process that ends: its figures (`ReconcileMetrics`) go to a file for node_exporter's
textfile collector, written atomically, instead of an endpoint nobody would scrape in time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, write_to_textfile)

from couchsync.events import ROUTING_KEYS, USER_CREATED

OUTCOMES = ("applied", "retried", "dead_lettered", "paused")
PAUSE_REASONS = ("couchdb", "credentials")  # see couchsync.breaker
# A routing key is input (any publisher picks it): each value of a label is a series kept for the
# process's life, so only the known keys are label values, and every other key is one "other".
KNOWN_ROUTING_KEYS = frozenset(ROUTING_KEYS) | {USER_CREATED}
OTHER = "other"
# A fan-out to one instance takes milliseconds, to thousands of instances tens of seconds.
FANOUT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metric objects of one worker, in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("couchsync_events", "Messages handled, by routing key and outcome "
                              "(applied, retried, dead_lettered, paused: handed back unchanged).",
                              ["routing_key", "outcome"],
                              registry=self.registry)
        self.fanout_seconds = Histogram("couchsync_fanout_seconds", "Time to apply one event to every "
                                        "instance of its organization.", ["routing_key"],
                                        buckets=FANOUT_BUCKETS, registry=self.registry)
        self.refusals = Counter("couchsync_refusals", "Changes an instance refused, by routing key: an "
                                "unmanaged document where a managed one belongs (the event is applied "
                                "everywhere else and acknowledged).", ["routing_key"], registry=self.registry)
        self.bulk_writes = Counter("couchsync_bulk_writes", "`_bulk_docs` requests made to instance databases by "
                                   "applied messages (a batch's, once).", registry=self.registry)
        self.conflicts_merged = Counter(
            "couchsync_conflicts_merged", "Losing revisions of conflicted state and managed documents deleted once "
            "joined into the winner (a CouchDB cluster accepts concurrent updates through different nodes).",
            registry=self.registry)
        self.future_stamped = Counter(
            "couchsync_future_stamped_events", "Events stamped more than 5 s ahead of the worker's clock (each "
            "logged at WARNING), those beyond --max-future-skew (dead-lettered) included.", registry=self.registry)
        self.in_flight = Gauge("couchsync_in_flight", "Messages being handled now.", registry=self.registry)
        self.settling_pending = Gauge(
            "couchsync_settling_pending", "Written documents not yet read again for conflicts, repairs not yet "
            "made and checks running (0: all this worker wrote is known settled).", registry=self.registry)
        self.instance_records_rejected = Counter(
            "couchsync_instance_records_rejected", "Records of the global instances database skipped as invalid "
            "or sharing databases with another (each counted once per process).", ["problem"],
            registry=self.registry)
        self.paused = Gauge("couchsync_paused", "1 while the worker is paused, by reason: couchdb (unreachable, "
                            "timing out or answering 5xx), credentials (the sync identity refused).", ["reason"],
                            registry=self.registry)
        for reason in PAUSE_REASONS:
            self.paused.labels(reason).set(0)  # the series exist from the start: an alert sees 0, not nothing
        self.partition_held = Gauge(
            "couchsync_partition_held", "1 for each partition this worker is the active consumer of (it had a "
            "delivery from it since it last registered), 0 for the others.", ["partition"], registry=self.registry)
        self.routed = Counter("couchsync_routed", "Messages of the intake queue forwarded to a partition queue, by "
                              "partition.", ["partition"], registry=self.registry)
        self.reconnects = Counter("couchsync_broker_reconnects", "Connections to the broker made again after "
                                  "one was lost.", registry=self.registry)

        self.queue_messages = Gauge("couchsync_queue_messages", "Ready messages in couchsync's queues (a passive "
                                    "queue.declare every few seconds), by queue: main, retry, dead.", ["queue"],
                                    registry=self.registry)
        self.oldest_message_age = Gauge(
            "couchsync_oldest_message_age_seconds", "An upper bound on the age of the oldest ready message of the "
            "main queue (0 when it is empty): every ready message arrived after the later of the last time the "
            "queue was seen empty and the AMQP timestamp of the last message delivered.", registry=self.registry)
        self.protection_restored = Counter(
            "couchsync_protection_restored", "Protections (_design/couchsync-protection) put back after they were "
            "deleted or changed, found by the _db_updates feed or a sweep.", registry=self.registry)
        self.lookup_restored = Counter(
            "couchsync_lookup_restored", "couchsync/lookup views put back in a contacts database after they were "
            "deleted or changed.", registry=self.registry)
        self.protection_installed = Counter(
            "couchsync_protection_installed", "Protections installed in a contacts or groups database seen for the "
            "first time (a new instance).", registry=self.registry)
        self.protection_feed = Gauge(
            "couchsync_protection_feed_following", "1 while the worker follows CouchDB's _db_updates feed, 0 while "
            "it falls back to periodic sweeps.", registry=self.registry)

        self.held = Counter("couchsync_held", "Removals and group deletions the mass-removal hold parked in the "
                            "hold queue (this worker's).", registry=self.registry)
        self.held_messages = Gauge("couchsync_held_messages", "Messages waiting in the hold queue for `couchsync "
                                   "hold release` or `drop` (-1: the broker did not answer).", registry=self.registry)
        self.state_seeded = Counter(
            "couchsync_state_seeded", "Organizations' directory states seeded from their organization instance, by "
            "reason: missing (no marker: first take-over, or the state database was deleted), recreated, purged.",
            ["reason"], registry=self.registry)

    def count_state_seeded(self, reason: str) -> None:
        """An organization's state seeded again (`couchsync.memory`'s reasons)."""
        self.state_seeded.labels(reason).inc()

    def count_event(self, routing_key: str, outcome: str) -> None:
        """One message handled, with its outcome."""
        self.events.labels(routing_key_label(routing_key), outcome).inc()

    def set_paused(self, reason: str | None) -> None:
        """The worker is paused for `reason`, or (None) consumes."""
        for known in {*PAUSE_REASONS, *([reason] if reason else [])}:
            self.paused.labels(known).set(1 if known == reason else 0)

    def count_refusals(self, routing_key: str, refusals: int) -> None:
        """Changes refused in the instances by one applied message."""
        self.refusals.labels(routing_key_label(routing_key)).inc(refusals)

    def observe_fanout(self, routing_key: str, seconds: float) -> None:
        """The time one event took to apply to every instance of its organization."""
        self.fanout_seconds.labels(routing_key_label(routing_key)).observe(seconds)

    def instance_record_rejected(self, problem: str) -> None:
        """A record of the global database skipped (`InstanceDirectory(on_rejected=...)`)."""
        self.instance_records_rejected.labels(problem).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class ReconcileMetrics:
    """What one `reconcile --all` run found and did, for node_exporter's textfile collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.last_success = Gauge("couchsync_reconcile_last_success_timestamp_seconds", "When a run last went "
                                  "through every organization (Unix time).", registry=self.registry)
        self.last_run = Gauge("couchsync_reconcile_last_run_timestamp_seconds", "When the last run ended "
                              "(Unix time), finished or not.", registry=self.registry)
        self.drift_found = Gauge("couchsync_reconcile_drift_found", "Managed documents found missing, different "
                                 "or extra by the last run.", registry=self.registry)
        self.drift_repaired = Gauge("couchsync_reconcile_drift_repaired", "Managed documents the last run "
                                    "repaired.", registry=self.registry)
        self.organizations = Gauge("couchsync_reconcile_organizations", "Organizations of the last run, by "
                                   "outcome (ok, failed: an instance refused or in error).", ["outcome"],
                                   registry=self.registry)
        self.seconds = Gauge("couchsync_reconcile_duration_seconds", "How long the last process of the run took "
                             "(a resumed run: its last part).", registry=self.registry)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the metrics to `path` atomically (a temporary file renamed over it): node_exporter never
        reads half a file."""
        write_to_textfile(str(path), self.registry)


def routing_key_label(routing_key: str) -> str:
    """The `routing_key` label for a routing key: itself when couchsync knows it, else "other"."""
    return routing_key if routing_key in KNOWN_ROUTING_KEYS else OTHER


def serve(metrics: Metrics, host: str, port: int, problem: Callable[[], str | None]) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on a daemon thread; `shutdown()` then `server_close()` stop it.

    `problem()`: None while the worker is healthy, else what is wrong (the 503's body).
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            if self.path == "/metrics":
                self._answer(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                wrong = problem()
                self._answer(503 if wrong else 200, f"{wrong or 'ok'}\n".encode(), "text/plain")
            else:
                self._answer(404, b"not found\n", "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is not worth a log line

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="couchsync-metrics", daemon=True).start()
    return server
