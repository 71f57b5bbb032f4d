"""CouchGateway: the only module that speaks HTTP to CouchDB (through ibmcloudant and requests).

Every error is mapped once, here, into `couchsync.errors` (`translate_errors`). One pooled session
serves all threads; quick retries of a single request (connection errors, 429, 5xx) are urllib3's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from ibm_cloud_sdk_core import ApiException
from ibm_cloud_sdk_core.authenticators import BasicAuthenticator, NoAuthAuthenticator
from ibmcloudant.cloudant_v1 import CloudantV1
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from couchsync.config import CouchSettings, Secret
from couchsync.errors import (
    AccessDenied, CouchError, CouchUnavailable, DocumentConflict, NotFound)

logger = logging.getLogger(__name__)

Doc = dict[str, Any]
# Documents per `_bulk_docs` request. Each request ends in a commit that wakes CouchDB's background indexer,
# which then competes with the next request for the server. A 10,000-member event's contacts, three instances
# written at once (2-core server, one run each): 19-20 s in chunks of 2,500, 14.5-15 s in chunks of 5,000, 14 s
# in one request; a chunk of 5,000 took about 7 s, well within DEFAULT_TIMEOUT (30 s).
BULK_CHUNK = 5000
# The smallest chunk a write sent `in_flight` chunks at once is split into: below, one request is cheaper.
SHARED_CHUNK_MIN = 1000


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of one document of a bulk write: a new revision, or CouchDB's error and reason."""

    doc_id: str
    rev: str | None = None
    error: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def conflict(self) -> bool:
        return self.error == "conflict"


@dataclass(frozen=True, slots=True)
class MangoIndex:
    """A Mango JSON index, kept in the design document of the same name."""

    name: str
    fields: tuple[str, ...]


def _error_for(status: int, message: str, db: str | None, doc_id: str | None) -> CouchError:
    if status in (401, 403):
        return AccessDenied(f"access denied: {message}", db=db, doc_id=doc_id, status=status)
    if status == 404:
        return NotFound(f"not found: {message}", db=db, doc_id=doc_id, status=status)
    if status == 409:
        return DocumentConflict("document update conflict", db=db, doc_id=doc_id, status=status)
    if status == 429 or status >= 500:
        return CouchUnavailable(f"CouchDB answered {status}: {message}", db=db, doc_id=doc_id,
                                status=status)
    return CouchError(f"CouchDB answered {status}: {message}", db=db, doc_id=doc_id, status=status)


@contextmanager
def translate_errors(db: str | None = None, doc_id: str | None = None) -> Iterator[None]:
    """Map ibmcloudant and requests errors into couchsync's, naming the database and document."""
    try:
        yield
    except ApiException as exc:
        raise _error_for(exc.status_code, exc.message or "", db, doc_id) from exc
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        # A body cut short (ChunkedEncodingError) is a connection that broke mid-answer, as an overloaded
        # node's do: passing. requests' messages name the host and path only: credentials travel in a header.
        raise CouchUnavailable(f"CouchDB unreachable: {type(exc).__name__}", db=db, doc_id=doc_id) from exc
    except requests.RequestException as exc:
        raise CouchError(f"CouchDB request failed: {type(exc).__name__}", db=db, doc_id=doc_id) from exc


def _json(result: Any) -> Doc:
    """A JSON body the SDK left undecoded: PouchDB Server sends `_local` documents without a JSON content type."""
    if isinstance(result, requests.Response):
        with translate_errors():
            result = result.json()
    if not isinstance(result, dict):
        raise CouchError("CouchDB answered something that is not a JSON object")
    return result


def _session(settings: CouchSettings) -> requests.Session:
    retry = Retry(total=settings.http_retries, connect=settings.http_retries, read=settings.http_retries,
                  backoff_factor=settings.http_backoff, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None,
                  raise_on_status=False, respect_retry_after_header=True)
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=settings.pool_size, max_retries=retry)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


SEAL_ITERATIONS = 100_000  # PBKDF2 rounds: a tenth of a second, once per process that writes design documents


def seal_key(username: str | None, password: Secret | None) -> bytes | None:
    """The key of the design documents' seals, derived from the sync identity's credentials (none without).

    A slow, salted derivation: the seals are readable by anyone who reads design documents, and must not
    make them a cheap oracle for guessing the password (a server admin can read CouchDB's own PBKDF2 hash
    of it anyway, so a seal is no weaker a secret than what CouchDB stores).
    """
    if not username or password is None:
        return None
    salt = f"couchsync design documents\0{username}".encode()
    return hashlib.pbkdf2_hmac("sha256", password.value.encode(), salt, SEAL_ITERATIONS)


class CouchGateway:
    """Reads and writes documents; database names are plain (`alice-acme/io-cozy-contacts`)."""

    def __init__(self, settings: CouchSettings) -> None:
        if settings.username and settings.password is not None:
            authenticator: Any = BasicAuthenticator(settings.username, settings.password.value)
        else:
            authenticator = NoAuthAuthenticator()
        self._credentials = (settings.username, settings.password)
        self._seal_key: bytes | None = None
        self._service = CloudantV1(authenticator=authenticator)
        self._service.set_service_url(settings.url)
        self._service.set_http_client(_session(settings))
        self._service.set_http_config({"timeout": settings.timeout})
        # ibmcloudant gzips request bodies by default: CPU spent on every bulk write, for a
        # server that sits on the cluster's own network.
        self._service.set_enable_gzip_compression(False)
        self.url = settings.url
        self._pouchdb: bool | None = None  # PouchDB Server, told by its welcome document
        self._admin: bool | None = None  # whether the identity is a server admin, asked once

    def __enter__(self) -> CouchGateway:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the pooled connections."""
        self._service.get_http_client().close()

    def server_info(self) -> Doc:
        """`GET /`: the server's welcome document."""
        with translate_errors():
            return self._service.get_server_information().get_result()  # type: ignore[no-any-return]

    def up(self) -> None:
        """`GET /_up`: the server is up and ready to serve.

        Raises:
            CouchUnavailable: unreachable, timed out, or answering 5xx.
            AccessDenied: the credentials are refused.
        """
        try:
            with translate_errors():
                self._service.get_up_information()
        except NotFound:
            self.server_info()  # PouchDB Server has no /_up: its welcome document says it answers

    def session_name(self) -> str | None:
        """`GET /_session`: the user name CouchDB sees in our credentials (None: anonymous).

        Raises:
            AccessDenied: the credentials are refused (a wrong password: 401).
        """
        with translate_errors():
            context = self._service.get_session_information().get_result().get("userCtx") or {}
        name = context.get("name")
        return name if isinstance(name, str) else None

    def set_password(self, username: str, password: Secret) -> None:
        """Authenticate every later request with this password (the operator fixed the password file)."""
        self._service.authenticator = BasicAuthenticator(username, password.value)
        self._credentials, self._seal_key = (username, password), None

    @property
    def seal_key(self) -> bytes | None:
        """What seals design documents (`design_docs.seal`): derived once, when first asked (it is slow)."""
        if self._seal_key is None:
            self._seal_key = seal_key(*self._credentials)
        return self._seal_key

    def database_exists(self, db: str) -> bool:
        """Whether the database exists."""
        try:
            with translate_errors(db):
                self._service.head_database(db)
        except NotFound:
            return False
        return True

    def doc_count(self, db: str) -> int:
        """How many documents (live, design documents included) the database holds; 0 when it does not exist."""
        try:
            with translate_errors(db):
                return int(self._service.get_database_information(db).get_result()["doc_count"])
        except NotFound:
            return 0

    def database_info(self, db: str) -> Doc | None:
        """`GET /db`: the database's information, or None when it does not exist."""
        try:
            with translate_errors(db):
                return self._service.get_database_information(db).get_result()  # type: ignore[no-any-return]
        except NotFound:
            return None

    def update_seq(self, db: str) -> str | None:
        """Where the database's changes feed stands now (an opaque sequence), or None when it does not exist."""
        info = self.database_info(db)
        return None if info is None else str(info.get("update_seq"))

    def changed_since(self, db: str, since: str, doc_ids: Sequence[str]) -> tuple[dict[str, str | None], str]:
        """Of these documents, those changed since the sequence `since`: their winning revision now (None:
        deleted); and the sequence these changes reach, to ask from next. A cluster may replay changes
        from before `since`: more documents, never fewer.

        Raises:
            NotFound: the database does not exist.
        """
        if not doc_ids:
            return {}, since
        with translate_errors(db):
            result = self._service.post_changes(db, doc_ids=list(doc_ids), filter="_doc_ids",
                                                since=since).get_result()
        changed = {row["id"]: None if row.get("deleted") else row["changes"][0]["rev"]
                   for row in result.get("results") or () if row.get("changes")}
        return changed, str(result.get("last_seq") or since)

    def holds_documents(self, db: str) -> bool:
        """Whether the database holds a live document other than design documents (False when missing)."""
        count = self.doc_count(db)
        if count == 0:
            return False
        with translate_errors(db):
            designs = self._service.post_all_docs(db, start_key="_design/", end_key="_design0").get_result()["rows"]
        return count > len(designs)

    def is_server_admin(self) -> bool:
        """Whether the identity is a server admin (`GET /_session`, asked once)."""
        if self._admin is None:
            with translate_errors():
                context = self._service.get_session_information().get_result().get("userCtx") or {}
            self._admin = "_admin" in (context.get("roles") or [])
        return self._admin

    def create_database(self, db: str) -> None:
        """Create the database; one that already exists is fine.

        Raises:
            AccessDenied: the identity is not a server admin. Asked before the PUT: PouchDB Server's
                process crashes on a non-admin's database creation (shared/spec/servers.md).
        """
        if not self.is_server_admin():
            raise AccessDenied("access denied: only a server admin creates databases", db=db, status=403)
        try:
            with translate_errors(db):
                self._service.put_database(db)
        except CouchError as exc:
            if exc.status != 412:
                raise

    def get(self, db: str, doc_id: str) -> Doc | None:
        """The document, or None when it (or its database) does not exist or is deleted."""
        try:
            with translate_errors(db, doc_id):
                return self._service.get_document(db, doc_id).get_result()  # type: ignore[no-any-return]
        except NotFound:
            return None

    def get_many(self, db: str, doc_ids: Sequence[str]) -> dict[str, Doc]:
        """The live documents with these ids (CouchDB's winning leaf, `_conflicts` listing the others)."""
        return {doc_id: leaves[0] for doc_id, leaves in self.leaves(db, doc_ids).items()}

    def leaves(self, db: str, doc_ids: Sequence[str]) -> dict[str, list[Doc]]:
        """Every live leaf of each of these documents, CouchDB's winner first; deleted ones left out.

        A cluster accepts concurrent updates of one revision through different nodes, and a replication
        copies branches: whoever reads a document several writers touch reads all of its leaves.
        """
        if not doc_ids:
            return {}
        try:
            with translate_errors(db):
                rows = self._service.post_all_docs(db, keys=list(doc_ids), include_docs=True,
                                                   conflicts=True).get_result()["rows"]
        except NotFound:
            return {}
        return self.with_leaves(db, [row["doc"] for row in rows if row.get("doc")])

    def with_leaves(self, db: str, docs: Sequence[Doc]) -> dict[str, list[Doc]]:
        """Each document (read with `conflicts=true`) with its other live leaves after it."""
        found = {doc["_id"]: [doc] for doc in docs}
        losers = [(doc_id, rev) for doc_id, leaves in found.items() for rev in leaves[0].get("_conflicts") or ()]
        for doc_id, doc in self._revisions_of(db, losers):
            found[doc_id].append(doc)
        return found

    def revisions(self, db: str, doc_ids: Sequence[str]) -> dict[str, str]:
        """The winning revision of each of these documents that is live."""
        if not doc_ids:
            return {}
        try:
            with translate_errors(db):
                rows = self._service.post_all_docs(db, keys=list(doc_ids)).get_result()["rows"]
        except NotFound:
            return {}
        return {row["id"]: row["value"]["rev"] for row in rows
                if "value" in row and not row["value"].get("deleted")}

    def _revisions_of(self, db: str, revisions: Sequence[tuple[str, str]]) -> Iterator[tuple[str, Doc]]:
        """The bodies of these (id, revision) pairs that are live (`_bulk_get`)."""
        if not revisions:
            return
        body = json.dumps({"docs": [{"id": doc_id, "rev": rev} for doc_id, rev in revisions]})
        path = "/{}/_bulk_get".format(*self._service.encode_path_vars(db))
        with translate_errors(db):
            request = self._service.prepare_request(method="POST", url=path, data=body, headers={
                "content-type": "application/json", "Accept": "application/json"})
            results = self._service.send(request).get_result()["results"]
        for result in results:
            for entry in result.get("docs") or ():
                doc = entry.get("ok")
                if isinstance(doc, dict) and not doc.get("_deleted"):
                    yield result["id"], doc

    def range(self, db: str, start: str, end: str, *, page_size: int = 1000,
              include_docs: bool = True) -> Iterator[Doc]:
        """The live documents whose ids sort from `start` to `end`, page by page, with `_conflicts`
        (without `include_docs`, only `{"_id", "_rev"}`)."""
        after: str | None = None
        while True:
            try:
                with translate_errors(db):
                    rows = self._service.post_all_docs(
                        db, start_key=after or start, end_key=end, skip=1 if after else None, limit=page_size,
                        include_docs=include_docs, conflicts=include_docs or None).get_result()["rows"]
            except NotFound:
                return  # no database yet: nothing in it
            size, after = len(rows), rows[-1]["id"] if rows else None
            # Each row let go of as it is handed out, the page's list with it: a consumer that keeps what it
            # makes of the documents (states) does not keep their parsed JSON, several times larger, too.
            pending, rows = deque(rows), []
            while pending:
                row = pending.popleft()
                if not include_docs:
                    yield {"_id": row["id"], "_rev": row["value"]["rev"]}
                elif row.get("doc"):
                    yield row["doc"]
            if size < page_size:
                return

    def view(self, db: str, ddoc: str, view: str, keys: Sequence[Any], *, stale: bool = False) -> list[Doc]:
        """The distinct documents a view emits for these keys (with `_conflicts`); none when the database is missing.

        `stale`: the index as it is, without indexing what was written since (the documents returned are
        still their current revisions).

        Raises:
            NotFound: the database exists but the design document or view does not.
        """
        if not keys:
            return []
        try:
            with translate_errors(db, f"_design/{ddoc}"):
                rows = self._post_view(db, ddoc, view, list(keys), stale).get_result()["rows"]
        except NotFound:
            if not self.database_exists(db):
                return []
            raise
        docs = {row["id"]: row["doc"] for row in rows if row.get("doc")}
        return list(docs.values())

    def _post_view(self, db: str, ddoc: str, view: str, keys: list[Any], stale: bool) -> Any:
        if not stale:
            return self._service.post_view(db, ddoc, view, keys=keys, include_docs=True, conflicts=True)
        # CouchDB 3 reads `update: false`; PouchDB Server ignores it and honours only the older `stale: ok`.
        body: Doc = {"keys": keys, "include_docs": True, "conflicts": True}
        body.update({"stale": "ok"} if self._is_pouchdb() else {"update": "false"})
        path = "/{}/_design/{}/_view/{}".format(*self._service.encode_path_vars(db, ddoc, view))
        request = self._service.prepare_request(method="POST", url=path, data=json.dumps(body), headers={
            "content-type": "application/json", "Accept": "application/json"})
        return self._service.send(request)

    def _is_pouchdb(self) -> bool:
        if self._pouchdb is None:
            self._pouchdb = "express-pouchdb" in self.server_info()
        return self._pouchdb

    def find(self, db: str, selector: Doc, *, page_size: int = 1000,
             fields: Sequence[str] | None = None) -> Iterator[Doc]:
        """Every document matching a Mango selector, page by page; none when the database does not exist.

        Pages follow CouchDB's bookmark; a server that returns none (PouchDB Server) is paged with
        `skip` instead, so that no page is silently dropped.
        """
        bookmark: str | None = None
        skip = 0
        while True:
            try:
                with translate_errors(db):
                    page = self._service.post_find(db, selector, limit=page_size, bookmark=bookmark,
                                                   skip=None if bookmark else skip or None,
                                                   fields=list(fields) if fields else None).get_result()
            except NotFound:
                return  # no database yet: nothing in it
            docs = page.get("docs") or []
            yield from docs
            if len(docs) < page_size:
                return
            bookmark = page.get("bookmark") or None
            if bookmark is None:
                skip += len(docs)

    def bulk_write(self, db: str, docs: Sequence[Doc], *, create_database: bool = True,
                   in_flight: int = 1) -> list[WriteResult]:
        """Write documents in `_bulk_docs` of at most BULK_CHUNK each; one result per document, in order.

        A missing database is created first when `create_database` (the sync identity is an admin).
        Chunks keep each request well within the read timeout whatever an event's size. A document over
        the server's `max_document_size` is reported as its own error, `document_too_large`. `in_flight`
        chunks are sent at once (CouchDB validates each request in its own couchjs process): for one
        writer alone on a big database; the instances' writes are already concurrent, one per instance.
        Fewer documents than `in_flight` chunks would hold are shared between `in_flight` equal chunks (of
        about SHARED_CHUNK_MIN documents or more), so that they are still validated in parallel.
        """
        count = max(-(-len(docs) // BULK_CHUNK), min(in_flight, len(docs) // SHARED_CHUNK_MIN))
        size = -(-len(docs) // count) if count else BULK_CHUNK
        chunks = [docs[start:start + size] for start in range(0, len(docs), size)]
        if in_flight <= 1 or len(chunks) <= 1:
            return [result for chunk in chunks for result in self._bulk_apart(db, chunk, create_database)]
        with ThreadPoolExecutor(min(in_flight, len(chunks)), thread_name_prefix="couchsync-bulk") as pool:
            written = list(pool.map(lambda chunk: self._bulk_apart(db, chunk, create_database), chunks))
        return [result for chunk in written for result in chunk]

    def _bulk_apart(self, db: str, docs: Sequence[Doc], create_database: bool) -> list[WriteResult]:
        """`_bulk`, halving a request that CouchDB refuses whole (413: one document is over
        `max_document_size`) until the documents too large are alone; nothing of a 413 request is written."""
        try:
            return self._bulk(db, docs, create_database)
        except CouchError as exc:
            if exc.status != 413:
                raise
            if len(docs) == 1:
                return [WriteResult(doc_id=docs[0].get("_id", ""), error="document_too_large", reason=str(exc))]
        middle = len(docs) // 2
        return self._bulk_apart(db, docs[:middle], create_database) + self._bulk_apart(
            db, docs[middle:], create_database)

    def max_document_size(self) -> int | None:
        """The server's `max_document_size` in bytes, or None when the identity may not read it (a server
        admin may), it is not set, or the server has no such setting (PouchDB Server)."""
        request = self._service.prepare_request(method="GET", url="/_node/_local/_config/couchdb/max_document_size",
                                                headers={"Accept": "application/json"})
        try:
            with translate_errors():
                value = self._service.send(request).get_result()
            return int(value)
        except (CouchError, TypeError, ValueError):
            return None

    def _bulk(self, db: str, docs: Sequence[Doc], create_database: bool) -> list[WriteResult]:
        try:
            with translate_errors(db):
                rows = self._service.post_bulk_docs(db, {"docs": list(docs)}).get_result()
        except NotFound:
            if not create_database:
                raise
            self.create_database(db)
            return self._bulk(db, docs, False)
        return [WriteResult(doc_id=row.get("id", doc.get("_id", "")), rev=row.get("rev"),
                            error=row.get("error"), reason=row.get("reason"))
                for row, doc in zip(rows, docs)]

    def design_revision(self, db: str, name: str) -> str | None:
        """The revision of `_design/<name>` (a HEAD: no body), or None when it or its database is missing."""
        try:
            with translate_errors(db, f"_design/{name}"):
                headers = self._service.head_design_document(db, name).get_headers()
        except NotFound:
            return None
        etag = headers.get("ETag") or headers.get("etag") or ""
        return etag.strip('"') or None

    def db_updates(self, since: str, *, timeout: float) -> tuple[list[Doc], str]:
        """One longpoll of the server's `_db_updates` feed: the events after `since` ("now" for none), and
        the sequence to ask from next. Returns early as soon as there is an event.

        Raises:
            NotFound: the server keeps no feed (CouchDB without `_global_changes`).
            CouchError: the server does not serve the feed (PouchDB Server answers 400).
        """
        # A request of our own: the SDK's get_db_updates logs a deprecation warning at every poll.
        with translate_errors("_db_updates"):
            params = {"feed": "longpoll", "since": since, "timeout": int(timeout * 1000)}
            request = self._service.prepare_request(method="GET", url="/_db_updates", params=params,
                                                    headers={"Accept": "application/json"})
            result = self._service.send(request).get_result()
        return list(result.get("results") or []), str(result.get("last_seq") or since)

    def get_local(self, db: str, doc_id: str) -> Doc | None:
        """The `_local/<doc_id>` document (never replicated, never validated), or None."""
        try:
            with translate_errors(db, f"_local/{doc_id}"):
                return _json(self._service.get_local_document(db, doc_id).get_result())
        except NotFound:
            return None

    def put_local(self, db: str, doc_id: str, body: Doc) -> str:
        """Put `_local/<doc_id>` (give the `_rev` read, if any); returns the new revision."""
        with translate_errors(db, f"_local/{doc_id}"):
            result = _json(self._service.put_local_document(db, doc_id, body).get_result())
        return str(result.get("rev", ""))

    def find_sorted(self, db: str, selector: Doc, sort_field: str, *, limit: int,
                    fields: Sequence[str]) -> list[Doc]:
        """One page of a Mango query sorted on an indexed field, ascending (page by a `$gt` on that field)."""
        try:
            with translate_errors(db):
                page = self._service.post_find(db, selector, sort=[{sort_field: "asc"}], limit=limit,
                                               fields=list(fields)).get_result()
        except NotFound:
            return []
        return list(page.get("docs") or [])

    def get_design(self, db: str, name: str) -> Doc | None:
        """`_design/<name>`, or None when it or its database does not exist."""
        try:
            with translate_errors(db, f"_design/{name}"):
                return self._service.get_design_document(db, name).get_result()  # type: ignore[no-any-return]
        except NotFound:
            return None

    def put_design(self, db: str, name: str, body: Doc) -> str:
        """Put `_design/<name>`; returns the new revision."""
        with translate_errors(db, f"_design/{name}"):
            result = self._service.put_design_document(db, name, body).get_result()
        return str(result["rev"])

    def ensure_index(self, db: str, index: MangoIndex) -> str:
        """Create the Mango index unless it exists: CouchDB's answer, "created" or "exists"."""
        with translate_errors(db, f"_design/{index.name}"):
            result = self._service.post_index(db, {"fields": list(index.fields)}, ddoc=index.name,
                                              name=index.name, type="json").get_result()
        return str(result.get("result", "created"))

    def index_fields(self, db: str, name: str) -> tuple[str, ...] | None:
        """The fields of the JSON index `name` in `_design/<name>`; None when it or the database is missing."""
        try:
            with translate_errors(db, "_index"):
                indexes = self._service.get_indexes_information(db).get_result()["indexes"]
        except NotFound:
            return None
        for index in indexes:
            if index.get("name") == name and index.get("ddoc") == f"_design/{name}":
                return tuple(field for entry in index["def"]["fields"] for field in entry)
        return None
