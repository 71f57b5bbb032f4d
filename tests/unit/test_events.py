import json

import pytest

from couchsync.errors import InvalidEvent
from couchsync.events import GroupEventKind, UserCreated, event_stamp, parse_event

CREATED = {"timestamp": "2026-06-16T10:30:00.000Z", "organizationId": "acme", "id": "engineering",
           "name": "engineering", "description": "Engineering team", "color": "#3366FF",
           "createdAt": "2026-06-16T10:30:00.000Z", "members": []}
MEMBER = {"username": "bob", "email": "bob@acme.com", "firstName": "Bob", "lastName": "Martin",
          "workplaceFqdn": "bob.acme.twake.app"}
USER = {"twakeId": "u1", "domain": "bob.acme.twake.app", "internalEmail": "bob@acme.com",
        "mobile": "+33600000000", "workplaceFqdn": "bob.acme.twake.app", "timestamp": 1781605800,
        "organizationId": "acme", "hash": "h", "publicKey": "pk", "privateKey": "secret-private",
        "key": "k", "iterations": 10000}


def body(**changes):
    return json.dumps({**CREATED, **changes}).encode()


def test_spec_example_of_group_created_parses_into_typed_values():
    event = parse_event("b2b.group.created", body(members=[MEMBER]))
    assert event.kind is GroupEventKind.CREATED
    assert (event.organization_id, event.group_id) == ("acme", "engineering")
    assert dict(event.fields) == {"name": "engineering", "description": "Engineering team",
                                  "color": "#3366FF", "createdAt": "2026-06-16T10:30:00.000Z"}
    assert event.members[0].email == "bob@acme.com"
    assert event.members[0].workplace_fqdn == "bob.acme.twake.app"


def test_group_updated_keeps_only_the_fields_it_names_and_empty_string_clears():
    event = parse_event("b2b.group.updated", json.dumps(
        {"timestamp": "2026-06-16T11:00:00Z", "organizationId": "acme", "id": "engineering",
         "description": ""}))
    assert dict(event.fields) == {"description": ""}


@pytest.mark.parametrize("routing_key, payload, reason", [
    ("b2b.group.created", b"{not json", "body is not JSON"),
    ("b2b.group.created", b"[1, 2]", "body is not a JSON object"),
    ("b2b.group.created", body(name=None), "name: must be of type string, not NoneType"),
    ("b2b.group.created", json.dumps({k: v for k, v in CREATED.items() if k != "id"}).encode(),
     "(body): 'id' is a required property"),
    ("b2b.group.created", body(organizationId="  "), "organizationId: must not be blank"),
    ("b2b.group.created", body(members=[{"email": "nobody"}]), "members.0.email: is not a valid email"),
    ("b2b.group.created", body(members=[{"username": "x"}]), "members.0: 'email' is a required property"),
    ("b2b.group.created", body(timestamp="yesterday at noon"), "timestamp: 'yesterday at noon' is not an ISO"),
    ("b2b.group.member.added", body(members=[]), "members: must have at least 1 item(s)"),
    ("b2b.group.renamed", body(), "unknown routing key 'b2b.group.renamed'"),
])
def test_bad_bodies_give_an_error_naming_event_field_and_reason(routing_key, payload, reason):
    with pytest.raises(InvalidEvent) as caught:
        parse_event(routing_key, payload)
    assert reason in str(caught.value)
    assert str(caught.value).startswith(routing_key)


def test_user_created_drops_secrets_and_never_echoes_them_in_errors():
    event = parse_event("user.created", json.dumps(USER))
    assert isinstance(event, UserCreated)
    assert "secret-private" not in repr(event)
    with pytest.raises(InvalidEvent) as caught:
        parse_event("user.created", json.dumps({**USER, "privateKey": 12345678}))
    assert "12345678" not in str(caught.value)


def test_user_created_needs_an_organization_id_or_domain():
    with pytest.raises(InvalidEvent, match="needs organizationId or organizationDomain"):
        parse_event("user.created", json.dumps({k: v for k, v in USER.items() if k != "organizationId"}))
    event = parse_event("user.created", json.dumps(
        {**{k: v for k, v in USER.items() if k != "organizationId"}, "organizationDomain": "Acme.com"}))
    assert event.organization_domain == "acme.com"


def test_stamps_order_by_time_then_kind_and_equal_bodies_stamp_equal():
    early = parse_event("b2b.group.member.removed", body(timestamp="2026-06-16T10:00:00+02:00",
                                                         members=[MEMBER]))
    late_add = parse_event("b2b.group.member.added", body(timestamp="2026-06-16T10:00:00Z", members=[MEMBER]))
    same_time_remove = parse_event("b2b.group.member.removed", body(timestamp="2026-06-16T10:00:00Z",
                                                                    members=[MEMBER]))
    assert early.stamp < late_add.stamp  # 08:00 UTC before 10:00 UTC
    assert late_add.stamp < same_time_remove.stamp  # a removal wins a tie
    again = parse_event("b2b.group.member.added", body(timestamp="2026-06-16T10:00:00Z", members=[MEMBER]))
    assert again.stamp == late_add.stamp
    assert event_stamp(late_add.timestamp, GroupEventKind.DELETED, {}) > same_time_remove.stamp
