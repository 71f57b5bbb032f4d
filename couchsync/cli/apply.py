"""`couchsync apply`: events read as JSON lines (a file, or standard input), applied one by one or in
batches, a report line each."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import click

from couchsync import config
from couchsync.cli.context import Context
from couchsync.cli.options import future_skew_option, state_horizon_option
from couchsync.cli.output import EXIT_FAILED, REPORT_REASON_LENGTH, shown
from couchsync.errors import CouchsyncError, InvalidEvent
from couchsync.events import GroupEvent
from couchsync.messages import Messages
from couchsync.sync import EventReport


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


@click.command()
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
