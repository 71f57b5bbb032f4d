"""Versions of the design documents: a rolling upgrade runs two couchsync versions side by side."""

from __future__ import annotations

import pytest

from couchsync import __version__
from couchsync.config import Secret
from couchsync.couch import seal_key
from couchsync.design_docs import SEAL_FIELD, VERSION_FIELD, is_newer, load, packaged, same_body, sealed, version_key
from couchsync.errors import ConfigError


PROTECTION_ID = "_design/couchsync-protection"


def test_versions_order_by_their_numbers_and_no_version_comes_first():
    assert version_key("0.10.1") > version_key("0.9.7") > version_key(None) == ()
    assert version_key("0.2.0rc1") == version_key("0.2.0")  # a pre-release counts as its release
    key = seal_key("couchsync", Secret("s3cret"))
    newer = {**sealed(PROTECTION_ID, {VERSION_FIELD: "0.2.0"}, key), "_id": PROTECTION_ID}
    assert is_newer(newer, {VERSION_FIELD: "0.1.0"}, key)
    assert not is_newer({**newer, VERSION_FIELD: "0.1.0"}, {VERSION_FIELD: "0.1.0"}, key)
    assert not is_newer({}, {VERSION_FIELD: "0.1.0"}, key)  # written before versions were stamped: replaced


def test_a_newer_version_is_trusted_only_with_a_seal_of_the_sync_identitys_credentials():
    key = seal_key("couchsync", Secret("s3cret"))
    body = {"validate_doc_update": "function () {}", VERSION_FIELD: "99.0.0"}
    newer = {**sealed(PROTECTION_ID, body, key), "_id": PROTECTION_ID, "_rev": "3-a"}
    older = {"validate_doc_update": "function (d) { throw 1 }", VERSION_FIELD: "0.1.0"}
    assert is_newer(newer, older, key)
    # A second admin stamps a permissive protection with a high version: no seal, a guessed one, the seal
    # of a genuine document moved onto other content, or a genuine newer lookup document copied over it.
    assert not is_newer({k: v for k, v in newer.items() if k != SEAL_FIELD}, older, key)
    assert not is_newer({**newer, SEAL_FIELD: "0" * 64}, older, key)
    assert not is_newer({**newer, "validate_doc_update": "function () { /* anything */ }"}, older, key)
    assert not is_newer({**sealed("_design/couchsync", body, key), "_id": PROTECTION_ID}, older, key)
    assert not is_newer(newer, older, seal_key("couchsync", Secret("another")))
    assert not is_newer(newer, older, None)  # no credentials: no newer document is trusted
    # The seal is no part of what a design document says: a sealed copy is the same body.
    assert same_body(newer, body)


def test_a_hostile_version_or_seal_is_an_older_document_not_a_crash():
    key = seal_key("couchsync", Secret("s3cret"))
    older = {VERSION_FIELD: "0.1.0"}
    for forged in ({VERSION_FIELD: "9" * 5000}, {VERSION_FIELD: "99", SEAL_FIELD: "é"},
                   {VERSION_FIELD: ["9"]}, {VERSION_FIELD: "99", SEAL_FIELD: {"a": 1}}):
        assert not is_newer({**forged, "_id": PROTECTION_ID}, older, key)


def test_an_override_folder_names_its_version_and_the_packaged_one_is_couchsyncs(tmp_path):
    assert load().version == __version__ and load().lookup[VERSION_FIELD] == __version__
    for source in packaged().iterdir():
        if source.is_file():
            (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / "VERSION").write_text("9.0.0\n")
    assert load(tmp_path).version == "9.0.0"
    (tmp_path / "VERSION").write_text("next\n")
    with pytest.raises(ConfigError, match="names no version"):
        load(tmp_path)
