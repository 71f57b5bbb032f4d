"""`couchsync reconcile`: one organization's instances (`--org`), or every organization's, resumably
(`--all`), compared with the directory state and repaired; the reports and the textfile of metrics."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click

from couchsync import config
from couchsync.cli.context import Context
from couchsync.cli.output import EXIT_FAILED, REPORT_REASON_LENGTH, shown
from couchsync.metrics import ReconcileMetrics
from couchsync.reconcile import ERROR, REFUSED, DeletionLimit, InstanceResult
from couchsync.reconcile_all import OrganizationResult, ReconcileRun, RunProgress


@click.command()
@click.option("--org", "org_id", metavar="ID", help="The organization to reconcile.")
@click.option("--all", "every", is_flag=True, help="Every organization, resuming an interrupted run.")
@click.option("--org-concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="With --all: organizations reconciled at once.")
@click.option("--textfile", type=click.Path(dir_okay=False, path_type=Path),
              help="With --all: write the run's metrics there, atomically, for node_exporter's textfile collector.")
@click.option("--instance", "domain", metavar="DOMAIN", help="Only this member instance.")
@click.option("--dry-run", is_flag=True, help="List the drift and write nothing.")
@click.option("--max-deletions", "limit", metavar="N|P%", default="10%", show_default=True,
              type=DeletionLimit.parse, help="Most managed documents deleted per instance, as a count or a "
              "percentage of its managed documents; an instance needing more is refused.")
@click.option("--force", is_flag=True, help="Delete beyond --max-deletions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines.")
@click.pass_obj
def reconcile(obj: Context, org_id: str | None, every: bool, org_concurrency: int, textfile: Path | None,
              domain: str | None, dry_run: bool, limit: DeletionLimit, force: bool, as_json: bool) -> None:
    """Compare every instance's managed documents with the directory state and repair drift.

    Missing and different managed groups and contacts are written as the state has them; extra ones
    are deleted, within --max-deletions. Unmanaged documents are never touched. --org ID reconciles
    one organization, --all every one (resumable: a run that dies is finished by the next). Exits 1
    when an instance failed or was refused, 0 otherwise.
    """
    if bool(org_id) == every:
        raise click.UsageError("give --org ID or --all")
    if every:
        if domain:
            raise click.UsageError("--instance goes with --org")
        _reconcile_all(obj, org_concurrency, textfile, dry_run, limit, force, as_json)
    if textfile:
        raise click.UsageError("--textfile goes with --all")
    assert org_id is not None
    with obj.gateway() as couch, obj.synchronizer(couch) as sync:
        results = obj.reconciler(couch, sync).reconcile(org_id, domain=domain, dry_run=dry_run, limit=limit,
                                                        force=force)
    if as_json:
        click.echo(json.dumps({"organization": org_id, "dry_run": dry_run,
                               "instances": [result.as_json() for result in results]}, indent=2))
    else:
        _print_reconcile(results, dry_run)
    sys.exit(EXIT_FAILED if any(result.status in (REFUSED, ERROR) for result in results) else 0)


def _reconcile_all(obj: Context, org_concurrency: int, textfile: Path | None, dry_run: bool, limit: DeletionLimit,
                   force: bool, as_json: bool) -> None:
    """`reconcile --all`: one line per organization as it finishes, a summary, the textfile; then exit."""
    # Each organization fans out to --concurrency instances: the HTTP pool serves them all.
    obj.couch = replace(obj.couch, pool_size=obj.sync.concurrency * org_concurrency + config.DEFAULT_PREFETCH)
    metrics = ReconcileMetrics()
    started = time.monotonic()
    with obj.gateway() as couch, obj.synchronizer(couch) as sync:
        reconciler = obj.reconciler(couch, sync)
        run = ReconcileRun(couch, obj.sync.state_db, sync.directory.organizations,
                           lambda org: reconciler.reconcile(org, dry_run=dry_run, limit=limit, force=force),
                           concurrency=org_concurrency, record=not dry_run)
        progress = run.start()
        if progress.resumed:
            click.echo(f"resuming the run started at {_utc(progress.started)}: "
                       f"{progress.resumed} organizations finished already")
        try:
            progress = run.run(progress, lambda result: _print_organization(result, dry_run, as_json))
        finally:
            if textfile is not None:
                _write_reconcile_metrics(metrics, progress, time.monotonic() - started, textfile)
    click.echo(f"{progress.organizations} organizations ({progress.resumed} by the interrupted run): "
               f"{progress.ok} ok, {len(progress.failed)} failed; drift found {progress.found}, "
               f"repaired {progress.repaired}")
    sys.exit(EXIT_FAILED if progress.failed else 0)


def _print_organization(result: OrganizationResult, dry_run: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"organization": result.organization_id, "error": result.error,
                               "found": result.found, "repaired": result.repaired,
                               "instances": [instance.as_json() for instance in result.instances]}))
        return
    status = "failed" if result.failed else "ok"
    click.echo(f"{result.organization_id}: {status}, {len(result.instances)} instances, drift {result.found}, "
               f"{'would repair' if dry_run else 'repaired'} {0 if dry_run else result.repaired}"
               + (f": {shown(result.error, REPORT_REASON_LENGTH)}" if result.error else ""))
    for instance in result.instances:
        if instance.status in (REFUSED, ERROR):
            reason = shown(instance.reason or "", REPORT_REASON_LENGTH)
            click.echo(f"    {instance.domain}: {instance.status}: {reason}")


def _write_reconcile_metrics(metrics: ReconcileMetrics, progress: RunProgress, seconds: float, path: Path) -> None:
    metrics.last_run.set(time.time())
    if progress.last_success is not None:
        metrics.last_success.set(progress.last_success)
    metrics.drift_found.set(progress.found)
    metrics.drift_repaired.set(progress.repaired)
    metrics.organizations.labels("ok").set(progress.ok)
    metrics.organizations.labels("failed").set(len(progress.failed))
    metrics.seconds.set(seconds)
    metrics.write(path)


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _print_reconcile(results: Sequence[InstanceResult], dry_run: bool) -> None:
    width = max([len("INSTANCE"), *(len(result.domain) for result in results)])
    click.echo(f"{'INSTANCE':<{width}}  {'STATUS':<8}  MISSING  DIFFERENT  EXTRA")
    for result in results:
        click.echo(f"{result.domain:<{width}}  {result.status:<8}  {result.count('missing'):>7}  "
                   f"{result.count('different'):>9}  {result.count('extra'):>5}")
    verb = "would repair" if dry_run else "repaired"
    for result in results:
        for label, doc_id in result.items:
            click.echo(f"{result.domain}: {verb if result.status != REFUSED else 'refused'} {label} {doc_id}")
        for reason in result.refusals:
            click.echo(f"{result.domain}: refused by couchsync: {reason}")
        if result.reason:
            click.echo(f"{result.domain}: {result.status}: {result.reason}")
    statuses = Counter(result.status for result in results)
    click.echo(f"{len(results)} instances: "
               + ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())))
