"""The `couchsync` command line: builds the settings, wires the objects, maps errors to exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click
from click.core import ParameterSource

from couchsync import __version__, config, design_docs, logs
from couchsync.couch import CouchGateway
from couchsync.errors import ConfigError, CouchsyncError, InvalidEvent
from couchsync.events import parse_event
from couchsync.instances import InstanceDirectory
from couchsync.sync import EventReport, Synchronizer

EXIT_FAILED = 1


@dataclass
class Context:
    """What every command needs, built once from the options."""

    couch: config.CouchSettings
    sync: config.SyncSettings
    design_source: Path

    def gateway(self) -> CouchGateway:
        return CouchGateway(self.couch)

    def synchronizer(self, couch: CouchGateway) -> Synchronizer:
        directory = InstanceDirectory(couch, self.sync.global_db, page_size=self.sync.page_size)
        return Synchronizer(couch, directory, design_docs.load(self.design_source), self.sync)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="couchsync")
@click.option("--couch-url", envvar="COUCHSYNC_COUCH_URL", default=config.DEFAULT_COUCH_URL,
              show_default=True, help="CouchDB URL, without credentials.")
@click.option("--couch-user", envvar="COUCHSYNC_COUCH_USER", default=config.DEFAULT_COUCH_USER,
              show_default=True, help="The sync identity: a dedicated CouchDB server admin.")
@click.option("--couch-password-file", envvar="COUCHSYNC_COUCH_PASSWORD_FILE",
              type=click.Path(dir_okay=False), help="File holding the password "
              "(or set COUCHSYNC_COUCH_PASSWORD).")
@click.option("--couch-password", envvar="COUCHSYNC_COUCH_PASSWORD", hidden=True,
              help="Only from the environment: a password on the command line is refused.")
@click.option("--global-db", envvar="COUCHSYNC_GLOBAL_DB", default=config.DEFAULT_GLOBAL_DB, show_default=True)
@click.option("--concurrency", envvar="COUCHSYNC_CONCURRENCY", type=int, default=config.DEFAULT_CONCURRENCY,
              show_default=True, help="Instances written at once.")
@click.option("--design-docs", "design_source", envvar="COUCHSYNC_DESIGN_DOCS",
              type=click.Path(file_okay=False, path_type=Path), default=design_docs.DEFAULT_SOURCE,
              show_default=True, help="Folder of the design document sources.")
@click.option("--log-level", envvar="COUCHSYNC_LOG_LEVEL", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def cli(ctx: click.Context, couch_url: str, couch_user: str, couch_password_file: str | None,
        couch_password: str | None, global_db: str, concurrency: int, design_source: Path, log_level: str) -> None:
    """Keep an organization's directory in every instance of the organization."""
    logs.setup(log_level)
    typed = ctx.get_parameter_source("couch_password") is ParameterSource.COMMANDLINE
    if typed or (ctx.get_parameter_source("couch_url") is ParameterSource.COMMANDLINE
                 and config.has_password(couch_url)):
        raise ConfigError("a password on the command line would show in the process list: "
                          "use COUCHSYNC_COUCH_PASSWORD or --couch-password-file")
    ctx.obj = Context(
        couch=config.load_couch(couch_url, username=couch_user, password=couch_password,
                                password_file=couch_password_file, pool_size=concurrency),
        sync=config.load_sync(global_db=global_db, concurrency=concurrency),
        design_source=design_source)


def read_messages(stream: IO[str]) -> Iterator[tuple[int, str, Any]]:
    """(line number, routing key, body) of each JSON line `{"routingKey": ..., "body": ...}`."""
    for number, line in enumerate(stream, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, "", InvalidEvent(f"line is not JSON: {exc.msg}")
            continue
        if not isinstance(message, dict):
            yield number, "", InvalidEvent("line is not a JSON object")
            continue
        body = message.get("body")
        yield number, str(message.get("routingKey") or ""), body if isinstance(body, (dict, str)) else b""


def _print_report(number: int, report: EventReport) -> None:
    status = "FAILED" if report.failures else "ok"
    click.echo(f"{number}: {report.routing_key} {report.organization_id}/{report.subject}: {status}, "
               f"{len(report.instances)} instances, {report.writes} writes, "
               f"{len(report.refusals)} refusals ({report.seconds:.2f}s)")
    for domain, reason in report.refusals:
        click.echo(f"    refused in {domain}: {reason}")
    for failure in report.failures:
        click.echo(f"    failed in {failure.domain}: {failure.error}")


@cli.command()
@click.argument("source", type=click.File("r", encoding="utf-8"), default="-")
@click.pass_obj
def apply(obj: Context, source: IO[str]) -> None:
    """Apply events read as JSON lines from SOURCE (a file, or - for standard input).

    Each line is {"routingKey": "b2b.group.created", "body": {...}}. Prints one summary per event;
    exits 65 when a line is invalid, 1 when an event failed in some instance, 0 otherwise.
    """
    worst = 0
    with obj.gateway() as couch, obj.synchronizer(couch) as sync:
        for number, routing_key, body in read_messages(source):
            try:
                if isinstance(body, Exception):
                    raise body
                report = sync.apply(parse_event(routing_key, body))
            except CouchsyncError as exc:
                click.echo(f"{number}: {routing_key or '?'}: {type(exc).__name__}: {exc}")
                worst = max(worst, exc.exit_code)
                continue
            _print_report(number, report)
            if report.failures:
                worst = max(worst, EXIT_FAILED)
    sys.exit(worst)


def main() -> None:
    """Entry point: run the CLI, turning couchsync's errors into messages and exit codes."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CouchsyncError as exc:
        click.echo(f"couchsync: {exc}", err=True)
        sys.exit(exc.exit_code)
