"""A local CouchDB-compatible server for the demo and the tests, and the instances they seed.

`server()` starts PouchDB Server (installed in `.couchserver/` by `scripts/setup`) on a free port, in
memory or on disk, with two server admins: `admin` (the stack's) and `couchsync` (the sync identity).
When COUCHSYNC_TEST_COUCH_URL names a real CouchDB with admin credentials, that server is used
instead, and the `couchsync` admin is created there.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
POUCHDB_BIN = ROOT / ".couchserver" / "node_modules" / "pouchdb-server" / "bin" / "pouchdb-server"
SYNC_USER = "couchsync"
START_TIMEOUT = 60.0


@dataclass
class LocalCouch:
    """A running server: its bare URL, the admin's and the sync identity's credentials."""

    url: str
    admin: tuple[str, str]
    sync: tuple[str, str]
    kind: str
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.auth = self.admin

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """An admin request; `path` is already URL-encoded (`/global%2Finstances/_find`)."""
        return self.session.request(method, self.url + path, timeout=60, **kwargs)

    def stop(self) -> None:
        """Stop the server this object started (none for an external CouchDB)."""
        self.session.close()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if requests.get(url + "/", timeout=2).ok:
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
    couch = LocalCouch(url, admin, sync, "pouchdb-server", process, workdir)
    try:
        wait_until_up(url, process, log)
    except RuntimeError:
        couch.stop()
        raise
    return couch


def connect(url_with_admin: str) -> LocalCouch:
    """Use an external CouchDB; its URL carries admin credentials; the sync admin is (re)created."""
    parts = urlsplit(url_with_admin)
    if not parts.username or parts.password is None:
        raise RuntimeError("COUCHSYNC_TEST_COUCH_URL must carry admin credentials (http://user:pw@host:port)")
    bare = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port or 5984}")).rstrip("/")
    sync = (SYNC_USER, secrets.token_hex(8))
    couch = LocalCouch(bare, (parts.username, parts.password), sync, "couchdb")
    wait_until_up(bare, None, None)
    for path in (f"/_node/_local/_config/admins/{SYNC_USER}", f"/_config/admins/{SYNC_USER}"):
        response = couch.request("PUT", path, data=json.dumps(sync[1]))
        if response.ok:
            return couch
    raise RuntimeError(f"cannot create the {SYNC_USER} admin on {bare}: {response.status_code}")


def server(**kwargs: Any) -> LocalCouch:
    """The server named by COUCHSYNC_TEST_COUCH_URL, else a new PouchDB Server."""
    external = os.environ.get("COUCHSYNC_TEST_COUCH_URL")
    return connect(external) if external else start_pouchdb(**kwargs)


def db_path(name: str) -> str:
    """A database name as it goes in a URL path."""
    return "/" + quote(name, safe="")


def ensure_db(couch: LocalCouch, name: str) -> None:
    response = couch.request("PUT", db_path(name))
    if response.status_code not in (201, 202, 412):
        response.raise_for_status()


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
