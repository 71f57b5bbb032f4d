"""The harness's own Apache CouchDB node (scripts/localcouch.py), where a release is at hand."""

import os

import pytest
import requests

import localcouch

RELEASE = localcouch.find_release()
pytestmark = pytest.mark.skipif(RELEASE is None and not os.environ.get("CI"),
                                reason="no Apache CouchDB release (COUCHSYNC_COUCHDB_RELEASE or ../shared)")


@pytest.fixture
def node():
    assert RELEASE is not None, "CI needs the Apache CouchDB release"
    node = localcouch.start_couchdb(RELEASE)
    yield node
    node.stop()


def test_a_node_answers_with_its_version_two_admins_and_the_system_databases(node):
    assert node.kind == "couchdb" and node.version == localcouch.release_version(RELEASE)
    assert node.label == f"Apache CouchDB {node.version}"
    for user, password in (node.admin, node.sync):
        session = requests.get(node.url + "/_session", auth=(user, password), timeout=10).json()
        assert session["userCtx"] == {"name": user, "roles": ["_admin"]}
    assert {"_users", "_replicator"} <= set(node.request("GET", "/_all_dbs").json())
    assert requests.get(node.url + "/_all_dbs", timeout=10).status_code == 401  # no admin party


def test_a_stopped_node_is_gone_with_its_folder_and_starts_again_with_its_data(tmp_path):
    node = localcouch.start_couchdb(RELEASE, data_dir=tmp_path)
    localcouch.bulk(node, "kept/db", [{"_id": "doc"}])
    node.stop()
    assert node.process is not None and node.process.poll() is not None
    assert node.workdir is not None and not node.workdir.exists()

    again = localcouch.start_couchdb(RELEASE, data_dir=tmp_path, like=node)
    try:
        assert (again.url, again.admin, again.sync) == (node.url, node.admin, node.sync)
        assert again.request("GET", localcouch.db_path("kept/db") + "/doc").json()["_id"] == "doc"
    finally:
        again.stop()
