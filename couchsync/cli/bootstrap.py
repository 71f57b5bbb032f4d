"""`couchsync bootstrap-member`: a new member instance given its organization's directory, with a
progress bar on a terminal."""

from __future__ import annotations

import sys
from typing import Any

import click

from couchsync.cli.context import Context
from couchsync.cli.options import identity_options, sync_identity


@click.command("bootstrap-member")
@click.argument("domain")
@click.option("--dry-run", is_flag=True, help="Print what would be written and write nothing.")
@identity_options
@click.pass_obj
def bootstrap_member(obj: Context, domain: str, dry_run: bool, sync_names: tuple[str, ...],
                     sync_roles: tuple[str, ...]) -> None:
    """Give the member instance DOMAIN its organization's directory.

    Copies the organization instance's managed groups and contacts (with their group relationships)
    and gives DOMAIN a managed contact for each member of the organization. Safe to run again: what
    is already there is not rewritten, so a run cut short is finished by the next. The protection and
    lookup view are installed first. Exits 0 when done (refusals are reported, not failures).
    """
    obj.identity = sync_identity(obj, sync_names, sync_roles)
    with obj.gateway() as couch, obj.synchronizer(couch) as sync, _ProgressBar("bootstrapping") as bar:
        report = sync.bootstrap(domain, dry_run=dry_run, progress=bar.update)
    if dry_run:
        for label, count in sorted(report.drift.items()):
            click.echo(f"would write {count} ({label})")
    verb = "would write" if dry_run else "written"
    click.echo(f"{domain}: groups {report.groups}, contacts {report.contacts}, "
               f"{verb} {sum(report.drift.values()) if dry_run else report.written}, "
               f"unchanged {report.unchanged}, refused {len(report.refusals)}")
    for reason in report.refusals:
        click.echo(f"    refused: {reason}")


class _ProgressBar:
    """A progress bar on a terminal (standard error), nothing otherwise; its length comes with the first update."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._bar: Any = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.render_finish()

    def update(self, what: str, count: int) -> None:
        if not sys.stderr.isatty():
            return
        if what == "total":
            self._bar = click.progressbar(length=max(count, 1), label=self._label, file=sys.stderr)
            self._bar.render_progress()
        elif self._bar is not None:
            self._bar.update(count)
