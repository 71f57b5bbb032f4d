"""Arguments and exit codes of the command line (no server needed)."""

import json

import pytest
from click.testing import CliRunner

from couchsync.cli import cli
from couchsync.cli.apply import read_messages


def run(*args, env=None, input=None):
    return CliRunner().invoke(cli, list(args), env=env or {}, input=input, standalone_mode=False)


def test_a_password_in_a_command_line_url_is_refused_with_exit_78():
    result = run("--couch-url", "http://couchsync:hunter2@couch:5984", "apply", "-", input="")
    assert result.exception is not None and result.exception.exit_code == 78
    assert "hunter2" not in str(result.exception)


def test_a_password_option_on_the_command_line_is_refused():
    result = run("--couch-password", "hunter2", "apply", "-", input="")
    assert result.exception.exit_code == 78


def test_a_password_from_the_environment_is_accepted():
    result = run("apply", "-", env={"COUCHSYNC_COUCH_PASSWORD": "hunter2"}, input="\n# nothing\n")
    assert result.exit_code == 0 and result.exception is None


def test_invalid_lines_are_reported_with_their_number_and_exit_65():
    lines = "\n".join(['{"routingKey": "b2b.group.created", "body": "not json"}', "oops",
                       '{"routingKey": "b2b.group.nope", "body": {}}'])
    result = run("apply", "-", input=lines)
    assert result.exception.code == 65
    assert result.output.splitlines() == [
        "1: b2b.group.created: InvalidEvent: b2b.group.created: body is not JSON: "
        "Expecting value: line 1 column 1 (char 0)",
        "2: ?: InvalidEvent: line is not JSON: Expecting value",
        "3: b2b.group.nope: InvalidEvent: b2b.group.nope: unknown routing key 'b2b.group.nope'",
    ]


def test_read_messages_skips_blank_and_comment_lines():
    messages = list(read_messages(iter(["", "# c", '{"routingKey": "k", "body": {"a": 1}}'])))
    assert messages == [(3, "k", {"a": 1})]


def test_a_broker_password_on_the_command_line_is_refused_with_exit_78():
    result = run("worker", "--amqp-url", "amqp://couchsync:hunter2@rabbit/", "--metrics-port", "0")
    assert result.exception is not None and result.exception.exit_code == 78
    assert "hunter2" not in str(result.exception)
    # In any of a cluster's addresses, repeated or comma-separated.
    for urls in (["--amqp-url", "amqp://r1/", "--amqp-url", "amqp://c:hunter2@r2/"],
                 ["--amqp-url", "amqp://r1/,amqp://c:hunter2@r2/"]):
        result = run("worker", *urls, "--metrics-port", "0")
        assert result.exception is not None and result.exception.exit_code == 78, urls
        assert "hunter2" not in str(result.exception) + result.output
    result = run("dlq", "list", "--amqp-password", "hunter2")
    assert result.exception.exit_code == 78


def test_masked_bodies_hide_the_secret_fields_of_user_created():
    from couchsync.dead_letters import masked_body
    shown = masked_body(b'{"twakeId": "t1", "privateKey": "PRIVATE", "hash": "H", "domain": "bob.acme"}')
    assert "PRIVATE" not in shown and '"hash": "[secure]"' in shown and '"domain": "bob.acme"' in shown


# Issue 18: hostile input to `apply` and to the options. The synchronizer is a fake here (no server):
# what is checked is the reading of the lines, the reports and the exit codes.

class FakeSynchronizer:
    """Records the events `apply` hands it and reports one write for each."""

    def __init__(self):
        self.applied = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def apply(self, event):
        from couchsync.sync import EventReport, InstanceReport
        self.applied.append(event)
        subject = getattr(event, "group_id", None) or event.domain
        return EventReport(event.routing_key, getattr(event, "organization_id", None) or "acme", subject,
                           (InstanceReport("acme.twake.app", writes=1),), 0.0)

    def apply_batch(self, events):
        from couchsync.sync import EventReport, InstanceReport
        self.applied += events
        return EventReport(events[0].routing_key, events[0].organization_id, ",".join(e.group_id for e in events),
                           (InstanceReport("acme.twake.app", writes=len(events)),), 0.0)


@pytest.fixture
def fake_sync(monkeypatch):
    from couchsync.cli.context import Context
    fake = FakeSynchronizer()
    monkeypatch.setattr(Context, "synchronizer", lambda self, couch: fake)
    return fake


def created(group_id, **changes):
    body = {"timestamp": "2026-06-16T10:30:00Z", "organizationId": "acme", "id": group_id, "name": group_id,
            **changes}
    return json.dumps({"routingKey": "b2b.group.created", "body": body}).encode()


HOSTILE_LINES = {
    "a 0xFF byte": b'{"routingKey": "b2b.group.created", "body": {"name": "caf\xff"}}',
    "JSON nested 100,000 levels": b'{"routingKey": "b2b.group.created", "body": ' + b"[" * 100_000
                                  + b"]" * 100_000 + b"}",
    "a timestamp past 9999 in UTC": created("late", timestamp="9999-12-31T23:59:59-05:00"),
    "a timestamp before year 1 in UTC": created("early", timestamp="0001-01-01T00:00:00+05:00"),
    "an unparseable workplace": created("bad-host", members=[{"email": "bob@acme.com", "workplaceFqdn": "["}]),
}


def test_apply_reports_each_hostile_line_with_its_number_and_applies_every_good_one(fake_sync):
    lines = [created("first")]
    for hostile in HOSTILE_LINES.values():
        lines += [hostile, created(f"after-{len(lines)}")]
    result = run("apply", "-", input=b"\n".join(lines))
    assert result.exception.code == 65
    assert [event.group_id for event in fake_sync.applied] == ["first", "after-1", "after-3", "after-5",
                                                               "after-7", "after-9"]
    errors = [line for line in result.output.splitlines() if "InvalidEvent" in line]
    assert [line.split(":")[0] for line in errors] == ["2", "4", "6", "8", "10"]
    assert "line is not UTF-8: byte 0xff at column 58" in errors[0]
    assert "nested too deeply" in errors[1]
    assert "is out of range" in errors[2] and "is out of range" in errors[3]
    assert "workplaceFqdn: is not a host name or URL" in errors[4]


def test_apply_refuses_events_beyond_the_future_skew_it_is_given(fake_sync):
    tomorrow = created("soon", timestamp="2999-01-01T00:00:00Z")
    result = run("apply", "--max-future-skew", "1h", "-", input=tomorrow)
    assert result.exception.code == 65 and "too far in the future" in result.output
    result = run("apply", "-", input=tomorrow, env={"COUCHSYNC_MAX_FUTURE_SKEW": str(1000 * 366 * 86400)})
    assert result.exit_code == 0, result.output
    result = run("apply", "--max-future-skew", "soon", "-", input=tomorrow)
    assert result.exception.exit_code == 78


def test_apply_batches_consecutive_events_of_one_organization_up_to_the_size_given(fake_sync):
    other = json.dumps({"routingKey": "b2b.group.deleted", "body": {
        "timestamp": "2026-06-16T10:30:00Z", "organizationId": "other", "id": "crew"}}).encode()
    lines = [created("a"), created("b"), created("c"), other, b"{not json", created("d"), created("e")]
    result = run("apply", "--batch", "2", "-", input=b"\n".join(lines))
    assert result.exit_code == 65, result.output
    labels = [line.split(":", 1)[0] for line in result.output.splitlines() if not line.startswith(" ")]
    assert labels == ["1-2", "3", "5", "4", "6-7"]  # a bad line is reported at once, as the worker dead-letters it
    assert [event.group_id for event in fake_sync.applied] == ["a", "b", "c", "crew", "d", "e"]


def test_the_worker_takes_a_future_skew_and_refuses_a_bad_one():
    result = run("worker", "--max-future-skew", "-1", "--metrics-port", "0")
    assert result.exception is not None and result.exception.exit_code == 78


def test_the_apply_report_cuts_a_ten_thousand_character_id(fake_sync, capsys):
    long_id = "x" * 10_000
    # The schema bounds ids (256 characters); a report line must stay short whatever it prints.
    result = run("apply", "-", input=created(long_id))
    assert result.exception.code == 65
    assert max(len(line) for line in result.output.splitlines()) < 400
    from couchsync.cli.apply import _print_report
    from couchsync.sync import EventReport, InstanceReport
    capsys.readouterr()
    _print_report(7, EventReport("b2b.group.created", "acme", long_id + "\nforged line",
                                 (InstanceReport("acme.twake.app", refusals=("r" * 10_000,)),), 0.0))
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) == 2 and max(len(line) for line in printed.splitlines()) < 400
    assert "(10012 characters)" in printed
    _print_report(8, EventReport("b2b.group.created", "acme", "eng\n9: b2b.group.created acme/x: ok", (), 0.0))
    assert capsys.readouterr().out.count("\n") == 1


@pytest.mark.parametrize("url", ["http://u%3Apw@couch:5984", "http://couchsync@couch:5984",
                                 "http://:pw@couch:5984"])
def test_any_credentials_in_a_command_line_url_are_refused_with_exit_78(url):
    result = run("--couch-url", url, "apply", "-", input="")
    assert result.exception is not None and result.exception.exit_code == 78
    assert "pw" not in str(result.exception)


def test_a_password_file_that_is_not_utf8_exits_78(tmp_path):
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xff\xfe")
    result = run("--couch-password-file", str(secret), "apply", "-", input="")
    assert result.exception is not None and result.exception.exit_code == 78


SECRET_VALUES = ("h4shS3cret", "pubK3ySecret", "privK3ySecret", "k3ySecret", "987654")
USER_CREATED = {"twakeId": "t1", "domain": "erin.acme.twake.app", "hash": "h4shS3cret", "publicKey": "pubK3ySecret",
                "privateKey": "privK3ySecret", "key": "k3ySecret", "iterations": 987654}


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_dlq_list_show_body_masks_user_created_secrets_in_any_body(monkeypatch, as_json):
    # Issue 18, finding 8: a body that is not JSON (a trailing comma), or a JSON array, was shown whole.
    from couchsync.cli import dlq as dlq_module
    from couchsync.dead_letters import DeadMessage

    bodies = [json.dumps(USER_CREATED).encode()[:-1] + b",}", json.dumps([USER_CREATED]).encode(),
              json.dumps(USER_CREATED).encode(), json.dumps(json.dumps(USER_CREATED)).encode()]
    letters = [DeadMessage(f"m{i}", "user.created", "InvalidEvent: body is not JSON", 1, None, body)
               for i, body in enumerate(bodies)]
    monkeypatch.setattr(dlq_module, "list_dead_letters", lambda settings, limit: letters)
    result = run("dlq", "list", "--show-body", *(["--json"] if as_json else []))
    assert result.exception is None and result.exit_code == 0
    assert result.output.count("erin.acme.twake.app") == 4  # the bodies are shown
    for value in SECRET_VALUES:
        assert value not in result.output
    if as_json:
        assert [json.loads(line)["id"] for line in result.output.splitlines()] == ["m0", "m1", "m2", "m3"]
