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
