import pytest

from couchsync import config
from couchsync.config import Secret, load_couch, load_sync, redact
from couchsync.errors import ConfigError


def test_redact_masks_the_password_only():
    assert redact("http://admin:s3cret@couch:5984/db") == "http://admin:[secure]@couch:5984/db"
    assert redact("http://couch:5984") == "http://couch:5984"


def test_credentials_are_moved_out_of_the_url_and_never_shown():
    settings = load_couch("http://couchsync:s3cret@couch.local:5984/")
    assert settings.url == "http://couch.local:5984"
    assert settings.username == "couchsync"
    assert settings.password == Secret("s3cret")
    assert "s3cret" not in repr(settings)


def test_a_password_file_is_read_and_its_first_line_used(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\nignored\n")
    assert load_couch("http://couch", password_file=str(secret)).password.value == "from-file"


def test_a_missing_password_file_is_a_config_error_with_exit_78(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_couch("http://couch", password_file=str(tmp_path / "missing"))
    assert caught.value.exit_code == 78


@pytest.mark.parametrize("url", ["couch:5984", "ftp://couch", "http://"])
def test_urls_that_are_not_http_are_refused(url):
    with pytest.raises(ConfigError):
        load_couch(url)


def test_sync_settings_refuse_zero_concurrency():
    with pytest.raises(ConfigError):
        load_sync(concurrency=0)


def test_the_sync_identity_is_names_and_roles_deduplicated_and_sorted():
    identity = config.load_identity([" couchsync", "bot", "couchsync", ""], ["directory-sync"])
    assert identity == config.SyncIdentity(names=("bot", "couchsync"), roles=("directory-sync",))


def test_an_empty_sync_identity_is_a_configuration_error():
    with pytest.raises(ConfigError, match="at least one user name or role"):
        config.load_identity([""], [])


def test_the_admin_role_would_let_every_server_admin_through_and_is_refused():
    with pytest.raises(ConfigError, match="_admin cannot be a sync identity role"):
        config.load_identity(["couchsync"], ["_admin"])


# Issue 18, finding 12: configuration mistakes are ConfigErrors (exit 78), never tracebacks.

def test_a_password_file_that_is_not_utf8_is_a_config_error_with_exit_78(tmp_path):
    secret = tmp_path / "pw"
    secret.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        load_couch("http://couch", password_file=str(secret))
    assert caught.value.exit_code == 78


def test_percent_encoded_credentials_are_decoded_and_masked():
    settings = load_couch("http://sync%40acme:p%3Aw@couch:5984")
    assert (settings.username, settings.password) == ("sync@acme", Secret("p:w"))
    assert redact("http://u%3Apw@couch:5984") == "http://[secure]@couch:5984"
    assert config.has_userinfo("http://u%3Apw@couch:5984") and not config.has_userinfo("http://couch:5984")


# Finding 3: how far into the future an event's timestamp may be.

@pytest.mark.parametrize("text, seconds", [("86400", 86400), ("90.5", 90.5), ("1d", 86400), ("12h", 43200),
                                           ("1h30m", 5400), ("45s", 45), ("0", 0)])
def test_the_future_skew_is_read_as_seconds_or_a_duration(text, seconds):
    assert config.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "-5", "1 week", "h", "1x", "nan", "inf"])
def test_a_future_skew_that_is_no_duration_is_a_config_error(text):
    with pytest.raises(ConfigError, match="duration"):
        config.parse_duration(text)


def test_sync_settings_accept_events_up_to_five_minutes_ahead_by_default():
    from datetime import datetime, timedelta, timezone
    settings = load_sync()
    assert settings.max_future_skew == timedelta(minutes=5)
    now = datetime(2026, 12, 7, 8, 0, tzinfo=timezone.utc)
    assert settings.not_after(now) == now + timedelta(minutes=5)


def test_the_state_horizon_is_ninety_days_by_default_and_at_least_a_minute():
    from datetime import timedelta
    assert load_sync().state_horizon == timedelta(days=90)
    assert config.with_state_horizon(load_sync(), "30d").state_horizon == timedelta(days=30)
    with pytest.raises(ConfigError, match="at least a minute"):
        config.with_state_horizon(load_sync(), "30")
    with pytest.raises(ConfigError, match="at least a minute"):
        load_sync(state_horizon=timedelta(0))
