"""`couchsync dlq`: the dead-lettered messages listed with their reasons (bodies masked), and replayed."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from couchsync.cli.options import amqp_options, amqp_settings
from couchsync.cli.output import EXIT_FAILED
from couchsync.dead_letters import list_dead_letters, masked_body, replay_dead_letters


@click.group()
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
    for message in list_dead_letters(amqp_settings(ctx, amqp), limit):
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
    replayed = replay_dead_letters(amqp_settings(ctx, amqp), None if replay_all else set(ids))
    for message in replayed:
        click.echo(f"replayed {message.id}  {message.routing_key}")
    missing = set(ids) - {message.id for message in replayed}
    for message_id in sorted(missing):
        click.echo(f"not found {message_id}")
    sys.exit(EXIT_FAILED if missing else 0)
