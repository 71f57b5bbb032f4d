"""`couchsync worker`: the broker's consumer wired to the use cases, with the protection guard, the
settling thread and the /metrics, /healthz endpoint beside it, until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import click

from couchsync import __version__, config, design_docs
from couchsync.aftercare import ReconcileOnRestore
from couchsync.breaker import CouchBreaker
from couchsync.broker.consumer import Consumer
from couchsync.broker.handlers import Batching
from couchsync.cli.context import Context
from couchsync.cli.options import (
    amqp_options, amqp_settings, future_skew_option, identity_options, state_horizon_option, sync_identity)
from couchsync.couch import CouchGateway
from couchsync.errors import CouchsyncError
from couchsync.guard import ProtectionGuard
from couchsync.held_queue import Parking
from couchsync.hold import HoldSettings
from couchsync.holding import HoldingHandler
from couchsync.instances import Instance
from couchsync.messages import Messages
from couchsync.metrics import Metrics, serve
from couchsync.reconcile import Reconciler
from couchsync.settle import Settling
from couchsync.sync import Synchronizer
from couchsync.systemd import Notifier

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # seconds for one request of a CouchDB probe while paused


@click.command()
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
    obj.identity = sync_identity(obj, sync_names, sync_roles)
    settings = amqp_settings(ctx, amqp, batch=batch, batch_wait=batch_wait / 1000, pause_probe=pause_probe,
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
