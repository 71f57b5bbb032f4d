"""Events as typed values: `parse_event` checks a body against its JSON Schema and builds them.

Every b2b event gets a `stamp`, the total order couchsync applies events in: its timestamp (UTC,
fixed width), then a rank per kind (so that at equal timestamps a removal beats an addition and a
deletion beats everything), then a digest of the body (so that two different events never tie and
a redelivered event compares equal to itself). Stamps are strings and compare as strings, so the
year is always four digits: every timestamp the schemas accept is in years 1 to 9999 once in UTC.

Hostile bodies end here as InvalidEvent with their reason, never as another exception: bodies nested
too deeply, timestamps that leave the calendar in UTC or lie too far in the future (`not_after`,
given by the caller: this module reads no clock), workplaces that are no host, and strings that
are not Unicode text. A workplace given as a URL is kept as its lower-case host only.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jsonschema

from couchsync.errors import FutureEvent, InvalidEvent

# Fields of user.created that must never be logged, stored or echoed in an error.
SECRET_FIELDS = frozenset({"hash", "publicKey", "privateKey", "key", "iterations"})


class GroupEventKind(enum.Enum):
    """The five b2b group lifecycle events; the value is the rank used in stamps."""

    CREATED = 0
    UPDATED = 1
    MEMBERS_ADDED = 2
    MEMBERS_REMOVED = 3
    DELETED = 4


ROUTING_KEYS = {
    "b2b.group.created": GroupEventKind.CREATED,
    "b2b.group.updated": GroupEventKind.UPDATED,
    "b2b.group.deleted": GroupEventKind.DELETED,
    "b2b.group.member.added": GroupEventKind.MEMBERS_ADDED,
    "b2b.group.member.removed": GroupEventKind.MEMBERS_REMOVED,
}
USER_CREATED = "user.created"
GROUP_FIELDS = ("name", "description", "color")
# A host name: dot-separated labels of letters, digits, "-" and "_" (IDN labels as Unicode letters).
HOST_NAME = re.compile(r"[^\W_]([\w-]*[^\W_])?(\.[^\W_]([\w-]*[^\W_])?)*", re.UNICODE)
MAX_HOST_LENGTH = 253  # DNS


@dataclass(frozen=True, slots=True)
class Member:
    """A person of the directory, as the b2b events name them; only the email is required."""

    email: str
    username: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    name: str | None = None
    workplace_fqdn: str | None = None
    phone: str | None = None


@dataclass(frozen=True, slots=True)
class GroupEvent:
    """One b2b.group.* event. `fields` holds the group fields the event sets ("" clears)."""

    kind: GroupEventKind
    routing_key: str
    organization_id: str
    group_id: str
    timestamp: datetime
    stamp: str
    fields: tuple[tuple[str, str], ...] = ()
    members: tuple[Member, ...] = ()


@dataclass(frozen=True, slots=True)
class UserCreated:
    """A new member instance; the secret fields of the body are dropped here."""

    twake_id: str
    domain: str
    email: str
    timestamp: datetime
    stamp: str
    organization_id: str | None = None
    organization_domain: str | None = None
    workplace_fqdn: str | None = None
    mobile: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    name: str | None = None
    username: str | None = None
    routing_key: str = USER_CREATED

    @property
    def member(self) -> Member:
        """The new user as a person of the directory (their profile in the other instances)."""
        return Member(email=self.email, username=self.username or self.twake_id, first_name=self.first_name,
                      last_name=self.last_name, name=self.name, workplace_fqdn=self.workplace_fqdn or self.domain,
                      phone=self.mobile)


Event = GroupEvent | UserCreated


def parse_event(routing_key: str, body: bytes | str | dict[str, Any], *,
                not_after: datetime | None = None) -> Event:
    """The event a message carries; with `not_after`, an event stamped later than it is refused.

    Raises:
        InvalidEvent: not JSON, not an object, unknown routing key, a schema violation, a timestamp out
            of range or after `not_after`, a workplace that is no host, a string that is not Unicode.
    """
    try:
        data = _decode(routing_key, body)
        _check_schema(routing_key, data)
        if routing_key == USER_CREATED:
            return _user_created(data, not_after)
        return _group_event(routing_key, data, not_after)
    except RecursionError as exc:
        # A dict body (from `apply`) is walked again by the schema and the digest.
        raise InvalidEvent("body is not JSON: nested too deeply", routing_key=routing_key) from exc


def _decode(routing_key: str, body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if routing_key not in ROUTING_KEYS and routing_key != USER_CREATED:
        raise InvalidEvent(f"unknown routing key {_shown(routing_key)}", routing_key=routing_key[:80] or None)
    if isinstance(body, dict):
        return body
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"body is not JSON: {exc}", routing_key=routing_key) from exc
    except RecursionError as exc:
        raise InvalidEvent("body is not JSON: nested too deeply", routing_key=routing_key) from exc
    if not isinstance(data, dict):
        raise InvalidEvent("body is not a JSON object", routing_key=routing_key)
    return data


def _shown(text: str, limit: int = 60) -> str:
    """A value for an error message: its repr, cut (bodies and routing keys may be huge)."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


@cache
def _validator(routing_key: str) -> jsonschema.protocols.Validator:
    text = resources.files("couchsync.schemas").joinpath(f"{routing_key}.schema.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _check_schema(routing_key: str, data: dict[str, Any]) -> None:
    _check_sizes(routing_key, data)
    error = jsonschema.exceptions.best_match(_validator(routing_key).iter_errors(data))
    if error is None:
        return
    path = ".".join(str(part) for part in error.absolute_path) or "(body)"
    touches_secret = any(part in SECRET_FIELDS for part in error.absolute_path)
    why = "has an invalid value" if touches_secret else _describe(error)
    raise InvalidEvent(f"{path}: {why}", routing_key=routing_key)


def _check_sizes(routing_key: str, data: dict[str, Any]) -> None:
    """The schema's `maxItems` bounds, checked before the schema walks every item of a huge list."""
    properties = _validator(routing_key).schema.get("properties", {})
    for name, rules in properties.items():
        value, bound = data.get(name), rules.get("maxItems")
        if isinstance(value, list) and bound is not None and len(value) > bound:
            raise InvalidEvent(f"{name}: must have at most {bound} item(s), not {len(value)}",
                               routing_key=routing_key)


def _describe(error: jsonschema.ValidationError) -> str:
    """The reason without echoing long values (a message body may be large)."""
    if error.validator == "required":
        return str(error.message)
    if error.validator == "type":
        return f"must be of type {error.validator_value}, not {type(error.instance).__name__}"
    if error.validator == "pattern":
        return "must not be blank" if error.validator_value == r"\S" else "is not a valid email"
    if error.validator == "minItems":
        return f"must have at least {error.validator_value} item(s)"
    if error.validator == "maxItems":
        return f"must have at most {error.validator_value} item(s)"
    if error.validator == "maxLength":
        return f"must be at most {error.validator_value} characters"
    if error.validator == "minLength":
        return f"must be at least {error.validator_value} characters"
    if error.validator == "anyOf":
        return "needs organizationId or organizationDomain"
    return str(error.message)[:200]


def _timestamp(value: str | float, routing_key: str, not_after: datetime | None) -> datetime:
    try:
        if isinstance(value, (int, float)):
            parsed = datetime.fromtimestamp(value, tz=timezone.utc)
        else:
            parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidEvent(f"timestamp: {_shown(str(value))} is not an ISO 8601 date-time",
                           routing_key=routing_key) from exc
    try:
        # A timestamp without an offset is taken as UTC, the directory's own zone.
        utc = parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
    except OverflowError as exc:
        raise InvalidEvent(f"timestamp: {_shown(str(value))} is out of range (years 1 to 9999 in UTC)",
                           routing_key=routing_key) from exc
    if not_after is not None and utc > _as_utc(not_after):
        # A far-future event would win over every later one for ever (its stamp sorts last).
        raise FutureEvent(f"timestamp: {_shown(str(value))} is too far in the future (after "
                          f"{_as_utc(not_after):%Y-%m-%dT%H:%M:%SZ}, the clock plus the allowed skew): "
                          f"replay it once its time has come", routing_key=routing_key, timestamp=utc)
    return utc


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def event_stamp(timestamp: datetime, kind: GroupEventKind, data: dict[str, Any]) -> str:
    """The stamp that orders this event among all others (see the module docstring).

    A user.created profile ranks as a creation; its secret fields are left out of the digest.

    Raises:
        UnicodeEncodeError: a string of the body holds a lone surrogate (not Unicode text).
    """
    public = {key: value for key, value in data.items() if key not in SECRET_FIELDS}
    canonical = json.dumps(public, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    # isoformat pads the year to four digits (strftime's %Y does not, on glibc).
    when = _as_utc(timestamp).replace(tzinfo=None).isoformat(timespec="microseconds")
    return f"{when}Z#{kind.value}#{digest}"


def _stamp(timestamp: datetime, kind: GroupEventKind, data: dict[str, Any], routing_key: str) -> str:
    try:
        return event_stamp(timestamp, kind, data)
    except UnicodeEncodeError as exc:
        # JSON can escape a lone surrogate ("\ud800"); CouchDB could not store it.
        raise InvalidEvent("body holds a string that is not Unicode text (a lone surrogate)",
                           routing_key=routing_key) from exc


def workplace_host(value: str | None, path: str, routing_key: str) -> str | None:
    """The lower-case host of a workplace given as an FQDN or a URL: no scheme, credentials, port or path.

    Raises:
        InvalidEvent: the value has no usable host name.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        host = urlsplit(text if "://" in text else f"//{text}").hostname
    except ValueError as exc:  # "[" is an unclosed IPv6 literal to urlsplit
        raise InvalidEvent(f"{path}: is not a host name or URL", routing_key=routing_key) from exc
    host = (host or "").rstrip(".")
    if not HOST_NAME.fullmatch(host) or len(host) > MAX_HOST_LENGTH:
        raise InvalidEvent(f"{path}: is not a host name or URL", routing_key=routing_key)
    return host.lower()


def _member(data: dict[str, Any], index: int, routing_key: str) -> Member:
    return Member(email=data["email"].strip(), username=data.get("username"),
                  first_name=data.get("firstName"), last_name=data.get("lastName"), name=data.get("name"),
                  workplace_fqdn=workplace_host(data.get("workplaceFqdn"), f"members.{index}.workplaceFqdn",
                                                routing_key))


def _group_event(routing_key: str, data: dict[str, Any], not_after: datetime | None) -> GroupEvent:
    kind = ROUTING_KEYS[routing_key]
    timestamp = _timestamp(data["timestamp"], routing_key, not_after)
    if kind is GroupEventKind.CREATED:
        # A creation sets every field: what it does not give is empty.
        fields = {name: data.get(name) or "" for name in GROUP_FIELDS}
        fields["createdAt"] = data.get("createdAt") or data["timestamp"]
    else:
        fields = {name: data[name] for name in GROUP_FIELDS if name in data}
    members = tuple(_member(m, index, routing_key) for index, m in enumerate(data.get("members") or ()))
    return GroupEvent(kind=kind, routing_key=routing_key,
                      organization_id=data["organizationId"].strip(), group_id=data["id"].strip(),
                      timestamp=timestamp, stamp=_stamp(timestamp, kind, data, routing_key),
                      fields=tuple(sorted(fields.items())), members=members)


def _user_created(data: dict[str, Any], not_after: datetime | None) -> UserCreated:
    timestamp = _timestamp(data["timestamp"], USER_CREATED, not_after)
    return UserCreated(
        twake_id=data["twakeId"].strip(), domain=data["domain"].strip().lower(),
        email=data["internalEmail"].strip(), timestamp=timestamp,
        stamp=_stamp(timestamp, GroupEventKind.CREATED, data, USER_CREATED),
        organization_id=(data.get("organizationId") or "").strip() or None,
        organization_domain=(data.get("organizationDomain") or "").strip().lower() or None,
        workplace_fqdn=workplace_host(data.get("workplaceFqdn"), "workplaceFqdn", USER_CREATED),
        mobile=data.get("mobile") or None,
        first_name=data.get("firstName"), last_name=data.get("lastName"), name=data.get("name"),
        username=data.get("username"))
