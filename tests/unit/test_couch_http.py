"""HTTP edge cases of the gateway, with `responses`: the error mapping and the retry counts."""

import json
import time

import pytest
import requests
import responses

from couchsync.config import CouchSettings, Secret
from couchsync.couch import BULK_CHUNK, SHARED_CHUNK_MIN, CouchGateway
from couchsync.errors import AccessDenied, CouchUnavailable, DocumentConflict, NotFound

URL = "http://couch.test:5984"
DB = "alice-acme-twake-app/io-cozy-contacts"
DB_PATH = f"{URL}/alice-acme-twake-app%2Fio-cozy-contacts"


@pytest.fixture
def couch():
    settings = CouchSettings(URL, "couchsync", Secret("pw-never-shown"), timeout=2, http_retries=3,
                             http_backoff=0)
    with CouchGateway(settings) as gateway:
        yield gateway


@responses.activate
def test_a_5xx_is_retried_then_succeeds(couch):
    doc = responses.get(f"{DB_PATH}/c1", status=503, json={"error": "unavailable"})
    responses.get(f"{DB_PATH}/c1", json={"_id": "c1", "_rev": "1-a"})
    assert couch.get(DB, "c1") == {"_id": "c1", "_rev": "1-a"}
    assert doc.call_count == 1 and len(responses.calls) == 2


@responses.activate
def test_a_persistent_5xx_becomes_couch_unavailable_after_the_retries(couch):
    responses.post(f"{DB_PATH}/_bulk_docs", status=500, json={"error": "internal"})
    with pytest.raises(CouchUnavailable) as caught:
        couch.bulk_write(DB, [{"_id": "c1"}])
    assert len(responses.calls) == 4  # the request and three retries
    assert caught.value.retryable and caught.value.db == DB


@responses.activate
def test_429_is_retried_like_a_5xx(couch):
    responses.get(f"{DB_PATH}/c1", status=429, json={"error": "too_many_requests"})
    with pytest.raises(CouchUnavailable):
        couch.get(DB, "c1")
    assert len(responses.calls) == 4


@responses.activate
def test_a_timeout_becomes_couch_unavailable_without_the_password(couch):
    responses.get(f"{DB_PATH}/c1", body=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(CouchUnavailable) as caught:
        couch.get(DB, "c1")
    assert "pw-never-shown" not in str(caught.value) and caught.value.doc_id == "c1"


@responses.activate
def test_a_connection_error_becomes_couch_unavailable(couch):
    responses.get(f"{URL}/", body=requests.exceptions.ConnectionError("refused"))
    with pytest.raises(CouchUnavailable):
        couch.server_info()


@responses.activate
def test_an_answer_cut_short_is_passing_like_a_connection_error(couch):
    # Seen on a loaded CouchDB cluster: the node closed the connection mid-body. Dead-lettered as a lasting
    # failure before, it is retried now.
    responses.post(f"{DB_PATH}/_bulk_docs", body=requests.exceptions.ChunkedEncodingError("connection broken"))
    with pytest.raises(CouchUnavailable) as caught:
        couch.bulk_write(DB, [{"_id": "c1"}])
    assert caught.value.retryable


@responses.activate
def test_401_becomes_access_denied_and_is_not_retried(couch):
    responses.post(f"{DB_PATH}/_bulk_docs", status=401,
                   json={"error": "unauthorized", "reason": "Name or password is incorrect."})
    with pytest.raises(AccessDenied) as caught:
        couch.bulk_write(DB, [{"_id": "c1"}])
    assert len(responses.calls) == 1 and not caught.value.retryable
    assert "pw-never-shown" not in str(caught.value)


@responses.activate
def test_409_on_a_design_document_becomes_document_conflict(couch):
    responses.put(f"{DB_PATH}/_design/couchsync", status=409, json={"error": "conflict"})
    with pytest.raises(DocumentConflict) as caught:
        couch.put_design(DB, "couchsync", {"views": {}})
    assert caught.value.retryable and caught.value.doc_id == "_design/couchsync"


@responses.activate
def test_bulk_write_gives_one_result_per_document_conflicts_and_refusals_included(couch):
    responses.post(f"{DB_PATH}/_bulk_docs", json=[
        {"id": "a", "rev": "2-x"},
        {"id": "b", "error": "conflict", "reason": "Document update conflict."},
        {"id": "c", "error": "forbidden", "reason": "managed documents are the directory's"}])
    results = couch.bulk_write(DB, [{"_id": "a"}, {"_id": "b"}, {"_id": "c"}])
    assert [(r.doc_id, r.ok, r.conflict) for r in results] == [("a", True, False), ("b", False, True),
                                                               ("c", False, False)]
    assert results[2].error == "forbidden"


@responses.activate
def test_chunks_written_at_once_give_their_results_in_document_order(couch):
    def answer(request):
        time.sleep(0.05 if json.loads(request.body)["docs"][0]["_id"] == "d00000" else 0)  # the first ends last
        rows = [{"id": doc["_id"], "rev": "1-x"} for doc in json.loads(request.body)["docs"]]
        return 201, {}, json.dumps(rows)
    responses.add_callback(responses.POST, f"{DB_PATH}/_bulk_docs", callback=answer, content_type="application/json")
    docs = [{"_id": f"d{n:05d}"} for n in range(2 * BULK_CHUNK + 1)]
    results = couch.bulk_write(DB, docs, in_flight=2)
    assert [result.doc_id for result in results] == [doc["_id"] for doc in docs]
    assert len(responses.calls) == 3 and all(result.ok for result in results)


@responses.activate
def test_documents_written_in_flight_are_shared_between_chunks_sent_at_once(couch):
    sizes: list[int] = []

    def answer(request):
        docs = json.loads(request.body)["docs"]
        sizes.append(len(docs))
        return 201, {}, json.dumps([{"id": doc["_id"], "rev": "1-x"} for doc in docs])
    responses.add_callback(responses.POST, f"{DB_PATH}/_bulk_docs", callback=answer, content_type="application/json")
    docs = [{"_id": f"d{n:05d}"} for n in range(3 * SHARED_CHUNK_MIN)]
    assert all(result.ok for result in couch.bulk_write(DB, docs, in_flight=2))
    assert sorted(sizes) == [3 * SHARED_CHUNK_MIN // 2] * 2  # fewer than a whole chunk, still two at once
    sizes.clear()
    couch.bulk_write(DB, docs[:SHARED_CHUNK_MIN + 1], in_flight=2)
    assert sizes == [SHARED_CHUNK_MIN + 1]  # halves would be under the smallest chunk worth a request
    sizes.clear()
    couch.bulk_write(DB, docs)
    assert sizes == [3 * SHARED_CHUNK_MIN]


@responses.activate
def test_bulk_write_creates_a_missing_database_once(couch):
    responses.post(f"{DB_PATH}/_bulk_docs", status=404,
                   json={"error": "not_found", "reason": "Database does not exist."})
    responses.get(f"{URL}/_session", json={"ok": True, "userCtx": {"name": "couchsync", "roles": ["_admin"]}})
    responses.put(DB_PATH, status=201, json={"ok": True})
    responses.post(f"{DB_PATH}/_bulk_docs", json=[{"id": "a", "rev": "1-x"}])
    assert couch.bulk_write(DB, [{"_id": "a"}])[0].ok
    assert [call.request.method for call in responses.calls] == ["POST", "GET", "PUT", "POST"]


@responses.activate
def test_an_identity_that_is_no_server_admin_never_asks_to_create_a_database(couch):
    # PouchDB Server's process crashes on a non-admin's PUT /db: the gateway asks who it is first.
    responses.get(f"{URL}/_session", json={"ok": True, "userCtx": {"name": "couchsync", "roles": ["staff"]}})
    with pytest.raises(AccessDenied, match="only a server admin creates databases"):
        couch.create_database(DB)
    with pytest.raises(AccessDenied):
        couch.create_database(DB)
    assert [call.request.method for call in responses.calls] == ["GET"]  # asked once, no PUT


@responses.activate
def test_find_follows_bookmarks(couch):
    pages = [{"docs": [{"_id": "1"}, {"_id": "2"}], "bookmark": "b1"},
             {"docs": [{"_id": "3"}, {"_id": "4"}], "bookmark": "b2"},
             {"docs": [{"_id": "5"}], "bookmark": "b3"}]
    for page in pages:
        responses.post(f"{DB_PATH}/_find", json=page)
    assert [d["_id"] for d in couch.find(DB, {"x": 1}, page_size=2)] == ["1", "2", "3", "4", "5"]
    sent = [json.loads(call.request.body) for call in responses.calls]
    assert [body.get("bookmark") for body in sent] == [None, "b1", "b2"]
    assert all("skip" not in body for body in sent)


@responses.activate
def test_find_falls_back_to_skip_when_the_server_returns_no_bookmark(couch):
    for page in ([{"_id": "1"}, {"_id": "2"}], [{"_id": "3"}, {"_id": "4"}], []):
        responses.post(f"{DB_PATH}/_find", json={"docs": page})
    assert [d["_id"] for d in couch.find(DB, {"x": 1}, page_size=2)] == ["1", "2", "3", "4"]
    assert [json.loads(call.request.body).get("skip") for call in responses.calls] == [None, 2, 4]


@responses.activate
def test_a_missing_document_or_database_reads_as_none_and_view_as_empty(couch):
    responses.get(f"{DB_PATH}/c1", status=404, json={"error": "not_found", "reason": "missing"})
    responses.post(f"{DB_PATH}/_design/couchsync/_view/lookup", status=404, json={"error": "not_found"})
    responses.head(DB_PATH, status=404)
    assert couch.get(DB, "c1") is None
    assert couch.view(DB, "couchsync", "lookup", [["email", "x"]]) == []


@responses.activate
def test_a_missing_view_in_an_existing_database_is_not_found(couch):
    responses.post(f"{DB_PATH}/_design/couchsync/_view/lookup", status=404, json={"error": "not_found"})
    responses.head(DB_PATH, status=200)
    with pytest.raises(NotFound):
        couch.view(DB, "couchsync", "lookup", [["email", "x"]])


@responses.activate
def test_a_bulk_write_refused_whole_for_a_document_too_large_is_halved_until_that_document_is_alone(couch):
    # CouchDB answers 413 for the whole `_bulk_docs` when one document is over max_document_size.
    json_type = {"Content-Type": "application/json"}

    def answer(request):
        docs = json.loads(request.body)["docs"]
        if any(doc["_id"] == "big" for doc in docs):
            return 413, json_type, json.dumps({"error": "document_too_large", "reason": "big"})
        return 201, json_type, json.dumps([{"id": doc["_id"], "rev": "1-x"} for doc in docs])
    responses.add_callback(responses.POST, f"{DB_PATH}/_bulk_docs", callback=answer)
    results = couch.bulk_write(DB, [{"_id": "a"}, {"_id": "big"}, {"_id": "c"}, {"_id": "d"}])
    assert [(r.doc_id, r.error) for r in results] == [("a", None), ("big", "document_too_large"), ("c", None),
                                                      ("d", None)]
    assert len(responses.calls) == 5  # all four, then a+big, then a, big, and c+d


@responses.activate
def test_the_servers_document_size_limit_is_read_from_its_configuration_when_the_identity_may(couch):
    path = f"{URL}/_node/_local/_config/couchdb/max_document_size"
    responses.get(path, json="8000000")
    assert couch.max_document_size() == 8000000
    responses.replace(responses.GET, path, status=403, json={"error": "forbidden"})
    assert couch.max_document_size() is None
