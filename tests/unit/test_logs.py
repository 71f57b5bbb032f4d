"""Logging as the CLI sets it up: passwords masked, and no document contents at any level."""

from __future__ import annotations

import http.client
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from couchsync import logs
from couchsync.config import CouchSettings, Secret
from couchsync.couch import CouchGateway

DB = "alice-acme-twake-app/io-cozy-contacts"
NOISY = ("urllib3", "requests", "ibm-cloud-sdk-core", "ibm_cloud_sdk_core", "ibmcloudant", "http.client", "pika")
SECRET = "carol.private@acme.test"  # what a document holds: never in a log line


class FakeCouch(BaseHTTPRequestHandler):
    """Answers every request as CouchDB would, with a document holding SECRET."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/_bulk_docs"):
            body: object = [{"id": "c1", "rev": "1-a", "ok": True}]
        elif self.path.endswith("/_find"):
            body = {"docs": [{"_id": "c1", "email": [{"address": SECRET}]}], "bookmark": "nil"}
        else:
            body = {"_id": "c1", "_rev": "1-a", "email": [{"address": SECRET}]}
        data = json.dumps(body).encode()
        self.send_response(201 if self.command == "POST" and self.path.endswith("/_bulk_docs") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_couch() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCouch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in NOISY}
    debuglevel = http.client.HTTPConnection.debuglevel
    yield
    root.handlers[:], root.level = handlers, level
    for name, was in quiet.items():
        logging.getLogger(name).setLevel(was)
    http.client.HTTPConnection.debuglevel = debuglevel


def test_debug_logs_carry_no_request_or_response_bodies(fake_couch, restored_logging, capfd):
    # Issue 18, finding 9: the SDK logs as "ibm-cloud-sdk-core" and, when that logger is enabled for DEBUG
    # as a client is built, turns on http.client's printing of every request (bodies included).
    logs.setup("DEBUG")
    assert logging.getLogger().isEnabledFor(logging.DEBUG)
    logging.getLogger("couchsync.test").debug("our own debug line")
    settings = CouchSettings(fake_couch, "couchsync", Secret("pw-never-shown"), timeout=5, http_retries=0,
                             http_backoff=0)
    with CouchGateway(settings) as couch:
        assert http.client.HTTPConnection.debuglevel == 0
        assert couch.get(DB, "c1")["email"] == [{"address": SECRET}]
        couch.bulk_write(DB, [{"_id": "c2", "email": [{"address": "dave.private@acme.test"}]}])
        selector = {"email": {"$elemMatch": {"address": "erin.private@acme.test"}}}
        assert [doc["_id"] for doc in couch.find(DB, selector, page_size=10)] == ["c1"]
    out, err = capfd.readouterr()
    assert "our own debug line" in err  # DEBUG is on
    for text in (SECRET, "dave.private", "erin.private", "pw-never-shown", "send: b'", "reply: '"):
        assert text not in out + err
