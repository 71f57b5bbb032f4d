"""Versions of the design documents: a rolling upgrade runs two couchsync versions side by side."""

from __future__ import annotations

import pytest

from couchsync import __version__
from couchsync.design_docs import VERSION_FIELD, is_newer, load, packaged, version_key
from couchsync.errors import ConfigError


def test_versions_order_by_their_numbers_and_no_version_comes_first():
    assert version_key("0.10.1") > version_key("0.9.7") > version_key(None) == ()
    assert is_newer({VERSION_FIELD: "0.2.0"}, {VERSION_FIELD: "0.1.0"})
    assert not is_newer({VERSION_FIELD: "0.1.0"}, {VERSION_FIELD: "0.1.0"})
    assert not is_newer({}, {VERSION_FIELD: "0.1.0"})  # written before versions were stamped: replaced


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
