"""Arguments and exit codes of the command line (no server needed)."""

from click.testing import CliRunner

from couchsync.cli import cli, read_messages


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
    result = run("dlq", "list", "--amqp-password", "hunter2")
    assert result.exception.exit_code == 78


def test_masked_bodies_hide_the_secret_fields_of_user_created():
    from couchsync.cli import masked_body
    shown = masked_body(b'{"twakeId": "t1", "privateKey": "PRIVATE", "hash": "H", "domain": "bob.acme"}')
    assert "PRIVATE" not in shown and '"hash": "[secure]"' in shown and '"domain": "bob.acme"' in shown
