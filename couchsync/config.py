"""Frozen settings built from the command line's values; secrets are kept apart and never shown.

Credentials come from the environment or from files, never from a URL typed on a command line:
`load_couch` splits any user:password out of the URL, and `redact` is how every URL is shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from couchsync.errors import ConfigError

DEFAULT_COUCH_URL = "http://127.0.0.1:5984"
DEFAULT_COUCH_USER = "couchsync"
DEFAULT_GLOBAL_DB = "global/instances"
DEFAULT_CONCURRENCY = 16      # instances written at once for one event
DEFAULT_PAGE_SIZE = 1000      # the stack pages its organization lists by 1,000
DEFAULT_TIMEOUT = 30.0        # seconds for one CouchDB request
DEFAULT_HTTP_RETRIES = 3      # quick retries of one request on connection errors, 429 and 5xx
DEFAULT_MAX_ATTEMPTS = 5      # read → plan → write rounds per instance before a 409 is given up


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


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """How the engine fans out and pages."""

    global_db: str = DEFAULT_GLOBAL_DB
    concurrency: int = DEFAULT_CONCURRENCY
    page_size: int = DEFAULT_PAGE_SIZE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


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


def redact(url: str) -> str:
    """The URL with any password replaced by `[secure]`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:[secure]@{host}"))


def has_password(url: str) -> bool:
    """Whether the URL carries a password."""
    return urlsplit(url).password is not None


def read_secret_file(path: str | Path) -> Secret:
    """The first line of a secret file (systemd credentials, Kubernetes secrets).

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from exc
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
    secret = read_secret_file(password_file) if password_file else None
    if password is not None:
        secret = Secret(password)
    if parts.password is not None and secret is None:
        secret = Secret(parts.password)
    user = username or parts.username
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    bare = urlunsplit(parts._replace(netloc=host)).rstrip("/")
    return CouchSettings(url=bare, username=user, password=secret, timeout=timeout,
                         pool_size=pool_size)


def load_sync(*, global_db: str = DEFAULT_GLOBAL_DB, concurrency: int = DEFAULT_CONCURRENCY,
              page_size: int = DEFAULT_PAGE_SIZE) -> SyncSettings:
    """SyncSettings, checked.

    Raises:
        ConfigError: a number out of range or an empty database name.
    """
    if not global_db:
        raise ConfigError("the global instances database name is empty")
    if concurrency < 1 or page_size < 1:
        raise ConfigError("concurrency and page size must be at least 1")
    return SyncSettings(global_db=global_db, concurrency=concurrency, page_size=page_size)
