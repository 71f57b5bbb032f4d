"""The test harness's choice of server (scripts/localcouch.py, scripts/matrix.py), without starting one."""

import subprocess
from pathlib import Path

import pytest

import localcouch
import matrix

RELEASE = "/releases/apache-couchdb-3.4.3.tar.gz"


@pytest.fixture
def no_shared_release(monkeypatch, tmp_path):
    monkeypatch.setattr(localcouch, "SHARED_RELEASE", tmp_path / "absent.tar.gz")


@pytest.fixture
def shared_release(monkeypatch, tmp_path):
    tarball = tmp_path / "apache-couchdb-3.4.3.tar.gz"
    tarball.write_bytes(b"")
    monkeypatch.setattr(localcouch, "SHARED_RELEASE", tarball)
    # As if unpacked already, whatever the checkout's own cache holds.
    monkeypatch.setattr(localcouch, "UNPACKED", tmp_path / "unpacked")
    fake_release(tmp_path / "unpacked" / "apache-couchdb-3.4.3")
    return tarball


def fake_release(folder: Path, version: str = "3.4.3") -> Path:
    """The parts of a release the harness looks at: bin/couchdb and lib/couch-VERSION."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "couchdb").write_text("#!/bin/sh\n")
    (folder / "lib" / f"couch-{version}").mkdir(parents=True)
    (folder / "lib" / "couch_mrview-3.4.3").mkdir()
    return folder


def test_the_url_wins_over_the_release_and_the_release_over_pouchdb(no_shared_release):
    assert localcouch.choose({"COUCHSYNC_TEST_COUCH_URL": "http://a:b@h:5984",
                              "COUCHSYNC_COUCHDB_RELEASE": RELEASE}) == ("external", "http://a:b@h:5984")
    assert localcouch.choose({"COUCHSYNC_COUCHDB_RELEASE": RELEASE}) == ("couchdb", RELEASE)
    assert localcouch.choose({}) == ("pouchdb-server", None)


def test_server_finds_the_shared_release_only_when_asked_to(shared_release):
    assert localcouch.choose({}) == ("pouchdb-server", None)
    assert localcouch.choose({}, discover=True) == ("couchdb", str(shared_release))
    assert localcouch.choose({"COUCHSYNC_COUCHDB_RELEASE": RELEASE}, discover=True) == ("couchdb", RELEASE)


def test_no_release_is_found_where_there_is_none(no_shared_release):
    assert localcouch.find_release({}) is None
    assert localcouch.find_release({"COUCHSYNC_COUCHDB_RELEASE": ""}) is None


def test_a_tarball_is_unpacked_once_into_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(localcouch, "UNPACKED", tmp_path / ".couchdb")
    fake_release(tmp_path / "src" / "apache-couchdb-3.4.3")
    tarball = tmp_path / "apache-couchdb-3.4.3.tar.gz"
    subprocess.run(["tar", "czf", str(tarball), "-C", str(tmp_path / "src"), "apache-couchdb-3.4.3"], check=True)

    home = localcouch.release_home(tarball)
    (home / "marker").write_text("")
    assert home == tmp_path / ".couchdb" / "apache-couchdb-3.4.3"
    assert localcouch.release_home(tarball) == home and (home / "marker").exists()  # reused
    assert localcouch.release_version(tarball) == "3.4.3"
    assert sorted(path.name for path in (tmp_path / ".couchdb").iterdir()) == ["apache-couchdb-3.4.3"]


def test_an_unpacked_release_is_used_where_it_is(tmp_path):
    home = fake_release(tmp_path / "couchdb", version="3.5.0")
    assert localcouch.release_home(home) == home
    assert localcouch.release_version(home) == "3.5.0"


def test_what_is_no_release_is_said_so(tmp_path):
    with pytest.raises(RuntimeError, match="no Apache CouchDB release"):
        localcouch.release_home(tmp_path / "missing.tar.gz")
    with pytest.raises(RuntimeError, match="no bin/couchdb"):
        localcouch.release_home(tmp_path)


def test_a_node_keeps_its_data_port_and_admins_in_its_own_files(tmp_path):
    ini = localcouch.node_ini(tmp_path / "data", 15984, [("admin", "a1"), ("couchsync", "c2")], tmp_path / "log")
    assert f"database_dir = {tmp_path / 'data'}\n" in ini and "port = 15984\n" in ini
    assert "bind_address = 127.0.0.1\n" in ini
    assert "[admins]\nadmin = a1\ncouchsync = c2\n" in ini
    args = localcouch.vm_args("n1@127.0.0.1", "cookie")
    assert args.splitlines()[:2] == ["-name n1@127.0.0.1", "-setcookie cookie"]


ONE_SERVER, CLUSTERS = ("-m", "not cluster"), ("-m", "cluster")


def test_the_whole_suite_runs_on_couchdb_then_on_pouchdb_then_on_the_clusters(shared_release):
    parts = matrix.plan({}, whole_suite=True)
    assert parts == [matrix.Part("couchdb", str(shared_release), ONE_SERVER),
                     matrix.Part("pouchdb-server", selection=ONE_SERVER),
                     matrix.Part("couchdb", str(shared_release), CLUSTERS, clusters=True)]
    assert parts[2].label().startswith("clusters: Apache CouchDB 3.4.3 x3 nodes, RabbitMQ x3 nodes")
    assert parts[0].environ({"PATH": "/bin"}) == {"PATH": "/bin", "COUCHSYNC_COUCHDB_RELEASE": str(shared_release)}
    assert parts[1].environ({"COUCHSYNC_COUCHDB_RELEASE": RELEASE}) == {}


def test_without_a_release_the_suite_runs_on_pouchdb_alone(no_shared_release):
    assert matrix.plan({}, whole_suite=True) == [matrix.Part("pouchdb-server", selection=ONE_SERVER)]
    with pytest.raises(matrix.UsageError, match="no release"):
        matrix.plan({"COUCHSYNC_TEST_SERVER": "couchdb"}, whole_suite=True)


def test_chosen_tests_run_on_one_server(shared_release):
    assert matrix.plan({}, whole_suite=False) == [matrix.Part("couchdb", str(shared_release))]
    assert matrix.plan({"COUCHSYNC_TEST_SERVER": "pouchdb"}, whole_suite=False) == [matrix.Part("pouchdb-server")]
    assert matrix.plan({"COUCHSYNC_TEST_SERVER": "couchdb"}, whole_suite=True) == [
        matrix.Part("couchdb", str(shared_release), ONE_SERVER)]
    with pytest.raises(matrix.UsageError, match="must be one of"):
        matrix.plan({"COUCHSYNC_TEST_SERVER": "mysql"}, whole_suite=False)


def test_a_couchdb_of_ones_own_replaces_the_others(shared_release):
    parts = matrix.plan({"COUCHSYNC_TEST_COUCH_URL": "http://admin:secret@db.example:6984"}, whole_suite=True)
    assert parts == [matrix.Part("external", "http://admin:secret@db.example:6984", ONE_SERVER)]
    assert parts[0].label() == "the CouchDB at http://db.example:6984"  # no password in the label


@pytest.mark.parametrize("status, said", [(0, "passed"), (1, "tests failed"), (5, "no tests collected"),
                                          (4, "pytest error 4")])
def test_each_exit_status_of_pytest_is_said_in_words(status, said):
    assert matrix.outcome(status) == said


@pytest.mark.parametrize("line, counts", [
    ("===== 2 failed, 410 passed, 3 skipped in 612.31s (0:10:12) =====",
     "2 failed, 410 passed, 3 skipped in 612.31s (0:10:12)"),
    ("16 deselected in 4.16s", "16 deselected in 4.16s"),
    ("collected 16 items", None)])
def test_pytest_summary_line_is_recognized(line, counts):
    found = matrix.SUMMARY.match(line)
    assert (found.group(1) if found else None) == counts
