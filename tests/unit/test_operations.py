"""Issue 17's pure parts: which databases the feed names, what --check reports, the queue probe's age bound,
the resumable run's progress, and the textfile."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from couchsync import config, design_docs
from couchsync.broker.consumer import Consumer
from couchsync.design_docs import Outcome, findings
from couchsync.documents import CONTACTS, GROUPS, doctype_of_database
from couchsync.errors import CouchUnavailable, DocumentConflict, UnknownOrganization
from couchsync.guard import relevant
from couchsync.metrics import Metrics, ReconcileMetrics
from couchsync.reconcile import REFUSED, REPAIRED, InstanceResult
from couchsync.reconcile_all import OrganizationResult, ReconcileRun, RunProgress


@pytest.mark.parametrize("db, doctype", [
    ("alice-acme-twake-app/io-cozy-contacts", CONTACTS),
    ("alice-acme-twake-app/io-cozy-contacts-groups", GROUPS),
    ("alice-acme-twake-app:8080/io-cozy-contacts", None),  # database_name folds ':' into '-'
    ("alice-acme-twake-app/io-cozy-files", None),
    ("io-cozy-contacts", None),
    ("_users", None),
    ("_x/io-cozy-contacts", None),
    ("couchsync/directory", None),
])
def test_a_database_name_is_known_as_a_contacts_or_groups_database_by_its_doctype(db, doctype):
    assert doctype_of_database(db) == doctype


def test_a_batch_of_the_feed_names_each_database_once_a_creation_winning_over_updates():
    a, b, c = "a/io-cozy-contacts", "b/io-cozy-contacts", "c/io-cozy-contacts-groups"
    events = [{"db_name": a, "type": "updated"}, {"db_name": a, "type": "created"}, {"db_name": a, "type": "updated"},
              {"db_name": b, "type": "deleted"}, {"db_name": c, "type": "updated"}, {"type": "updated"}]
    assert relevant(events) == {a: "created", c: "updated"}


def test_the_target_of_a_database_holds_what_deploy_design_docs_installs_there():
    design = design_docs.load()
    protection = design.protection(config.load_identity(["couchsync"]))
    contacts, groups = design.instance_targets("alice-acme-twake-app", protection)
    assert design.database_target("alice-acme-twake-app/io-cozy-contacts", protection) == contacts
    assert design.database_target("alice-acme-twake-app/io-cozy-contacts-groups", protection) == groups
    assert design.database_target("alice-acme-twake-app/io-cozy-files", protection) is None


def test_check_reports_what_deploying_would_install_as_missing_and_update_as_differing():
    outcome = Outcome("a/io-cozy-contacts", (("_design/couchsync-protection", "installed"),
                                             ("_design/couchsync", "unchanged")))
    assert findings(outcome) == [("_design/couchsync-protection", "missing")]
    assert findings(Outcome("a", (("_design/couchsync-protection", "updated"),))) == [
        ("_design/couchsync-protection", "differs")]
    assert findings(Outcome("a", missing=True)) == []


class FakeChannel:
    def __init__(self, depths: dict[str, int]) -> None:
        self.depths = depths

    def queue_declare(self, name: str, passive: bool) -> SimpleNamespace:
        assert passive
        return SimpleNamespace(method=SimpleNamespace(message_count=self.depths[name]))


def probe(consumer: Consumer, metrics: Metrics, main: int) -> float:
    settings = config.load_amqp("amqp://127.0.0.1")
    consumer._probe(FakeChannel({settings.queue: main, settings.retry_queue: 1, settings.dead_letter_queue: 2}))
    return metrics.registry.get_sample_value("couchsync_oldest_message_age_seconds")


def test_the_oldest_message_age_is_bounded_by_the_last_empty_queue_and_the_last_timestamp_delivered(monkeypatch):
    metrics = Metrics()
    consumer = Consumer(config.load_amqp("amqp://127.0.0.1"), lambda key, body: {}, metrics)
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    assert probe(consumer, metrics, main=0) == 0.0
    assert metrics.registry.get_sample_value("couchsync_queue_messages", {"queue": "dead"}) == 2
    now[0] += 100  # messages wait, nothing delivered: the queue has not been empty for 100 s
    assert probe(consumer, metrics, main=5) == 100.0
    consumer._last_published = now[0] - 30  # a message published 30 s ago was just delivered
    now[0] += 10
    assert probe(consumer, metrics, main=4) == 40.0
    assert probe(consumer, metrics, main=0) == 0.0
    consumer.stop()


def result(org: str, items: int, status: str = REPAIRED) -> list[InstanceResult]:
    return [InstanceResult(f"{org}.example", status, items=[("missing group", f"g{i}") for i in range(items)])]


class FakeCouch:
    """What the run keeps in the state database: one `_local` document."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.puts = 0

    def get_local(self, db: str, doc_id: str) -> dict | None:
        return self.docs.get(doc_id)

    def put_local(self, db: str, doc_id: str, body: dict) -> str:
        self.puts += 1
        self.docs[doc_id] = {**body, "_rev": f"{self.puts}-x"}
        return f"{self.puts}-x"


def organizations(after: str):
    return iter([org for org in ["a", "b", "c", "d"] if org > after])


def test_a_run_that_dies_is_resumed_without_redoing_a_finished_organization():
    couch = FakeCouch()
    seen: list[str] = []

    def dies_at_c(org: str) -> list[InstanceResult]:
        seen.append(org)
        if org == "c":
            raise CouchUnavailable("CouchDB unreachable")
        return result(org, 2)
    first = ReconcileRun(couch, "state", organizations, dies_at_c, concurrency=1)
    with pytest.raises(CouchUnavailable):
        first.run(first.start(), lambda _: None)
    assert couch.docs["couchsync-reconcile-run"]["cursor"] == "b"
    second_seen: list[str] = []
    second = ReconcileRun(couch, "state", organizations, lambda org: second_seen.append(org) or result(org, 1),
                          concurrency=2)
    progress = second.start()
    assert progress.resumed == 2
    progress = second.run(progress, lambda _: None)
    assert sorted(second_seen) == ["c", "d"]
    assert (progress.found, progress.repaired, progress.ok, progress.finished) == (6, 6, 4, True)
    assert progress.last_success is not None
    # The next invocation is a new run, which keeps the last success.
    third = ReconcileRun(couch, "state", organizations, lambda org: result(org, 0), concurrency=2).start()
    assert (third.resumed, third.found, third.last_success) == (0, 0, progress.last_success)


def test_a_run_with_a_refused_instance_or_a_failed_organization_is_no_success():
    couch = FakeCouch()

    def reconcile(org: str) -> list[InstanceResult]:
        if org == "b":
            raise UnknownOrganization("organization 'b' has no instance")
        return result(org, 3, REFUSED if org == "c" else REPAIRED)
    run = ReconcileRun(couch, "state", organizations, reconcile, concurrency=2)
    progress = run.run(run.start(), lambda _: None)
    assert progress.finished and progress.last_success is None
    assert (sorted(progress.failed), progress.ok, progress.found, progress.repaired) == (["b", "c"], 2, 9, 6)


def test_the_cursor_waits_for_a_slow_organization_and_the_done_list_stays_short():
    progress = RunProgress(started=0.0)
    run = ReconcileRun(FakeCouch(), "state", organizations, lambda org: [], concurrency=3)
    order = ["a", "b", "c"]
    run._record_result(progress, order, OrganizationResult("b"))
    run._record_result(progress, order, OrganizationResult("c"))
    assert (progress.cursor, progress.done) == ("", {"b", "c"})
    run._record_result(progress, order, OrganizationResult("a"))
    assert (progress.cursor, progress.done, order) == ("c", set(), [])


def test_the_textfile_is_written_whole_in_prometheus_text_format(tmp_path):
    metrics = ReconcileMetrics()
    metrics.last_success.set(1_700_000_000)
    metrics.drift_found.set(9)
    path = tmp_path / "couchsync-reconcile.prom"
    metrics.write(path)
    text = path.read_text()
    assert "couchsync_reconcile_last_success_timestamp_seconds 1.7e+09" in text
    assert "couchsync_reconcile_drift_found 9.0" in text
    assert [p.name for p in tmp_path.iterdir()] == ["couchsync-reconcile.prom"]  # no temporary file left


class RacedCouch:
    """A database where someone else puts the design document between our read and our write."""

    seal_key = None  # a server without credentials: nothing sealed

    def __init__(self, theirs: dict) -> None:
        self.theirs = theirs
        self.reads = 0

    def get_design(self, db: str, name: str) -> dict | None:
        self.reads += 1
        return None if self.reads == 1 else {"_id": f"_design/{name}", "_rev": "1-x", **self.theirs}

    def put_design(self, db: str, name: str, body: dict) -> str:
        raise DocumentConflict("document update conflict", db=db, doc_id=f"_design/{name}", status=409)


def test_a_design_document_installed_by_someone_else_meanwhile_is_as_good_when_it_is_the_same():
    lookup = design_docs.load().lookup
    assert design_docs.ensure(RacedCouch(lookup), "a/io-cozy-contacts", "couchsync", lookup) == "unchanged"
    with pytest.raises(DocumentConflict):
        design_docs.ensure(RacedCouch({"language": "javascript"}), "a/io-cozy-contacts", "couchsync", lookup)
