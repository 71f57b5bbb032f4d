"""`couchsync hold`: the removals the mass-removal hold parked, listed, released (applied) or dropped
(dead-lettered)."""

from __future__ import annotations

import json
from typing import Any

import click

from couchsync.cli.context import Context
from couchsync.cli.options import amqp_options, amqp_settings
from couchsync.held_queue import HeldMessage, dead_letter, list_held, take_held
from couchsync.messages import Messages

RELEASE_BATCH = 64  # held messages applied together by `hold release`


@click.group()
def hold() -> None:
    """Removals the mass-removal hold parked: list, release (apply) or drop (dead-letter) them."""


@hold.command("list")
@amqp_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per organization.")
@click.pass_context
def hold_list(ctx: click.Context, /, as_json: bool, **amqp: Any) -> None:
    """What waits, by organization: messages, memberships they would take away, the oldest, why."""
    by_org: dict[str, list[HeldMessage]] = {}
    for message in list_held(amqp_settings(ctx, amqp)):
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
    released = take_held(amqp_settings(ctx, amqp), organization, apply)
    click.echo(f"{organization}: released {len(released)} messages, "
               f"{sum(message.taken for message in released)} memberships")


@hold.command("drop")
@amqp_options
@click.argument("organization")
@click.option("--reason", required=True, help="Why: recorded with each message in the dead-letter queue.")
@click.pass_context
def hold_drop(ctx: click.Context, /, organization: str, reason: str, **amqp: Any) -> None:
    """Dead-letter the ORGANIZATION's held removals with your reason (`dlq replay` can still apply them)."""
    settings = amqp_settings(ctx, amqp)
    dropped = take_held(settings, organization, dead_letter(settings, reason))
    click.echo(f"{organization}: dropped {len(dropped)} messages to the dead-letter queue")
