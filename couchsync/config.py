"""Frozen settings built from the command line's values; secrets are kept apart and never shown.

Credentials come from the environment or from files, never from a URL typed on a command line:
`load_couch` splits any user:password out of the URL, and `redact` is how every URL is shown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from couchsync.errors import ConfigError

DEFAULT_COUCH_URL = "http://127.0.0.1:5984"
DEFAULT_COUCH_USER = "couchsync"
DEFAULT_GLOBAL_DB = "global/instances"
DEFAULT_STATE_DB = "couchsync/directory"  # one per cluster: the directory state (see couchsync.state)
DEFAULT_CONCURRENCY = 16      # instances written at once for one event
DEFAULT_PAGE_SIZE = 1000      # the stack pages its organization lists by 1,000
DEFAULT_TIMEOUT = 30.0        # seconds for one CouchDB request
DEFAULT_HTTP_RETRIES = 3      # quick retries of one request on connection errors, 429 and 5xx
DEFAULT_MAX_ATTEMPTS = 5      # read → plan → write rounds per instance before a 409 is given up
DEFAULT_AMQP_URL = "amqp://127.0.0.1:5672/%2F"
MAX_AMQP_URLS = 32  # a cluster's nodes: more is a mistake in the configuration
DEFAULT_AMQP_USER = "guest"   # RabbitMQ's own default account, which it accepts from localhost only
DEFAULT_EXCHANGE = "b2b"
DEFAULT_AUTH_EXCHANGE = "auth"  # where the directory announces new users (user.created)
DEFAULT_QUEUE_PREFIX = "couchsync."
DEFAULT_PREFETCH = 8          # the stack's
DEFAULT_BATCH = 256           # events of one organization applied together at most
DEFAULT_BATCH_WAIT = 0.2      # seconds the first event of a batch waits for others
DEFAULT_DELIVERY_LIMIT = 5    # the stack's: attempts before a message is dead-lettered
DEFAULT_RETRY_DELAY = 2.0     # seconds before the first retry, doubling after
DEFAULT_RETRY_DELAY_MAX = 300.0
DEFAULT_SHUTDOWN_TIMEOUT = 20.0  # seconds an in-flight event may take to finish on SIGTERM
DEFAULT_METRICS_PORT = 9464   # 0 turns the metrics and health endpoint off
DEFAULT_PAUSE_PROBE = 5.0     # seconds between two probes of CouchDB while the worker is paused
# Partition queues (one active worker each): a few per worker a deployment may run, and the same on every
# worker (see couchsync.partitions).
DEFAULT_PARTITIONS = 16
DEFAULT_FEED_RETRY = 30.0     # seconds between two tries to follow _db_updates, for the protection guard
# How far ahead of our clock an event's timestamp may be: a far-future event would win over every
# later one until its time comes (a clock 20 h ahead froze a group). The publishers run NTP.
DEFAULT_MAX_FUTURE_SKEW = timedelta(minutes=5)
# Further ahead than this, an accepted event is still logged and counted: a clock going astray.
FUTURE_STAMP_WARNING = timedelta(seconds=5)
# How long a group's state remembers a member's removal, back from the group's newest event; its
# events stamped before that are refused as stale (see couchsync.state.admit).
DEFAULT_STATE_HORIZON = timedelta(days=90)


@dataclass(frozen=True, slots=True)
class Secret:
    """A password or token: its repr never shows the value."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('[secure]')"


@dataclass(frozen=True, slots=True)
class CouchSettings:
    """Where CouchDB is and who couchsync is there (the sync identity)."""

    url: str
    username: str | None = None
    password: Secret | None = None
    timeout: float = DEFAULT_TIMEOUT
    pool_size: int = DEFAULT_CONCURRENCY
    http_retries: int = DEFAULT_HTTP_RETRIES
    http_backoff: float = 0.2  # seconds before the first quick retry, doubling after
    password_file: str | None = None  # where the password came from: read again while paused for it


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """How the engine fans out and pages."""

    global_db: str = DEFAULT_GLOBAL_DB
    state_db: str = DEFAULT_STATE_DB
    concurrency: int = DEFAULT_CONCURRENCY
    page_size: int = DEFAULT_PAGE_SIZE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW
    state_horizon: timedelta = DEFAULT_STATE_HORIZON

    def not_after(self, now: datetime | None = None) -> datetime:
        """The latest event timestamp accepted at `now` (the clock's): it plus the allowed future skew."""
        now = now or datetime.now(timezone.utc)
        latest = datetime.max.replace(tzinfo=timezone.utc)
        return latest if self.max_future_skew >= latest - now else now + self.max_future_skew


@dataclass(frozen=True, slots=True)
class SyncIdentity:
    """Who the protection lets write managed documents: CouchDB user names and/or roles."""

    names: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


def load_identity(names: Iterable[str], roles: Iterable[str] = ()) -> SyncIdentity:
    """A SyncIdentity, checked: at least one name or role, and never a role every admin has.

    Raises:
        ConfigError: empty, or `_admin` given as a role.
    """
    identity = SyncIdentity(tuple(sorted({n.strip() for n in names if n.strip()})),
                            tuple(sorted({r.strip() for r in roles if r.strip()})))
    if not identity.names and not identity.roles:
        raise ConfigError("the sync identity needs at least one user name or role")
    if "_admin" in identity.roles:
        # Every server admin has it, the stack's own included: it would single nobody out.
        raise ConfigError("_admin cannot be a sync identity role: every server admin has it")
    return identity


@dataclass(frozen=True, slots=True)
class AmqpSettings:
    """Where the broker is, the queues couchsync owns there, and how it retries.

    `urls`: the addresses of the broker's nodes (without credentials), tried in turn; a cluster's nodes
    all serve the same quorum queues.
    """

    urls: tuple[str, ...]
    username: str
    password: Secret
    exchange: str = DEFAULT_EXCHANGE
    auth_exchange: str = DEFAULT_AUTH_EXCHANGE
    queue_prefix: str = DEFAULT_QUEUE_PREFIX
    prefetch: int = DEFAULT_PREFETCH
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    retry_delay: float = DEFAULT_RETRY_DELAY
    retry_delay_max: float = DEFAULT_RETRY_DELAY_MAX
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    heartbeat: int = 30
    batch: int = 1  # the worker's option defaults to DEFAULT_BATCH; 1 applies each message alone
    batch_wait: float = DEFAULT_BATCH_WAIT
    pause_probe: float = DEFAULT_PAUSE_PROBE
    partitions: int = DEFAULT_PARTITIONS

    @property
    def url(self) -> str:
        """The first address, the one tried first."""
        return self.urls[0]

    @property
    def prefetch_count(self) -> int:
        """Unacknowledged messages the broker may hand out: enough to fill a batch on every thread."""
        return min(self.prefetch * self.batch, 65535)

    @property
    def queue(self) -> str:
        """The queue of the b2b group events, and of user.created (one retry and dead-letter path for both)."""
        return f"{self.queue_prefix}b2b.group"

    @property
    def partition_queues(self) -> tuple[str, ...]:
        """The partition queues the intake queue `queue` feeds, one active consumer each."""
        return tuple(f"{self.queue}.p{number:03d}" for number in range(self.partitions))

    @property
    def retry_queue(self) -> str:
        """Where a failed attempt waits (per-message TTL) before it goes back to `queue`."""
        return f"{self.queue}.retry"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dead"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.queue_prefix}dlx"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The worker's process: its metrics and health endpoint and its systemd notifications."""

    metrics_host: str = "127.0.0.1"
    metrics_port: int = DEFAULT_METRICS_PORT
    notify_socket: str | None = None   # $NOTIFY_SOCKET, set by systemd for Type=notify
    watchdog_seconds: float | None = None  # from $WATCHDOG_USEC


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The addresses in one URL, several, or comma-separated ones (a cluster's nodes), blanks left out."""
    return [part.strip() for url in ([urls] if isinstance(urls, str) else urls)
            for part in url.split(",") if part.strip()]


def load_amqp(urls: str | Sequence[str], *, username: str = DEFAULT_AMQP_USER, password: str | None = None,
              password_file: str | None = None, **tuning: Any) -> AmqpSettings:
    """AmqpSettings from URLs without credentials (one, several, or comma-separated: a cluster's nodes)
    and the credentials apart (the first URL's, if it carries them).

    Raises:
        ConfigError: not amqp(s) URLs, too many, no password for a user other than guest, numbers out of range.
    """
    addresses = split_urls(urls)
    if not addresses:
        raise ConfigError("no AMQP URL")
    if len(addresses) > MAX_AMQP_URLS:
        raise ConfigError(f"at most {MAX_AMQP_URLS} AMQP URLs, not {len(addresses)}")
    parts = [urlsplit(address) for address in addresses]
    for address, part in zip(addresses, parts):
        if part.scheme not in ("amqp", "amqps") or not part.hostname:
            raise ConfigError(f"the AMQP URL must be amqp(s)://host[:port][/vhost]: {redact(address)}")
    user = username or _url_user(parts[0]) or DEFAULT_AMQP_USER
    secret = _password(password, password_file, parts[0])
    if secret is None:
        if user != DEFAULT_AMQP_USER:
            raise ConfigError(f"no AMQP password for {user}: set COUCHSYNC_AMQP_PASSWORD or --amqp-password-file")
        secret = Secret(DEFAULT_AMQP_USER)
    bare = tuple(dict.fromkeys(urlunsplit(part._replace(netloc=_host(part))) for part in parts))
    settings = AmqpSettings(urls=bare, username=user, password=secret, **tuning)
    if settings.prefetch < 1 or settings.delivery_limit < 1 or settings.retry_delay <= 0 \
            or settings.shutdown_timeout <= 0 or not settings.queue_prefix or settings.batch < 1 \
            or settings.batch_wait < 0 or settings.pause_probe <= 0 or not 1 <= settings.partitions <= 256:
        raise ConfigError("prefetch, delivery limit, retry delay, shutdown timeout, batch and pause probe must be "
                          "positive, the batch wait not negative, the partitions 1 to 256, and the queue prefix "
                          "not empty")
    return settings


def load_worker(*, metrics_host: str = "127.0.0.1", metrics_port: int = DEFAULT_METRICS_PORT,
                notify_socket: str | None = None, watchdog_usec: str | None = None) -> WorkerSettings:
    """WorkerSettings, checked.

    Raises:
        ConfigError: a port out of range or a malformed WATCHDOG_USEC.
    """
    if not 0 <= metrics_port < 65536:
        raise ConfigError(f"the metrics port must be between 0 and 65535, not {metrics_port}")
    try:
        watchdog = int(watchdog_usec) / 1e6 if watchdog_usec else None
    except ValueError as exc:
        raise ConfigError(f"WATCHDOG_USEC is not a number: {watchdog_usec!r}") from exc
    return WorkerSettings(metrics_host, metrics_port, notify_socket or None, watchdog)


def _url_user(parts: SplitResult) -> str | None:
    """The URL's user name, percent-decoded (`sync%40acme` is `sync@acme`)."""
    return unquote(parts.username) if parts.username else None


def _host(parts: SplitResult) -> str:
    """`host[:port]` of a URL, without its credentials."""
    return (parts.hostname or "") + (f":{parts.port}" if parts.port else "")


def _password(password: str | None, password_file: str | None, parts: SplitResult) -> Secret | None:
    """The password given: from the environment, else its file, else the URL's."""
    if password is not None:
        return Secret(password)
    if password_file:
        return read_secret_file(password_file)
    return Secret(unquote(parts.password)) if parts.password is not None else None


def redact(url: str) -> str:
    """The URL with any password replaced by `[secure]` (a percent-encoded one hides the whole userinfo)."""
    parts = urlsplit(url)
    if parts.password is None:
        if parts.username is not None and ":" in unquote(parts.username):
            return urlunsplit(parts._replace(netloc=f"[secure]@{_host(parts)}"))
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:[secure]@{_host(parts)}"))


def has_password(url: str) -> bool:
    """Whether the URL carries a password."""
    return urlsplit(url).password is not None


def has_userinfo(url: str) -> bool:
    """Whether the URL carries credentials of any kind (`user@`, `user:pw@`, `u%3Apw@`)."""
    return "@" in urlsplit(url).netloc


def read_secret_file(path: str | Path) -> Secret:
    """The first line of a secret file (systemd credentials, Kubernetes secrets).

    Raises:
        ConfigError: the file cannot be read, or is not UTF-8 text.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the secret file {path} is not UTF-8 text (byte {exc.start + 1})") from exc
    return Secret(text.splitlines()[0].strip() if text.strip() else "")


def load_couch(url: str, *, username: str | None = None, password: str | None = None,
               password_file: str | None = None, timeout: float = DEFAULT_TIMEOUT,
               pool_size: int = DEFAULT_CONCURRENCY) -> CouchSettings:
    """CouchSettings from a URL and credentials; credentials in the URL are moved out of it.

    Raises:
        ConfigError: the URL is not http(s), or the numbers are out of range.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"the CouchDB URL must be http(s)://host[:port]: {redact(url)}")
    if timeout <= 0 or pool_size < 1:
        raise ConfigError("the CouchDB timeout and pool size must be positive")
    bare = urlunsplit(parts._replace(netloc=_host(parts))).rstrip("/")
    return CouchSettings(url=bare, username=username or _url_user(parts),
                         password=_password(password, password_file, parts), timeout=timeout, pool_size=pool_size,
                         password_file=password_file if password is None else None)


def load_sync(*, global_db: str = DEFAULT_GLOBAL_DB, state_db: str = DEFAULT_STATE_DB,
              concurrency: int = DEFAULT_CONCURRENCY, page_size: int = DEFAULT_PAGE_SIZE,
              max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW,
              state_horizon: timedelta = DEFAULT_STATE_HORIZON) -> SyncSettings:
    """SyncSettings, checked.

    Raises:
        ConfigError: a number out of range or an empty database name.
    """
    if not global_db or not state_db:
        raise ConfigError("the global instances and directory state database names must not be empty")
    if concurrency < 1 or page_size < 1:
        raise ConfigError("concurrency and page size must be at least 1")
    if max_future_skew < timedelta(0):
        raise ConfigError("the future skew must not be negative")
    _check_horizon(state_horizon)
    return SyncSettings(global_db=global_db, state_db=state_db, concurrency=concurrency, page_size=page_size,
                        max_future_skew=max_future_skew, state_horizon=state_horizon)


def with_future_skew(settings: SyncSettings, text: str) -> SyncSettings:
    """The settings with the future skew a command's option gives (seconds or a duration).

    Raises:
        ConfigError: not a duration.
    """
    return replace(settings, max_future_skew=parse_duration(text))


def with_state_horizon(settings: SyncSettings, text: str) -> SyncSettings:
    """The settings with the state horizon a command's option gives (seconds or a duration).

    Raises:
        ConfigError: not a duration, or shorter than a minute.
    """
    return replace(settings, state_horizon=_check_horizon(parse_duration(text)))


def _check_horizon(horizon: timedelta) -> timedelta:
    # Shorter, events of an ordinary delivery delay (retries, a paused worker) would be refused as stale.
    if horizon < timedelta(minutes=1):
        raise ConfigError("the state horizon must be at least a minute (e.g. 90d)")
    return horizon


_DURATION = re.compile(r"(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?"
                       r"(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """A duration given as seconds (`86400`, `90.5`) or with units (`1d`, `12h`, `1h30m`, `45s`).

    Raises:
        ConfigError: anything else, negative, or too long to be a date difference.
    """
    text = text.strip()
    match = _DURATION.fullmatch(text)
    try:
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and match:
            seconds = sum(float(value) * _UNIT_SECONDS[unit] for unit, value in match.groupdict().items() if value)
        else:
            raise ConfigError(f"not a duration (seconds, or e.g. 1d, 12h, 1h30m): {text[:40]!r}")
        if not math.isfinite(seconds):
            raise OverflowError(text)
        return timedelta(seconds=seconds)
    except OverflowError as exc:
        raise ConfigError(f"the duration {text[:40]!r} is too long") from exc
