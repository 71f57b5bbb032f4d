"""The breaker's judgement of CouchDB's health (a fake gateway answers its probes) and its reading of
the password file again."""

import logging

import pytest

from couchsync.breaker import COUCHDB, CREDENTIALS, REFUSED_RETRY, CouchBreaker, reason_of
from couchsync.config import Secret
from couchsync.errors import AccessDenied, ConfigError, CouchError, CouchUnavailable, NotFound


class FakeCouch:
    """Answers the probes as told: an error per probe name, or fine; records passwords set."""

    def __init__(self) -> None:
        self.errors: dict[str, Exception] = {}
        self.passwords: list[str] = []
        self.probes = 0

    def up(self) -> None:
        self.probes += 1
        self._answer("up")

    def session_name(self) -> str | None:
        self._answer("session")
        return "couchsync"

    def database_exists(self, db: str) -> bool:
        self._answer("state")
        return True

    def set_password(self, username: str, password: Secret) -> None:
        self.passwords.append(f"{username}:{password.value}")

    def _answer(self, probe: str) -> None:
        if probe in self.errors:
            raise self.errors[probe]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("error, expected", [
    (CouchUnavailable("CouchDB unreachable: ConnectionError"), COUCHDB),
    (CouchUnavailable("CouchDB answered 503", status=503), COUCHDB),
    (AccessDenied("access denied: Name or password is incorrect.", status=401), CREDENTIALS),
    (AccessDenied("access denied", status=403), CREDENTIALS),
    (ConfigError("cannot read the secret file /run/pw: No such file"), CREDENTIALS),
    (NotFound("not found", status=404), None),
    (CouchError("CouchDB answered 400", status=400), None),
])
def test_reason_of_a_probes_error(error, expected):
    assert reason_of(error) == expected


@pytest.mark.parametrize("probe, error, expected", [
    ("up", CouchUnavailable("CouchDB unreachable: ConnectionError"), COUCHDB),
    ("up", AccessDenied("Name or password is incorrect.", status=401), CREDENTIALS),
    ("session", AccessDenied("Name or password is incorrect.", status=401), CREDENTIALS),
    ("state", CouchUnavailable("CouchDB answered 500", status=500), COUCHDB),
    ("state", CouchError("CouchDB answered 400", status=400), None),
])
def test_a_failing_probe_names_the_reason_to_pause(probe, error, expected):
    couch = FakeCouch()
    couch.errors[probe] = error
    assert CouchBreaker(couch, "couchsync/directory", "couchsync").check() == expected


def test_a_healthy_server_means_no_pause_and_a_burst_of_failures_shares_one_probe():
    couch, clock = FakeCouch(), Clock()
    breaker = CouchBreaker(couch, "couchsync/directory", "couchsync", clock=clock)
    assert [breaker.check() for _ in range(20)] == [None] * 20
    assert couch.probes == 1
    clock.now += 1.5
    couch.errors["up"] = CouchUnavailable("down")
    assert breaker.check() == COUCHDB and couch.probes == 2


def test_the_password_file_is_read_again_at_each_probe_and_a_change_goes_to_every_gateway(tmp_path, caplog):
    password_file = tmp_path / "couch-password"
    password_file.write_text("old-secret\n")
    couch, other, clock = FakeCouch(), FakeCouch(), Clock()
    breaker = CouchBreaker(couch, "couchsync/directory", "couchsync", password_file=str(password_file),
                           also_update=[other], clock=clock)
    couch.errors["session"] = AccessDenied("Name or password is incorrect.", status=401)
    with caplog.at_level(logging.INFO):
        assert breaker.check() == CREDENTIALS
        clock.now += 2
        assert breaker.check() == CREDENTIALS  # unchanged file: no password set again
        password_file.write_text("new-secret\n")
        del couch.errors["session"]
        clock.now += 2
        assert breaker.check() is None
    assert couch.passwords == other.passwords == ["couchsync:old-secret", "couchsync:new-secret"]
    assert "old-secret" not in caplog.text and "new-secret" not in caplog.text


def test_refused_credentials_are_logged_at_error_once_a_minute_naming_the_user_and_file(tmp_path, caplog):
    password_file = tmp_path / "couch-password"
    password_file.write_text("wrong-secret\n")
    couch, clock = FakeCouch(), Clock()
    couch.errors["up"] = AccessDenied("Name or password is incorrect.", status=401)
    breaker = CouchBreaker(couch, "couchsync/directory", "couchsync", password_file=str(password_file), clock=clock)
    with caplog.at_level(logging.ERROR):
        for _ in range(30):  # a probe every 5 s for 150 s
            assert breaker.check() == CREDENTIALS
            clock.now += 5
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 3
    assert "couchsync" in errors[0] and str(password_file) in errors[0] and "wrong-secret" not in caplog.text


def test_an_unreadable_password_file_is_a_credentials_pause_not_a_crash(tmp_path):
    couch = FakeCouch()
    breaker = CouchBreaker(couch, "couchsync/directory", "couchsync", password_file=str(tmp_path / "missing"))
    assert breaker.check() == CREDENTIALS
    assert couch.probes == 0


def test_a_refused_password_is_sent_again_only_once_changed_or_after_a_while_not_to_get_locked_out(tmp_path):
    password_file = tmp_path / "couch-password"
    password_file.write_text("wrong-secret\n")
    couch, clock = FakeCouch(), Clock()
    couch.errors["up"] = AccessDenied("Name or password is incorrect.", status=401)
    breaker = CouchBreaker(couch, "couchsync/directory", "couchsync", password_file=str(password_file), clock=clock)
    for _ in range(10):  # a probe every 5 s: the refused password is not sent again
        assert breaker.check() == CREDENTIALS
        clock.now += 5
    assert couch.probes == 1
    clock.now += REFUSED_RETRY  # the user may have been fixed in CouchDB meanwhile: asked again, once
    assert breaker.check() == CREDENTIALS and couch.probes == 2
    password_file.write_text("right-secret\n")  # a changed file is tried at the next probe
    del couch.errors["up"]
    clock.now += 5
    assert breaker.check() is None and couch.probes == 3
