import json
from datetime import datetime, timezone

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


# Issue 18, finding 3: stamps order as time orders, and impossible or future timestamps are refused.

def test_stamps_of_years_before_1000_sort_before_current_ones():
    old = parse_event("b2b.group.updated", body(timestamp="0999-01-01T00:00:00Z", name="OLD"))
    new = parse_event("b2b.group.updated", body(timestamp="2027-01-01T00:00:00Z", name="NEW"))
    assert old.stamp.startswith("0999-01-01T00:00:00.000000Z#1#")
    assert old.stamp < new.stamp
    # The format of stored stamps (years from 1000) is unchanged.
    assert new.stamp.startswith("2027-01-01T00:00:00.000000Z#1#")


@pytest.mark.parametrize("timestamp", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"])
def test_timestamps_that_leave_the_calendar_in_utc_are_invalid_events(timestamp):
    with pytest.raises(InvalidEvent, match="timestamp: .* is out of range"):
        parse_event("b2b.group.created", body(timestamp=timestamp))


def test_timestamps_further_in_the_future_than_the_allowed_skew_are_refused():
    not_after = datetime(2026, 6, 17, 10, 30, tzinfo=timezone.utc)
    assert parse_event("b2b.group.created", body(timestamp="2026-06-17T10:30:00Z"), not_after=not_after)
    with pytest.raises(InvalidEvent, match="timestamp: '9999-01-01T00:00:00Z' is too far in the future"):
        parse_event("b2b.group.created", body(timestamp="9999-01-01T00:00:00Z"), not_after=not_after)
    with pytest.raises(InvalidEvent, match="too far in the future"):
        parse_event("user.created", json.dumps({**USER, "timestamp": not_after.timestamp() + 1}),
                    not_after=not_after)


# Finding 4: what made `apply` crash is an InvalidEvent with its real reason.

def test_json_nested_too_deeply_is_an_invalid_event_with_its_reason():
    with pytest.raises(InvalidEvent, match="body is not JSON: nested too deeply"):
        parse_event("b2b.group.created", b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize("fqdn", ["[", "http://[::1", "bob acme.test", "https://user:pw@/path"])
def test_a_workplace_fqdn_without_a_usable_host_is_an_invalid_event(fqdn):
    with pytest.raises(InvalidEvent, match=r"members\.0\.workplaceFqdn: is not a host name or URL"):
        parse_event("b2b.group.created", body(members=[{**MEMBER, "workplaceFqdn": fqdn}]))
    with pytest.raises(InvalidEvent, match=r"workplaceFqdn: is not a host name or URL"):
        parse_event("user.created", json.dumps({**USER, "workplaceFqdn": fqdn}))


def test_a_string_that_is_not_unicode_text_is_an_invalid_event():
    with pytest.raises(InvalidEvent, match="not Unicode text"):
        parse_event("b2b.group.created", b'{"timestamp": "2026-06-16T10:30:00Z", "organizationId": "acme",'
                                         b' "id": "eng", "name": "\\ud800"}')


# Finding 5 (schema part): an event's size is bounded, and so is each string.

def test_an_event_with_more_members_than_the_bound_is_refused_with_the_reason():
    members = [{"email": f"m{i}@acme.com"} for i in range(10_001)]
    with pytest.raises(InvalidEvent, match="members: must have at most 10000 item"):
        parse_event("b2b.group.created", body(members=members))
    assert len(parse_event("b2b.group.member.added", body(members=members[:10_000])).members) == 10_000


@pytest.mark.parametrize("routing_key, payload, reason", [
    ("b2b.group.created", body(id="x" * 257), "id: must be at most 256 characters"),
    ("b2b.group.created", body(name="N" * 257), "name: must be at most 256 characters"),
    ("b2b.group.created", body(description="D" * 4097), "description: must be at most 4096 characters"),
    ("b2b.group.created", body(members=[{"email": "b" * 250 + "@acme.com"}]),
     "members.0.email: must be at most 254 characters"),
    ("user.created", json.dumps({**USER, "twakeId": "t" * 257}), "twakeId: must be at most 256 characters"),
], ids=["group id", "group name", "description", "member email", "twakeId"])
def test_over_long_strings_are_refused_without_echoing_them(routing_key, payload, reason):
    with pytest.raises(InvalidEvent) as caught:
        parse_event(routing_key, payload)
    assert reason in str(caught.value)
    assert len(str(caught.value)) < 200


# Finding 11 (host part): a workplace URL is kept as its host only.

def test_a_workplace_url_with_credentials_is_kept_as_its_lower_case_host_only():
    fqdn = "https://user:s3cretpw@Bob.ACME.test:8443/path?q=1"
    event = parse_event("b2b.group.member.added", body(members=[{**MEMBER, "workplaceFqdn": fqdn}]))
    assert event.members[0].workplace_fqdn == "bob.acme.test"
    user = parse_event("user.created", json.dumps({**USER, "workplaceFqdn": fqdn}))
    assert user.workplace_fqdn == "bob.acme.test"
    assert "s3cretpw" not in repr(event) + repr(user)
