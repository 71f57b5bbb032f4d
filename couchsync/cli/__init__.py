"""The `couchsync` command line: builds the settings, wires the objects, maps errors to exit codes.

The group, its global options and `main` are here; each family of commands has a module of its own:

    context.py    Context: what every command needs, built once from the global options; the wiring
    options.py    the options several commands share (broker, sync identity, clock), read into settings
    output.py     report lines (cut, escaped) and the exit code of a partial failure
    apply.py      apply: events read as JSON lines
    worker.py     worker: the broker's consumer, the protection guard, the settling thread, /metrics
    hold.py       hold list | release | drop
    dlq.py        dlq list | replay
    deploy.py     deploy-design-docs
    bootstrap.py  bootstrap-member
    reconcile.py  reconcile (--org, or --all)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from couchsync import __version__, config, logs
from couchsync.cli import apply, bootstrap, deploy, dlq, hold, reconcile, worker
from couchsync.cli.context import Context
from couchsync.cli.options import refuse_typed_secrets
from couchsync.errors import CouchsyncError


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
@click.option("--state-db", envvar="COUCHSYNC_STATE_DB", default=config.DEFAULT_STATE_DB, show_default=True,
              help="couchsync's own database: the directory state, one per cluster.")
@click.option("--concurrency", envvar="COUCHSYNC_CONCURRENCY", type=int, default=config.DEFAULT_CONCURRENCY,
              show_default=True, help="Instances written at once.")
@click.option("--design-docs", "design_source", envvar="COUCHSYNC_DESIGN_DOCS",
              type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of design document sources to use instead of the packaged ones.")
@click.option("--log-level", envvar="COUCHSYNC_LOG_LEVEL", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", envvar="COUCHSYNC_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="json: one JSON object per line (journald, log pipelines).")
@click.pass_context
def cli(ctx: click.Context, couch_url: str, couch_user: str, couch_password_file: str | None,
        couch_password: str | None, global_db: str, state_db: str, concurrency: int, design_source: Path | None,
        log_level: str, log_format: str) -> None:
    """Keep an organization's directory in every instance of the organization."""
    logs.setup(log_level, log_format)
    refuse_typed_secrets(ctx, "couch_password", "couch_url", "COUCHSYNC_COUCH_PASSWORD", "--couch-password-file")
    ctx.obj = Context(
        couch=config.load_couch(couch_url, username=couch_user, password=couch_password,
                                # The instance threads, plus the worker's event threads reading the
                                # global database and copying into new instances.
                                password_file=couch_password_file, pool_size=concurrency + config.DEFAULT_PREFETCH),
        sync=config.load_sync(global_db=global_db, state_db=state_db, concurrency=concurrency),
        design_source=design_source)


for command in (apply.apply, worker.worker, hold.hold, dlq.dlq, deploy.deploy_design_docs,
                bootstrap.bootstrap_member, reconcile.reconcile):
    cli.add_command(command)


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
