"""A local CouchDB server for the demo, the tests and the benchmarks, and the instances they seed.

`server()` chooses: the CouchDB that COUCHSYNC_TEST_COUCH_URL names (with admin credentials; the
`couchsync` admin is created there), else one Apache CouchDB node from the release that
COUCHSYNC_COUCHDB_RELEASE names (a `.tar.gz`, unpacked once into `.couchdb/`, or an unpacked directory),
else PouchDB Server (installed in `.couchserver/` by `scripts/setup`), the fallback. A server started
here listens on a free port of 127.0.0.1, keeps its data in a temporary folder and has two server
admins: `admin` (the stack's) and `couchsync` (the sync identity).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from localports import free_port

ROOT = Path(__file__).resolve().parent.parent
POUCHDB_BIN = ROOT / ".couchserver" / "node_modules" / "pouchdb-server" / "bin" / "pouchdb-server"
# The release the test machines hold beside the checkouts (../shared is read-only: unpacked into UNPACKED).
SHARED_RELEASE = ROOT.parent / "shared" / "couchdb" / "apache-couchdb-3.4.3.tar.gz"
UNPACKED = ROOT / ".couchdb"
RELEASE_ENV = "COUCHSYNC_COUCHDB_RELEASE"
URL_ENV = "COUCHSYNC_TEST_COUCH_URL"
COUCHDB, POUCHDB, EXTERNAL = "couchdb", "pouchdb-server", "external"
KIND_NAMES = {COUCHDB: "Apache CouchDB", POUCHDB: "PouchDB Server"}
SYNC_USER = "couchsync"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass
class LocalCouch:
    """A running server: its bare URL, the admin's and the sync identity's credentials."""

    url: str
    admin: tuple[str, str]
    sync: tuple[str, str]
    kind: str
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    version: str = ""
    node: str = ""  # an Erlang node's name: its shards are filed under it, so a restart keeps it
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.auth = self.admin

    @property
    def label(self) -> str:
        """What the server is, for people: `Apache CouchDB 3.4.3`."""
        return f"{KIND_NAMES.get(self.kind, self.kind)} {self.version}".strip()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """An admin request; `path` is already URL-encoded (`/global%2Finstances/_find`)."""
        return self.session.request(method, self.url + path, timeout=60, **kwargs)

    def stop(self) -> None:
        """Stop the server this object started (none for an external CouchDB)."""
        self.session.close()
        self.halt()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def halt(self) -> None:
        """Stop its process, keeping its folder (its settings and data) to start it again."""
        if self.process is not None and self.process.poll() is None:
            # The process group: the server started with a session of its own, and its helpers
            # (CouchDB's couchjs, Node's workers) go with it.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_until_up(url: str, process: subprocess.Popen[bytes] | None, log: Path | None,
                  path: str = "/") -> None:
    """Wait until `GET path` answers 2xx (CouchDB's `/_up` once it is ready, not merely listening).

    Raises:
        RuntimeError: the process ended or START_TIMEOUT passed; the log's tail is in the message.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if requests.get(url + path, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"the CouchDB-compatible server at {url} did not start:\n{tail}")


def start_pouchdb(*, data_dir: Path | None = None, port: int | None = None,
                  like: LocalCouch | None = None) -> LocalCouch:
    """Start PouchDB Server in memory (or file-backed in `data_dir`) on a free port.

    `like`: a stopped server to start again, on its port with its credentials (with the same `data_dir`).
    """
    if not POUCHDB_BIN.exists():
        raise RuntimeError(f"PouchDB Server is not installed in {POUCHDB_BIN.parent}: run scripts/setup")
    workdir = Path(tempfile.mkdtemp(prefix="couchsync-pouchdb-"))
    admin = like.admin if like else ("admin", secrets.token_hex(8))
    sync = like.sync if like else (SYNC_USER, secrets.token_hex(8))
    port = port or (int(urlsplit(like.url).port or 0) if like else None)
    (workdir / "config.json").write_text(json.dumps({"admins": dict([admin, sync])}))
    port = port or free_port()
    storage = ["-d", str(data_dir)] if data_dir else ["-m"]
    log = workdir / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["node", str(POUCHDB_BIN), *storage, "-p", str(port), "-o", "127.0.0.1",
             "-c", str(workdir / "config.json"), "-n"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    couch = LocalCouch(url, admin, sync, POUCHDB, process, workdir)
    try:
        wait_until_up(url, process, log)
        couch.version = server_version(couch)
    except BaseException:  # an interrupted start too: no server is left behind
        couch.stop()
        raise
    return couch


def start_couchdb(release: Path, *, data_dir: Path | None = None, port: int | None = None,
                  like: LocalCouch | None = None) -> LocalCouch:
    """Start one Apache CouchDB node of `release` (a `.tar.gz` or an unpacked directory) on a free port.

    Its data goes in a temporary folder, removed when it stops, or in `data_dir`, kept. `like`: a
    stopped server to start again, on its port with its credentials (with the same `data_dir`).

    Raises:
        RuntimeError: the release cannot be found or unpacked, or the node did not come up.
    """
    admin = like.admin if like else ("admin", secrets.token_hex(8))
    sync = like.sync if like else (SYNC_USER, secrets.token_hex(8))
    port = port or (int(urlsplit(like.url).port or 0) if like else None) or free_port()
    node = like.node if like else f"couchsync-{secrets.token_hex(4)}@127.0.0.1"
    couch = _start_node(release_home(release), node, secrets.token_hex(16), port, admin, sync, data_dir=data_dir)
    try:
        # single_node creates the first two; a node of a cluster waits. `_global_changes` is what the
        # `_db_updates` feed is kept in: a cluster's setup makes it, a bare node does not.
        for system_db in ("_users", "_replicator", "_global_changes"):
            ensure_system_db(couch, system_db)
        couch.version = server_version(couch)
    except BaseException:  # an interrupted start too: no node is left behind
        couch.stop()
        raise
    return couch


def _start_node(home: Path, node: str, cookie: str, port: int, admin: tuple[str, str], sync: tuple[str, str], *,
                data_dir: Path | None = None, cluster: list[str] | None = None) -> LocalCouch:
    """One node, up (`/_up`); `cluster`: the settings its cluster's nodes share (see `start_couchdb_cluster`)."""
    workdir = Path(tempfile.mkdtemp(prefix="couchsync-couchdb-"))
    data = data_dir or workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    log = workdir / "couch.log"
    (workdir / "node.ini").write_text(node_ini(data, port, [admin, sync], log) + "\n".join(cluster or ()) + "\n")
    (workdir / "vm.args").write_text(vm_args(node, cookie))
    couch = LocalCouch(f"http://127.0.0.1:{port}", admin, sync, COUCHDB, _launch(home, workdir), workdir, node=node)
    try:
        wait_until_up(couch.url, couch.process, log, path="/_up")
    except BaseException:
        couch.stop()
        raise
    return couch


def _launch(home: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """Start the node whose settings `workdir` holds (node.ini, vm.args), in a session of its own."""
    inis = [home / "etc" / "default.ini", home / "etc" / "local.ini", workdir / "node.ini"]
    env = {**os.environ, "COUCHDB_ARGS_FILE": str(workdir / "vm.args"),
           "COUCHDB_INI_FILES": " ".join(str(path) for path in inis)}
    with (workdir / "stdout.log").open("ab") as out:
        return subprocess.Popen([str(home / "bin" / "couchdb")], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@dataclass
class CouchCluster:
    """Nodes of one CouchDB cluster, each its own URL; the same admins on each."""

    nodes: list[LocalCouch]
    home: Path | None = None  # the unpacked release the nodes run

    @property
    def first(self) -> LocalCouch:
        return self.nodes[0]

    def stop_node(self, index: int) -> None:
        """Stop one node, keeping its data: `start_node` starts it again, and it catches up with the others."""
        self.nodes[index].halt()

    def start_node(self, index: int) -> None:
        """Start a stopped node again on its port, settings and data; returns once it answers `/_up`."""
        node = self.nodes[index]
        assert self.home is not None and node.workdir is not None
        node.process = _launch(self.home, node.workdir)
        wait_until_up(node.url, node.process, node.workdir / "couch.log", path="/_up")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_couchdb_cluster(release: Path, size: int = 3) -> CouchCluster:
    """A cluster of `size` Apache CouchDB nodes of `release` on this machine (`q=2, n=3` by default: each
    node holds a copy of every shard), set up as the release's documentation says: nodes added on the
    first, then `finish_cluster`.

    Raises:
        RuntimeError: a node did not come up or the cluster could not be set up (no node is left behind).
    """
    home = release_home(release)
    admin, sync = ("admin", secrets.token_hex(8)), (SYNC_USER, secrets.token_hex(8))
    tag, cookie = secrets.token_hex(4), secrets.token_hex(16)
    shared = ["[couchdb]", "single_node = false", f"uuid = {secrets.token_hex(16)}",
              "[chttpd_auth]", f"secret = {secrets.token_hex(16)}"]
    cluster = CouchCluster([], home)
    try:
        for number in range(1, size + 1):
            cluster.nodes.append(_start_node(home, f"couchsync-{tag}-c{number}@127.0.0.1", cookie, free_port(),
                                             admin, sync, cluster=shared))
        first = cluster.first
        for node in cluster.nodes[1:]:
            _cluster_call(first, "PUT", f"/_node/_local/_nodes/{node.node}", json={})
        _cluster_call(first, "POST", "/_cluster_setup", json={"action": "finish_cluster"})
        _wait_for_members(first, size)
        for node in cluster.nodes:
            ensure_system_db(node, "_global_changes")
            node.version = server_version(node)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cluster_call(node: LocalCouch, method: str, path: str, **kwargs: Any) -> None:
    response = node.request(method, path, **kwargs)
    if not response.ok:
        raise RuntimeError(f"cluster setup: {method} {path} answered {response.status_code}: {response.text[:300]}")


def _wait_for_members(node: LocalCouch, size: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        members = node.request("GET", "/_membership").json()
        if len(members.get("cluster_nodes", ())) == size and len(members.get("all_nodes", ())) == size:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the cluster has not got its {size} nodes after {START_TIMEOUT}s")


def node_ini(data: Path, port: int, admins: list[tuple[str, str]], log: Path) -> str:
    """A node's own settings, read after the release's: its data, its port, its admins (plain text,
    hashed by the server on first start), a log file of warnings."""
    lines = ["[couchdb]", f"database_dir = {data}", f"view_index_dir = {data}",
             "[smoosh]", f"state_dir = {data}",
             "[chttpd]", f"port = {port}", "bind_address = 127.0.0.1",
             "[admins]", *(f"{name} = {password}" for name, password in admins),
             "[log]", "writer = file", f"file = {log}", "level = warning"]
    return "\n".join(lines) + "\n"


def vm_args(name: str, cookie: str) -> str:
    """The Erlang VM's arguments: a node name and cookie of its own, distribution on loopback only."""
    return (f"-name {name}\n-setcookie {cookie}\n-kernel inet_dist_use_interface {{127,0,0,1}}\n"
            "-kernel error_logger silent\n-sasl sasl_error_logger false\n+Bd -noinput\n")


def release_home(release: Path) -> Path:
    """The unpacked release: `release` itself, or the tarball unpacked into UNPACKED (once).

    Raises:
        RuntimeError: no release there, or the tarball holds none.
    """
    if release.is_dir():
        if not (release / "bin" / "couchdb").exists():
            raise RuntimeError(f"{release} is not an Apache CouchDB release (no bin/couchdb)")
        return release
    if not release.is_file():
        raise RuntimeError(f"no Apache CouchDB release at {release}")
    home = UNPACKED / release.name.removesuffix(".tar.gz").removesuffix(".tgz")
    if not (home / "bin" / "couchdb").exists():
        unpack(release, home)
    return home


def unpack(tarball: Path, home: Path) -> None:
    """Unpack beside `home`, then rename: a concurrent or interrupted unpack never leaves half a release."""
    UNPACKED.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=UNPACKED))
    try:
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(staging)], check=True, capture_output=True,
                       timeout=300)
        found = [path.parent.parent for path in staging.glob("*/bin/couchdb")]  # the tarball's top folder
        if not found:
            raise RuntimeError(f"{tarball} holds no Apache CouchDB release (no <folder>/bin/couchdb)")
        try:
            found[0].rename(home)
        except OSError:
            if not (home / "bin" / "couchdb").exists():  # else another process unpacked it first
                raise
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"cannot unpack {tarball}: {exc.stderr.decode(errors='replace')}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def release_version(release: Path) -> str:
    """The CouchDB version a release holds (its `lib/couch-X.Y.Z`), without starting it; "" if unknown."""
    for lib in sorted(release_home(release).glob("lib/couch-*")):
        if re.fullmatch(r"couch-\d+(\.\d+)*", lib.name):
            return lib.name.removeprefix("couch-")
    return ""


def pouchdb_version() -> str:
    """The installed PouchDB Server's version, without starting it; "" if it is not installed."""
    try:
        return str(json.loads((POUCHDB_BIN.parent.parent / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return ""


def server_version(couch: LocalCouch) -> str:
    """The version `GET /` announces."""
    response = couch.request("GET", "/")
    response.raise_for_status()
    return str(response.json().get("version", ""))


def connect(url_with_admin: str) -> LocalCouch:
    """Use an external CouchDB; its URL carries admin credentials; the sync admin is (re)created."""
    parts = urlsplit(url_with_admin)
    if not parts.username or parts.password is None:
        raise RuntimeError("COUCHSYNC_TEST_COUCH_URL must carry admin credentials (http://user:pw@host:port)")
    bare = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port or 5984}")).rstrip("/")
    sync = (SYNC_USER, secrets.token_hex(8))
    couch = LocalCouch(bare, (parts.username, parts.password), sync, COUCHDB)
    wait_until_up(bare, None, None)
    couch.version = server_version(couch)
    for path in (f"/_node/_local/_config/admins/{SYNC_USER}", f"/_config/admins/{SYNC_USER}"):
        response = couch.request("PUT", path, data=json.dumps(sync[1]))
        if response.ok:
            return couch
    raise RuntimeError(f"cannot create the {SYNC_USER} admin on {bare}: {response.status_code}")


def find_release(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The release COUCHSYNC_COUCHDB_RELEASE names, else the shared one beside the checkout if present."""
    named = environ.get(RELEASE_ENV)
    if named:
        return Path(named)
    return SHARED_RELEASE if SHARED_RELEASE.exists() else None


def choose(environ: Mapping[str, str] = os.environ, *, discover: bool = False) -> tuple[str, str | None]:
    """Which server `server()` uses: ("external", URL), (COUCHDB, release) or (POUCHDB, None).

    `discover`: also look for the shared release when COUCHSYNC_COUCHDB_RELEASE is not set.
    """
    if environ.get(URL_ENV):
        return EXTERNAL, environ[URL_ENV]
    release = find_release(environ) if discover else environ.get(RELEASE_ENV)
    return (COUCHDB, str(release)) if release else (POUCHDB, None)


def server(*, discover: bool = False, **kwargs: Any) -> LocalCouch:
    """The server `choose()` names, connected or started (`kwargs` go to the start)."""
    kind, where = choose(discover=discover)
    if kind == EXTERNAL and where:
        return connect(where)
    if kind == COUCHDB and where:
        return start_couchdb(Path(where), **kwargs)
    return start_pouchdb(**kwargs)


def restartable(session: LocalCouch, data_dir: Path, like: LocalCouch | None = None) -> LocalCouch:
    """A server of our own, like the session's, keeping its data in `data_dir`, to stop and start again.

    Apache CouchDB when the session runs on CouchDB and a release is at hand (an external CouchDB cannot
    be stopped by a test), else PouchDB Server. `like`: the stopped one, started again as it was.
    """
    kind = like.kind if like else session.kind
    release = find_release()
    if kind == COUCHDB and release:
        return start_couchdb(release, data_dir=data_dir, like=like)
    return start_pouchdb(data_dir=data_dir, like=like)


def db_path(name: str) -> str:
    """A database name as it goes in a URL path."""
    return "/" + quote(name, safe="")


def ensure_db(couch: LocalCouch, name: str) -> None:
    response = couch.request("PUT", db_path(name))
    if response.status_code not in (201, 202, 412):
        response.raise_for_status()


def ensure_system_db(couch: LocalCouch, name: str) -> None:
    """Make sure a system database exists on a node that has just come up.

    A single node creates `_users` and `_replicator` itself as it starts: a PUT racing that creation
    answers 500, so a failed PUT is tried again (the next answers 412) until START_TIMEOUT.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        response = couch.request("PUT", db_path(name))
        if response.status_code in (201, 202, 412):
            return
        if time.monotonic() > deadline:
            response.raise_for_status()
        time.sleep(0.2)


def bulk(couch: LocalCouch, db: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write documents as the admin (the stack), creating the database if needed."""
    ensure_db(couch, db)
    response = couch.request("POST", db_path(db) + "/_bulk_docs", json={"docs": docs})
    response.raise_for_status()
    return list(response.json())


def instance_doc(domain: str, org_id: str | None, org_domain: str | None = None,
                 prefix: str | None = None, **extra: Any) -> dict[str, Any]:
    """A global/instances document as the stack writes it."""
    doc = {"_id": secrets.token_hex(16), "domain": domain, "org_id": org_id, "org_domain": org_domain,
           "context": "default", **extra}
    if prefix:
        doc["prefix"] = prefix
    return doc


def settings_doc(email: str, public_name: str) -> dict[str, Any]:
    return {"_id": "io.cozy.settings.instance", "email": email, "public_name": public_name}
