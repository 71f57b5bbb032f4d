"""The `couchsync` command line: builds the settings, wires the objects, maps errors to exit codes."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import click
from click.core import ParameterSource

from couchsync import __version__, config, design_docs, logs
from couchsync.aftercare import ReconcileOnRestore
from couchsync.breaker import CouchBreaker
from couchsync.broker.consumer import Consumer
from couchsync.broker.handlers import Batching
from couchsync.couch import CouchGateway, MangoIndex
from couchsync.dead_letters import list_dead_letters, masked_body, replay_dead_letters
from couchsync.design_docs import DesignDocs, Outcome, findings
from couchsync.errors import ConfigError, CouchsyncError, InvalidEvent, UnknownInstance, UnknownOrganization
from couchsync.events import GroupEvent
from couchsync.guard import ProtectionGuard
from couchsync.held_queue import HeldMessage, Parking, dead_letter, list_held, take_held
from couchsync.hold import HoldSettings
from couchsync.holding import HoldingHandler
from couchsync.instances import Instance, InstanceDirectory
from couchsync.messages import Messages
from couchsync.metrics import Metrics, ReconcileMetrics, serve
from couchsync.reconcile import ERROR, REFUSED, DeletionLimit, InstanceResult, Reconciler
from couchsync.reconcile_all import OrganizationResult, ReconcileRun, RunProgress
from couchsync.settle import Settling
from couchsync.sync import EventReport, Synchronizer
from couchsync.systemd import Notifier

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
PROBE_TIMEOUT = 5.0  # seconds for one request of a CouchDB probe while paused
RELEASE_BATCH = 64  # held messages applied together by `hold release`


@dataclass
class Context:
    """What every command needs, built once from the options."""

    couch: config.CouchSettings
    sync: config.SyncSettings
    design_source: Path | None  # None: the sources shipped in the package
    on_rejected: Callable[[str], None] | None = None  # a skipped instance record (the worker counts them)
    identity: config.SyncIdentity | None = None  # given, a bootstrap installs the protection before it copies
    on_seeded: Callable[[str], None] | None = None  # a state seeded again, with why (the worker counts them)

    def gateway(self) -> CouchGateway:
        return CouchGateway(self.couch)

    def design(self) -> DesignDocs:
        return design_docs.load(self.design_source)

    def directory(self, couch: CouchGateway, indexes: Sequence[MangoIndex] = ()) -> InstanceDirectory:
        return InstanceDirectory(couch, self.sync.global_db, indexes=indexes, page_size=self.sync.page_size,
                                 on_rejected=self.on_rejected)

    def synchronizer(self, couch: CouchGateway, settling: Settling | None = None) -> Synchronizer:
        design = self.design()
        protection = design.protection(self.identity) if self.identity else None
        # Whatever the command, a state database it makes is protected (by --sync-name, else --couch-user).
        identity = self.identity or config.load_identity([self.couch.username or ""])
        return Synchronizer(couch, self.directory(couch, design.global_indexes), design, self.sync, protection,
                            settling, state_target=design.state_target(self.sync.state_db, identity),
                            on_seeded=self.on_seeded)

    def reconciler(self, couch: CouchGateway, sync: Synchronizer) -> Reconciler:
        return Reconciler(couch, sync.directory, sync.states, sync.instances_of, sync.reader, sync.writer,
                          sync.copier, page_size=self.sync.page_size, concurrency=self.sync.concurrency)


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
    _refuse_typed_secrets(ctx, "couch_password", "couch_url", "COUCHSYNC_COUCH_PASSWORD", "--couch-password-file")
    ctx.obj = Context(
        couch=config.load_couch(couch_url, username=couch_user, password=couch_password,
                                # The instance threads, plus the worker's event threads reading the
                                # global database and copying into new instances.
                                password_file=couch_password_file, pool_size=concurrency + config.DEFAULT_PREFETCH),
        sync=config.load_sync(global_db=global_db, state_db=state_db, concurrency=concurrency),
        design_source=design_source)


def _refuse_typed_secrets(ctx: click.Context, password: str, url: str, envvar: str, file_option: str) -> None:
    """Refuse a password typed on the command line (alone or in a URL): it would show in the process list.

    Any credentials in a typed URL are refused, percent-encoded ones (`u%3Apw@`) included.
    """
    typed = ctx.get_parameter_source(password) is ParameterSource.COMMANDLINE
    if typed or (ctx.get_parameter_source(url) is ParameterSource.COMMANDLINE
                 and any(config.has_userinfo(part) for part in config.split_urls(ctx.params[url]))):
        raise ConfigError(f"a password on the command line would show in the process list: "
                          f"use {envvar} or {file_option}")


def future_skew_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """How far ahead of the clock an event may be stamped, shared by `apply` and `worker`."""
    return click.option(
        "--max-future-skew", envvar="COUCHSYNC_MAX_FUTURE_SKEW", metavar="SECONDS|DURATION",
        default=str(int(config.DEFAULT_MAX_FUTURE_SKEW.total_seconds())), show_default=True,
        help="Refuse events stamped further ahead of this machine's clock (seconds, or e.g. 5m, 1h): "
             "a far-future event would win over every later one.")(command)


def state_horizon_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """How long a group's state remembers removals, shared by `apply` and `worker`."""
    return click.option(
        "--state-horizon", envvar="COUCHSYNC_STATE_HORIZON", metavar="SECONDS|DURATION",
        default=f"{config.DEFAULT_STATE_HORIZON.days}d", show_default=True,
        help="A removed member's record is forgotten once this much older than the group's newest event, "
             "and the group's events stamped before that are refused as stale.")(command)


def amqp_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The broker's options, shared by `worker` and `dlq`."""
    options = [
        click.option("--amqp-url", envvar="COUCHSYNC_AMQP_URL", multiple=True, default=[config.DEFAULT_AMQP_URL],
                     show_default=True, help="RabbitMQ URL, without credentials; repeated or comma-separated for "
                     "a cluster's nodes, tried in turn (the variable: separated by commas or spaces)."),
        click.option("--amqp-user", envvar="COUCHSYNC_AMQP_USER", default=config.DEFAULT_AMQP_USER,
                     show_default=True),
        click.option("--amqp-password-file", envvar="COUCHSYNC_AMQP_PASSWORD_FILE", type=click.Path(dir_okay=False),
                     help="File holding the broker password (or set COUCHSYNC_AMQP_PASSWORD)."),
        click.option("--amqp-password", envvar="COUCHSYNC_AMQP_PASSWORD", hidden=True),
        click.option("--exchange", envvar="COUCHSYNC_EXCHANGE", default=config.DEFAULT_EXCHANGE, show_default=True,
                     help="The directory's topic exchange of the b2b group events."),
        click.option("--auth-exchange", envvar="COUCHSYNC_AUTH_EXCHANGE", default=config.DEFAULT_AUTH_EXCHANGE,
                     show_default=True, help="The topic exchange of user.created."),
        click.option("--queue-prefix", envvar="COUCHSYNC_QUEUE_PREFIX", default=config.DEFAULT_QUEUE_PREFIX,
                     show_default=True, help="Prefix of couchsync's own queues and dead-letter exchange."),
        click.option("--prefetch", envvar="COUCHSYNC_PREFETCH", type=int, default=config.DEFAULT_PREFETCH,
                     show_default=True, help="Messages handled at once."),
        click.option("--delivery-limit", envvar="COUCHSYNC_DELIVERY_LIMIT", type=int,
                     default=config.DEFAULT_DELIVERY_LIMIT, show_default=True,
                     help="Attempts before a message is dead-lettered."),
        click.option("--retry-delay", envvar="COUCHSYNC_RETRY_DELAY", type=float, default=config.DEFAULT_RETRY_DELAY,
                     show_default=True, help="Seconds before the first retry, doubling after."),
        click.option("--shutdown-timeout", envvar="COUCHSYNC_SHUTDOWN_TIMEOUT", type=float,
                     default=config.DEFAULT_SHUTDOWN_TIMEOUT, show_default=True,
                     help="Seconds an in-flight event may take to finish on SIGTERM."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _amqp_settings(ctx: click.Context, params: dict[str, Any], **tuning: Any) -> config.AmqpSettings:
    _refuse_typed_secrets(ctx, "amqp_password", "amqp_url", "COUCHSYNC_AMQP_PASSWORD", "--amqp-password-file")
    return config.load_amqp(params["amqp_url"], username=params["amqp_user"], password=params["amqp_password"],
                            password_file=params["amqp_password_file"], exchange=params["exchange"],
                            auth_exchange=params["auth_exchange"],
                            queue_prefix=params["queue_prefix"], prefetch=params["prefetch"],
                            delivery_limit=params["delivery_limit"], retry_delay=params["retry_delay"],
                            shutdown_timeout=params["shutdown_timeout"], **tuning)


def identity_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Who the protection lets write managed documents, shared by `deploy-design-docs`, `worker` (which
    installs and restores it) and `bootstrap-member` (which installs it before copying)."""
    options = [
        click.option("--sync-name", "sync_names", multiple=True, envvar="COUCHSYNC_SYNC_NAMES", metavar="NAME",
                     help="A CouchDB user name of the sync identity (repeatable; default: --couch-user)."),
        click.option("--sync-role", "sync_roles", multiple=True, envvar="COUCHSYNC_SYNC_ROLES", metavar="ROLE",
                     help="A CouchDB role of the sync identity (repeatable; never _admin)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _identity(obj: Context, names: Sequence[str], roles: Sequence[str]) -> config.SyncIdentity:
    return config.load_identity(names or [obj.couch.username or ""], roles)


def read_messages(stream: Iterable[bytes | str]) -> Iterator[tuple[int, str, Any]]:
    """(line number, routing key, body) of each JSON line `{"routingKey": ..., "body": ...}`.

    Each line is decoded on its own, so that a bad byte or a hostile line costs only that line; a
    bad line gives an InvalidEvent in place of its body.
    """
    for number, raw in enumerate(stream, start=1):
        try:
            # utf-8-sig: a byte order mark some editors write is no part of the first line.
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            yield number, "", InvalidEvent(f"line is not UTF-8: byte 0x{exc.object[exc.start]:02x} "
                                           f"at column {exc.start + 1}")
            continue
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        yield _message(number, text)


def _message(number: int, text: str) -> tuple[int, str, Any]:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        return number, "", InvalidEvent(f"line is not JSON: {exc.msg}")
    except RecursionError:
        return number, "", InvalidEvent("line is not JSON: nested too deeply")
    if not isinstance(message, dict):
        return number, "", InvalidEvent("line is not a JSON object")
    routing_key, body = message.get("routingKey") or "", message.get("body")
    if not isinstance(routing_key, str):
        return number, "", InvalidEvent("routingKey is not a string")
    return number, routing_key, body if isinstance(body, (dict, str)) else b""


REPORT_FIELD_LENGTH = 120   # characters of an id or key printed in a report line
REPORT_REASON_LENGTH = 240  # characters of a reason


def shown(text: str, limit: int = REPORT_FIELD_LENGTH) -> str:
    """Text for a report line: cut to `limit` characters, control characters escaped (no forged lines)."""
    cut = text[:limit]
    escaped = "".join(char if char.isprintable() else repr(char)[1:-1] for char in cut)
    return escaped + (f"…({len(text)} characters)" if len(text) > limit else "")


def _not_applied(report: EventReport) -> str:
    """How many events of a batch failed on their own (each gets a line of its own after the batch's)."""
    return f", {len(report.condemned)} events not applied" if report.condemned else ""


def _print_report(lines: str, report: EventReport) -> None:
    status = "FAILED" if report.failures else "ok"
    click.echo(f"{lines}: {shown(report.routing_key)} {shown(report.organization_id)}/{shown(report.subject)}: "
               f"{status}, {len(report.instances)} instances, {report.writes} writes, "
               f"{len(report.refusals)} refusals{_not_applied(report)} ({report.seconds:.2f}s)")
    for domain, reason in report.refusals:
        click.echo(f"    refused in {shown(domain)}: {shown(reason, REPORT_REASON_LENGTH)}")
    for failure in report.failures:
        click.echo(f"    failed in {shown(failure.domain)}: {shown(failure.error or '', REPORT_REASON_LENGTH)}")


@cli.command()
@click.argument("source", type=click.File("rb"), default="-")
@future_skew_option
@state_horizon_option
@click.option("--batch", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="Apply up to N consecutive group events of one organization together, as the worker "
                   "batches them (merged into the state, then one projection per instance).")
@click.pass_obj
def apply(obj: Context, source: IO[bytes], max_future_skew: str, state_horizon: str, batch: int) -> None:
    """Apply events read as JSON lines from SOURCE (a file, or - for standard input).

    Each line is {"routingKey": "b2b.group.created", "body": {...}}. Prints one summary per event (per
    batch with --batch); exits 65 when a line is invalid or an event was refused on its own (stale, its
    group's state too large; every other line is still applied), 1 when an event failed in some
    instance, 0 otherwise.
    """
    obj.sync = config.with_state_horizon(config.with_future_skew(obj.sync, max_future_skew), state_horizon)
    worst = 0
    pending: list[tuple[int, GroupEvent]] = []

    def failed(lines: str, routing_key: str, error: CouchsyncError) -> None:
        nonlocal worst
        click.echo(f"{lines}: {shown(routing_key or '?')}: {type(error).__name__}: "
                   f"{shown(str(error), REPORT_REASON_LENGTH)}")
        worst = max(worst, error.exit_code)

    def run(lines: str, routing_key: str, action: Callable[[], EventReport]) -> EventReport | None:
        nonlocal worst
        try:
            report = action()
        except CouchsyncError as exc:
            failed(lines, routing_key, exc)
            return None
        _print_report(lines, report)
        if report.failures:
            worst = max(worst, EXIT_FAILED)
        return report

    def flush() -> None:
        if pending:
            events = [event for _, event in pending]
            numbers = [number for number, _ in pending]
            lines = str(numbers[0]) if len(pending) == 1 else f"{numbers[0]}-{numbers[-1]}"
            pending.clear()
            report = run(lines, events[0].routing_key, lambda: sync.apply_batch(events))
            for position, error in report.condemned if report else ():  # each event that failed on its own
                failed(str(numbers[position]), events[position].routing_key, error)

    with obj.gateway() as couch, obj.synchronizer(couch) as sync:
        messages = Messages(sync, obj.sync)
        for number, routing_key, body in read_messages(source):
            try:
                if isinstance(body, Exception):
                    raise body
                event = messages.parse(routing_key, body)
            except CouchsyncError as exc:
                failed(str(number), routing_key, exc)
                continue
            if not isinstance(event, GroupEvent) or (pending and pending[0][1].organization_id
                                                     != event.organization_id):
                flush()
            if isinstance(event, GroupEvent):
                pending.append((number, event))
                if len(pending) >= batch:
                    flush()
            else:
                run(str(number), routing_key, functools.partial(sync.apply, event))
        flush()
    sys.exit(worst)


@cli.command()
@amqp_options
@click.option("--metrics-host", envvar="COUCHSYNC_METRICS_HOST", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", envvar="COUCHSYNC_METRICS_PORT", type=int, default=config.DEFAULT_METRICS_PORT,
              show_default=True, help="Port of /metrics and /healthz (0: off).")
@click.option("--notify-socket", envvar="NOTIFY_SOCKET", hidden=True)
@click.option("--watchdog-usec", envvar="WATCHDOG_USEC", hidden=True)
@click.option("--batch", envvar="COUCHSYNC_BATCH", type=click.IntRange(1, 10_000), default=config.DEFAULT_BATCH,
              show_default=True, help="Waiting events of one organization applied together, at most (1: one by one).")
@click.option("--batch-wait", envvar="COUCHSYNC_BATCH_WAIT", type=click.FloatRange(0, 60_000),
              default=config.DEFAULT_BATCH_WAIT * 1000, show_default=True,
              help="Milliseconds the first event of a batch waits for others.")
@click.option("--protection-guard/--no-protection-guard", envvar="COUCHSYNC_PROTECTION_GUARD", default=True,
              show_default=True, help="Install the protection in new contacts and groups databases and put it "
              "back where it is deleted or changed (CouchDB's _db_updates feed, else sweeps).")
@click.option("--protection-sweep", envvar="COUCHSYNC_PROTECTION_SWEEP", type=click.FloatRange(min=1),
              default=3600, show_default=True, help="Seconds between two checks of every instance's protection "
              "(a backstop of the feed; at most 300 on a server without the feed).")
@click.option("--settle-delay", envvar="COUCHSYNC_SETTLE_DELAY", type=click.FloatRange(0, 3600), default=5,
              show_default=True, help="Seconds after which every document written is read again with its "
              "conflicts, which a CouchDB cluster may have let concurrent writers make (0: never; a single "
              "node makes none).")
@click.option("--protection-feed-retry", envvar="COUCHSYNC_PROTECTION_FEED_RETRY", type=click.FloatRange(min=0.1),
              default=config.DEFAULT_FEED_RETRY, show_default=True, help="Seconds between two tries to follow "
              "the _db_updates feed while CouchDB does not serve it (unreachable when the worker started).")
@click.option("--pause-probe", envvar="COUCHSYNC_PAUSE_PROBE", type=click.FloatRange(min=0.1),
              default=config.DEFAULT_PAUSE_PROBE, show_default=True, help="Seconds between two probes of "
              "CouchDB while the worker is paused (CouchDB down, or refusing the sync identity).")
@click.option("--hold-window", envvar="COUCHSYNC_HOLD_WINDOW", type=click.FloatRange(min=1), default=900,
              show_default=True, help="Seconds over which the mass-removal hold counts an organization's removals.")
@click.option("--hold-percent", envvar="COUCHSYNC_HOLD_PERCENT", type=click.FloatRange(0, 100), default=10,
              show_default=True, help="Removals past this share of an organization's memberships are held "
              "(100: never).")
@click.option("--hold-minimum", envvar="COUCHSYNC_HOLD_MINIMUM", type=click.IntRange(min=1), default=50,
              show_default=True, help="...and past this many memberships.")
@click.option("--partitions", envvar="COUCHSYNC_PARTITIONS", type=click.IntRange(1, 256),
              default=config.DEFAULT_PARTITIONS, show_default=True, help="Partition queues an organization's "
              "messages are hashed to, one active worker each: the same on every worker of a deployment.")
@identity_options
@future_skew_option
@state_horizon_option
@click.pass_context
def worker(ctx: click.Context, /, metrics_host: str, metrics_port: int, notify_socket: str | None,
           watchdog_usec: str | None, batch: int, batch_wait: float, protection_guard: bool, protection_sweep: float,
           settle_delay: float, protection_feed_retry: float, pause_probe: float, partitions: int,
           sync_names: tuple[str, ...], sync_roles: tuple[str, ...], max_future_skew: str, state_horizon: str,
           hold_window: float, hold_percent: float, hold_minimum: int, **amqp: Any) -> None:
    """Consume the directory's b2b group events from RabbitMQ and apply each to its organization.

    Runs until SIGTERM or SIGINT, then finishes or hands back the in-flight events and exits 0.
    Exits 78 on a configuration error (wrong broker credentials, queues declared with other arguments).
    Pauses while CouchDB is down or refuses the sync identity (see the README, "Failures").
    """
    obj: Context = ctx.obj
    logger.info("couchsync %s, design documents from the %s", __version__, design_docs.describe(obj.design_source))
    obj.sync = config.with_state_horizon(config.with_future_skew(obj.sync, max_future_skew), state_horizon)
    obj.identity = _identity(obj, sync_names, sync_roles)
    settings = _amqp_settings(ctx, amqp, batch=batch, batch_wait=batch_wait / 1000, pause_probe=pause_probe,
                              partitions=partitions)
    process = config.load_worker(metrics_host=metrics_host, metrics_port=metrics_port,
                                 notify_socket=notify_socket, watchdog_usec=watchdog_usec)
    metrics = Metrics()
    obj.on_rejected = metrics.instance_record_rejected
    obj.on_seeded = metrics.count_state_seeded
    couch = obj.gateway()
    sync = obj.synchronizer(couch, Settling(settle_delay, metrics.conflicts_merged.inc))
    messages = Messages(sync, obj.sync, metrics.future_stamped.inc)
    metrics.settling_pending.set_function(sync.settling.pending)
    aftercare = ReconcileOnRestore(sync.directory, _instance_reconciler(obj.reconciler(couch, sync)))
    guard = ProtectionGuard(couch, sync.directory, obj.design(), obj.identity, obj.sync.state_db, metrics,
                            concurrency=obj.sync.concurrency, sweep_interval=protection_sweep,
                            feed_retry=protection_feed_retry, on_restored=aftercare)
    probe = _probe_gateway(obj.couch)
    breaker = CouchBreaker(probe, obj.sync.state_db, obj.couch.username, password_file=obj.couch.password_file,
                           also_update=[couch])
    parking = Parking(settings)
    metrics.held_messages.set_function(parking.depth)
    holding = HoldingHandler(sync, messages.handle_batch, parking,
                             HoldSettings(hold_window, hold_percent, hold_minimum), obj.sync.not_after,
                             on_held=metrics.held.inc)
    consumer = Consumer(settings, holding.handle, metrics, Notifier(process.notify_socket, process.watchdog_seconds),
                        batching=Batching(messages.batch_key, holding.handle_batch), health=breaker.check,
                        route=sync.partition_key)
    server = serve(metrics, process.metrics_host, process.metrics_port,
                   consumer.problem) if process.metrics_port else None
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: consumer.stop())  # the guard is stopped below, not in a handler
    if protection_guard:
        # A daemon thread: a poll of the feed in progress must not hold up the shutdown.
        threading.Thread(target=guard.run, name="couchsync-guard", daemon=True).start()
    settled = threading.Event()
    if settle_delay:
        threading.Thread(target=_settle, args=(sync, settled), name="couchsync-settle", daemon=True).start()
    try:
        consumer.run()
    finally:
        settled.set()
        guard.stop()
        aftercare.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    if not consumer.drained:
        # An event outlived the shutdown timeout; its message is back in the queue. Its threads hold
        # CouchDB writes that are safe to cut (idempotent): exit now rather than wait for them.
        logging.shutdown()
        os._exit(0)
    _settle_last(sync, settings.shutdown_timeout)
    sync.close()
    couch.close()
    probe.close()


def _probe_gateway(settings: config.CouchSettings) -> CouchGateway:
    """A gateway for the breaker's probes: quick to give up (no quick retries, a short timeout), so that a
    probe of a server that hangs ends well within the broker's heartbeat."""
    return CouchGateway(replace(settings, timeout=PROBE_TIMEOUT, http_retries=0, pool_size=2))


def _instance_reconciler(reconciler: Reconciler) -> Callable[[Instance], str]:
    """One instance reconciled (the guard's aftercare), its outcome as a log's words."""
    def reconcile(instance: Instance) -> str:
        result = reconciler.reconcile(instance.org_id or "", domain=instance.domain)[0]
        return f"{result.status}, {len(result.items)} drift" + (f" ({result.reason})" if result.reason else "")
    return reconcile


def _settle(sync: Synchronizer, stop: threading.Event) -> None:
    """The worker's settling thread: read again, every second or so, what was written `delay` ago."""
    while not stop.wait(min(1.0, sync.settling.delay / 2)):
        try:
            sync.settle()
        except Exception:  # noqa: BLE001 (a bug here must not end the checks; each is logged)
            logger.exception("reading written documents again failed")


def _settle_last(sync: Synchronizer, timeout: float) -> None:
    """At shutdown, once the last writes are due, read them again (at most `timeout` seconds' wait): a
    conflict they made would otherwise wait for the next event or reconcile that touches them."""
    wait = sync.settling.waiting()
    if wait > timeout:
        logger.warning("not reading the last writes again: they are due in %.1fs, after the shutdown timeout", wait)
        return
    time.sleep(wait)
    try:
        sync.settle(everything=True)
    except CouchsyncError as exc:
        logger.warning("reading the last writes again failed: %s", exc)
    if sync.settling.pending():
        logger.warning("%d checks or repairs failed at shutdown: left to the next event or reconcile",
                       sync.settling.pending())


@cli.group()
def hold() -> None:
    """Removals the mass-removal hold parked: list, release (apply) or drop (dead-letter) them."""


@hold.command("list")
@amqp_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per organization.")
@click.pass_context
def hold_list(ctx: click.Context, /, as_json: bool, **amqp: Any) -> None:
    """What waits, by organization: messages, memberships they would take away, the oldest, why."""
    by_org: dict[str, list[HeldMessage]] = {}
    for message in list_held(_amqp_settings(ctx, amqp)):
        by_org.setdefault(message.organization, []).append(message)
    for organization, messages in sorted(by_org.items()):
        record = {"organization": organization, "messages": len(messages),
                  "memberships": sum(message.taken for message in messages),
                  "oldest": min(message.held_at for message in messages), "reason": messages[0].reason}
        click.echo(json.dumps(record, ensure_ascii=False) if as_json else
                   f"{organization}: {record['messages']} messages, {record['memberships']} memberships, "
                   f"oldest held at {record['oldest']}: {record['reason']}")


@hold.command("release")
@amqp_options
@click.argument("organization")
@click.pass_context
def hold_release(ctx: click.Context, /, organization: str, **amqp: Any) -> None:
    """Apply the ORGANIZATION's held removals now: the result is the one of applying them in time (stamps
    decide). They leave the hold queue once applied everywhere; a failure leaves them all held (exit 1)."""
    obj: Context = ctx.obj

    def apply(_: Any, messages: list[HeldMessage]) -> None:
        with obj.synchronizer(obj.gateway()) as sync:
            handler = Messages(sync, obj.sync)
            for start in range(0, len(messages), RELEASE_BATCH):
                chunk = messages[start:start + RELEASE_BATCH]
                for outcome in handler.handle_batch([(message.routing_key, message.body) for message in chunk]):
                    if isinstance(outcome, Exception):
                        raise outcome
    released = take_held(_amqp_settings(ctx, amqp), organization, apply)
    click.echo(f"{organization}: released {len(released)} messages, "
               f"{sum(message.taken for message in released)} memberships")


@hold.command("drop")
@amqp_options
@click.argument("organization")
@click.option("--reason", required=True, help="Why: recorded with each message in the dead-letter queue.")
@click.pass_context
def hold_drop(ctx: click.Context, /, organization: str, reason: str, **amqp: Any) -> None:
    """Dead-letter the ORGANIZATION's held removals with your reason (`dlq replay` can still apply them)."""
    settings = _amqp_settings(ctx, amqp)
    dropped = take_held(settings, organization, dead_letter(settings, reason))
    click.echo(f"{organization}: dropped {len(dropped)} messages to the dead-letter queue")


@cli.group()
def dlq() -> None:
    """Inspect and replay the dead-lettered messages."""


@dlq.command("list")
@amqp_options
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.option("--show-body", is_flag=True, help="Include the bodies (secret fields of user.created masked).")
@click.pass_context
def dlq_list(ctx: click.Context, /, limit: int, as_json: bool, show_body: bool, **amqp: Any) -> None:
    """List dead letters with their reasons; the queue is left as it was."""
    for message in list_dead_letters(_amqp_settings(ctx, amqp), limit):
        record: dict[str, Any] = {"id": message.id, "routing_key": message.routing_key, "attempts": message.attempts,
                                  "dead_lettered_at": message.dead_at, "reason": message.reason}
        if show_body:
            record["body"] = masked_body(message.body)
        if as_json:
            click.echo(json.dumps(record, ensure_ascii=False))
        else:
            click.echo(f"{message.id}  {message.routing_key}  attempts={message.attempts}  {message.reason}"
                       + (f"\n    {record['body']}" if show_body else ""))


@dlq.command("replay")
@amqp_options
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.pass_context
def dlq_replay(ctx: click.Context, /, ids: tuple[str, ...], replay_all: bool, **amqp: Any) -> None:
    """Send the dead letters with these IDS (from `dlq list`), or --all, back to the main queue."""
    if bool(ids) == replay_all:
        raise click.UsageError("name the messages to replay, or give --all")
    replayed = replay_dead_letters(_amqp_settings(ctx, amqp), None if replay_all else set(ids))
    for message in replayed:
        click.echo(f"replayed {message.id}  {message.routing_key}")
    missing = set(ids) - {message.id for message in replayed}
    for message_id in sorted(missing):
        click.echo(f"not found {message_id}")
    sys.exit(EXIT_FAILED if missing else 0)


@cli.command("deploy-design-docs")
@click.option("--org", "org_id", metavar="ID", help="Only the instances of this organization.")
@click.option("--instance", "domain", metavar="DOMAIN", help="Only this instance.")
@click.option("--dry-run", is_flag=True, help="Print what would change and write nothing.")
@click.option("--create-missing", is_flag=True,
              help="Create contacts and groups databases that do not exist yet (needs server admin rights).")
@click.option("--check", is_flag=True, help="List the databases whose design documents are missing or differ "
              "from what would be deployed, and write nothing; exit 1 when there is any.")
@click.option("--json", "as_json", is_flag=True, help="With --check: one JSON document for machines.")
@identity_options
@click.pass_obj
def deploy_design_docs(obj: Context, org_id: str | None, domain: str | None, dry_run: bool,
                       create_missing: bool, check: bool, as_json: bool, sync_names: tuple[str, ...],
                       sync_roles: tuple[str, ...]) -> None:
    """Install the protection and lookup design documents in every instance, and the global indexes.

    Every instance's io.cozy.contacts and io.cozy.contacts.groups databases get the validate_doc_update
    that lets only the sync identity write managed documents; the global database gets the by-orgid
    and by-orgdomain indexes. Unchanged design documents are left alone. Exits 1 when any database failed.
    """
    if org_id and domain:
        raise click.UsageError("--org and --instance exclude each other")
    if as_json and not check:
        raise click.UsageError("--json goes with --check")
    identity = _identity(obj, sync_names, sync_roles)
    if check:
        _check_design_docs(obj, identity, org_id, domain, as_json)
    design = obj.design()
    protection = design.protection(identity)
    with obj.gateway() as couch:
        # The global database first: its indexes serve the instance lookups that follow.
        outcomes = [design_docs.deploy(couch, design.global_target(obj.sync.global_db), dry_run=dry_run,
                                       create_missing=create_missing),
                    # couchsync's own database is made here whatever --create-missing says.
                    design_docs.deploy(couch, design.state_target(obj.sync.state_db, identity), dry_run=dry_run,
                                       create_missing=True)]
        # No index creation here: in a dry run it would be a write.
        instances = _chosen_instances(obj.directory(couch), org_id, domain)
        targets = [target for instance in instances for target in design.instance_targets(instance.prefix, protection)]
        with click.progressbar(length=len(targets), label="deploying", file=sys.stderr,
                               hidden=not sys.stderr.isatty()) as bar:
            for outcome in design_docs.deploy_all(couch, targets, concurrency=obj.sync.concurrency,
                                                  dry_run=dry_run, create_missing=create_missing):
                outcomes.append(outcome)
                bar.update(1)
    _print_deployment(outcomes, dry_run)
    sys.exit(EXIT_FAILED if any(outcome.error for outcome in outcomes) else 0)


def _check_design_docs(obj: Context, identity: config.SyncIdentity, org_id: str | None, domain: str | None,
                       as_json: bool) -> None:
    """`deploy-design-docs --check`: a dry run that lists only what is wrong, and exits 1 when anything is."""
    design = obj.design()
    protection = design.protection(identity)
    with obj.gateway() as couch:
        targets = [design.state_target(obj.sync.state_db, identity)]
        targets += [target for instance in _chosen_instances(obj.directory(couch), org_id, domain)
                    for target in design.instance_targets(instance.prefix, protection)]
        outcomes = list(design_docs.deploy_all(couch, targets, concurrency=obj.sync.concurrency, dry_run=True))
    broken = [(outcome.db, findings(outcome)) for outcome in outcomes if findings(outcome)]
    failed = [outcome for outcome in outcomes if outcome.error]
    missing = sum(1 for outcome in outcomes if outcome.missing)
    if as_json:
        click.echo(json.dumps({"checked": len(outcomes), "missing_databases": missing,
                               "broken": [{"db": db, "design_docs": dict(found)} for db, found in broken],
                               "failed": [{"db": outcome.db, "error": outcome.error} for outcome in failed]},
                              indent=2))
    else:
        for db, found in broken:
            click.echo(f"{db}: " + ", ".join(f"{ddoc} {state}" for ddoc, state in found))
        for outcome in failed:
            click.echo(f"failed {outcome.db}: {outcome.error}")
        click.echo(f"checked {len(outcomes)} databases: {len(broken)} with design documents missing or different, "
                   f"{missing} not created yet, {len(failed)} failed")
    sys.exit(EXIT_FAILED if broken or failed else 0)


def _chosen_instances(directory: InstanceDirectory, org_id: str | None, domain: str | None) -> list[Instance]:
    if domain:
        instance = directory.instance(domain)
        if instance is None:
            raise UnknownInstance(f"no usable instance has the domain {domain!r}")
        return [instance]
    if org_id:
        instances = directory.instances_of(org_id, one_reference=False)  # the protection goes to each
        if not instances:
            raise UnknownOrganization(f"organization {org_id!r} has no instance")
        return instances
    return list(directory.every_instance())


_VERBS = {"installed": "install", "updated": "update"}


def _print_deployment(outcomes: Iterable[Outcome], dry_run: bool) -> None:
    counts = {"installed": 0, "updated": 0, "unchanged": 0}
    missing, failed, created = [], [], 0
    for outcome in outcomes:
        created += outcome.created
        if dry_run and outcome.created:
            click.echo(f"would create {outcome.db}")
        for ddoc, status in outcome.results:
            counts[status] += 1
            if dry_run and status != "unchanged":
                click.echo(f"would {_VERBS[status]} {ddoc} in {outcome.db}")
        if outcome.missing:
            missing.append(outcome.db)
        if outcome.error:
            failed.append(outcome)
    for db in missing:
        click.echo(f"missing {db} (not created: --create-missing creates it)")
    for outcome in failed:
        click.echo(f"failed {outcome.db}: {outcome.error}")
    verb = "would be " if dry_run else ""
    click.echo(f"design documents {verb}installed: {counts['installed']}, {verb}updated: {counts['updated']}, "
               f"unchanged: {counts['unchanged']}; databases {verb}created: {created}, missing: {len(missing)}, "
               f"failed: {len(failed)}")


@cli.command("bootstrap-member")
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
    obj.identity = _identity(obj, sync_names, sync_roles)
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


@cli.command()
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
