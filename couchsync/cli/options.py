"""The options several commands share (the broker, the sync identity, the clock), read into settings; a
password typed on the command line is refused."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click
from click.core import ParameterSource

from couchsync import config
from couchsync.cli.context import Context
from couchsync.errors import ConfigError


def refuse_typed_secrets(ctx: click.Context, password: str, url: str, envvar: str, file_option: str) -> None:
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


def amqp_settings(ctx: click.Context, params: dict[str, Any], **tuning: Any) -> config.AmqpSettings:
    refuse_typed_secrets(ctx, "amqp_password", "amqp_url", "COUCHSYNC_AMQP_PASSWORD", "--amqp-password-file")
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


def sync_identity(obj: Context, names: Sequence[str], roles: Sequence[str]) -> config.SyncIdentity:
    return config.load_identity(names or [obj.couch.username or ""], roles)
