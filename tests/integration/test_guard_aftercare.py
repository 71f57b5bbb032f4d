"""The guard keeps the lookup view too, and reconciles an instance at once when it puts its protection back.

Apache CouchDB only: the guard follows `_db_updates` (PouchDB Server has no feed; its sweep is tested
in test_ops).
"""

from __future__ import annotations

import time

import localcouch
from couchsync.documents import CONTACTS, managed_contact_id

from tests.integration.test_memory import ADDED, BOB, CREATED, apply
from tests.integration.test_ops import following, needs_feed, protection_rev
from tests.integration.test_worker import DOMAINS, seed, start_worker, wait_until  # noqa: F401 (a fixture)

LOOKUP = "_design/couchsync"


def test_a_tampered_lookup_view_is_put_back_within_5s_and_counted(
        world, start_worker, record_property):  # noqa: F811 (the fixture)
    needs_feed(world)
    world.protected = True
    seed(world)
    worker = start_worker(world, COUCHSYNC_SETTLE_DELAY="0")
    wait_until(lambda: following(worker), 30, "the worker follows _db_updates")
    path = f"{localcouch.db_path(world.db(DOMAINS[1], CONTACTS))}/{LOOKUP}"
    view = world.server.request("GET", path).json()
    view["views"]["lookup"]["map"] = "function (doc) {}"  # hides every contact from couchsync
    tampered = time.monotonic()
    assert world.server.request("PUT", path, json=view).ok
    wait_until(lambda: world.server.request("GET", path).json()["views"]["lookup"]["map"] != "function (doc) {}",
               5, "the lookup view is put back")
    record_property("seconds_lookup_back", round(time.monotonic() - tampered, 3))
    wait_until(lambda: worker.metrics().get("couchsync_lookup_restored_total") == 1, 5, "it is counted")
    assert worker.metrics().get("couchsync_protection_restored_total") == 0


def test_a_contact_edited_while_the_protection_was_deleted_is_repaired_within_10s_of_its_return(
        world, start_worker, record_property):  # noqa: F811 (the fixture)
    needs_feed(world)
    world.protected = True
    seed(world)
    apply(world, CREATED, ADDED)
    worker = start_worker(world, COUCHSYNC_SETTLE_DELAY="0")
    wait_until(lambda: following(worker), 30, "the worker follows _db_updates")
    contacts = world.db(DOMAINS[1], CONTACTS)  # alice's instance: bob's contact there
    bob_path = f"{localcouch.db_path(contacts)}/{managed_contact_id('acme', BOB['email'])}"
    directory_version = world.server.request("GET", bob_path).json()
    for _ in range(5):  # the guard may be quicker than the edit: then delete and edit again
        rev = protection_rev(world, contacts)
        world.server.request("DELETE", f"{localcouch.db_path(contacts)}/_design/couchsync-protection",
                             params={"rev": rev})
        edited = world.server.request("GET", bob_path).json() | {"fullname": "Not Bob", "displayName": "Not Bob"}
        if world.server.request("PUT", bob_path, json=edited).status_code == 201:
            break
    else:
        raise AssertionError("the edit never got in while the protection was deleted")
    wait_until(lambda: protection_rev(world, contacts) is not None, 5, "the protection is back")
    back = time.monotonic()
    wait_until(lambda: world.server.request("GET", bob_path).json()["fullname"] == directory_version["fullname"],
               10, "bob's contact is the directory's again")
    record_property("seconds_contact_repaired", round(time.monotonic() - back, 3))
    assert "reconciled after its protection was put back" in worker.log.read_text()
