"""Events as typed values: `parse_event` checks a body against its JSON Schema and builds them.

Every b2b event gets a `stamp`, the total order couchsync applies events in: its timestamp (UTC,
fixed width), then a rank per kind (so that at equal timestamps a removal beats an addition and a
deletion beats everything), then a digest of the body (so that two different events never tie and
a redelivered event compares equal to itself). Stamps are strings and compare as strings.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from couchsync.errors import InvalidEvent

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


def parse_event(routing_key: str, body: bytes | str | dict[str, Any]) -> Event:
    """The event a message carries.

    Raises:
        InvalidEvent: not JSON, not an object, unknown routing key, or a schema violation.
    """
    data = _decode(routing_key, body)
    _check_schema(routing_key, data)
    if routing_key == USER_CREATED:
        return _user_created(data)
    return _group_event(routing_key, data)


def _decode(routing_key: str, body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if routing_key not in ROUTING_KEYS and routing_key != USER_CREATED:
        raise InvalidEvent(f"unknown routing key {routing_key!r}", routing_key=routing_key or None)
    if isinstance(body, dict):
        return body
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"body is not JSON: {exc}", routing_key=routing_key) from exc
    if not isinstance(data, dict):
        raise InvalidEvent("body is not a JSON object", routing_key=routing_key)
    return data


@cache
def _validator(routing_key: str) -> jsonschema.protocols.Validator:
    text = resources.files("couchsync.schemas").joinpath(f"{routing_key}.schema.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _check_schema(routing_key: str, data: dict[str, Any]) -> None:
    error = jsonschema.exceptions.best_match(_validator(routing_key).iter_errors(data))
    if error is None:
        return
    path = ".".join(str(part) for part in error.absolute_path) or "(body)"
    touches_secret = any(part in SECRET_FIELDS for part in error.absolute_path)
    why = "has an invalid value" if touches_secret else _describe(error)
    raise InvalidEvent(f"{path}: {why}", routing_key=routing_key)


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
    if error.validator == "anyOf":
        return "needs organizationId or organizationDomain"
    return str(error.message)[:200]


def _timestamp(value: str | float, routing_key: str) -> datetime:
    try:
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidEvent(f"timestamp: {value!r} is not an ISO 8601 date-time",
                           routing_key=routing_key) from exc
    # A timestamp without an offset is taken as UTC, the directory's own zone.
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def event_stamp(timestamp: datetime, kind: GroupEventKind, data: dict[str, Any]) -> str:
    """The stamp that orders this event among all others (see the module docstring).

    A user.created profile ranks as a creation; its secret fields are left out of the digest.
    """
    public = {key: value for key, value in data.items() if key not in SECRET_FIELDS}
    canonical = json.dumps(public, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    return f"{timestamp:%Y-%m-%dT%H:%M:%S.%fZ}#{kind.value}#{digest}"


def _member(data: dict[str, Any]) -> Member:
    return Member(email=data["email"].strip(), username=data.get("username"),
                  first_name=data.get("firstName"), last_name=data.get("lastName"),
                  name=data.get("name"), workplace_fqdn=data.get("workplaceFqdn") or None)


def _group_event(routing_key: str, data: dict[str, Any]) -> GroupEvent:
    kind = ROUTING_KEYS[routing_key]
    timestamp = _timestamp(data["timestamp"], routing_key)
    if kind is GroupEventKind.CREATED:
        # A creation sets every field: what it does not give is empty.
        fields = {name: data.get(name) or "" for name in GROUP_FIELDS}
        fields["createdAt"] = data.get("createdAt") or data["timestamp"]
    else:
        fields = {name: data[name] for name in GROUP_FIELDS if name in data}
    return GroupEvent(kind=kind, routing_key=routing_key,
                      organization_id=data["organizationId"].strip(), group_id=data["id"].strip(),
                      timestamp=timestamp, stamp=event_stamp(timestamp, kind, data),
                      fields=tuple(sorted(fields.items())),
                      members=tuple(_member(m) for m in data.get("members") or ()))


def _user_created(data: dict[str, Any]) -> UserCreated:
    timestamp = _timestamp(data["timestamp"], USER_CREATED)
    return UserCreated(
        twake_id=data["twakeId"].strip(), domain=data["domain"].strip().lower(),
        email=data["internalEmail"].strip(), timestamp=timestamp,
        stamp=event_stamp(timestamp, GroupEventKind.CREATED, data),
        organization_id=(data.get("organizationId") or "").strip() or None,
        organization_domain=(data.get("organizationDomain") or "").strip().lower() or None,
        workplace_fqdn=data.get("workplaceFqdn") or None, mobile=data.get("mobile") or None,
        first_name=data.get("firstName"), last_name=data.get("lastName"), name=data.get("name"),
        username=data.get("username"))
