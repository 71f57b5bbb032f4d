"""The guard reconciles an instance (`on_restored`) only where it saw the protection in place before."""

from __future__ import annotations

import itertools
from typing import Any

from couchsync import design_docs
from couchsync.config import SyncIdentity
from couchsync.guard import CREATED, UPDATED, ProtectionGuard

DB = "alice-acme-twake-app/io-cozy-contacts"


class FakeCouch:
    """The design documents of existing databases, with revisions, as the guard reads and writes them."""

    seal_key = None  # a server without credentials: nothing sealed

    def __init__(self) -> None:
        self.designs: dict[tuple[str, str], dict[str, Any]] = {}
        self._revs = itertools.count(1)

    def database_exists(self, db: str) -> bool:
        return True

    def design_revision(self, db: str, name: str) -> str | None:
        found = self.designs.get((db, name))
        return None if found is None else str(found["_rev"])

    def get_design(self, db: str, name: str) -> dict[str, Any] | None:
        found = self.designs.get((db, name))
        return None if found is None else dict(found)

    def put_design(self, db: str, name: str, body: dict[str, Any]) -> str:
        rev = f"{next(self._revs)}-x"
        self.designs[(db, name)] = {**body, "_id": f"_design/{name}", "_rev": rev}
        return rev


def guard(couch: FakeCouch, repaired: list[str]) -> ProtectionGuard:
    return ProtectionGuard(couch, None, design_docs.load(), SyncIdentity(("couchsync",), ()),  # type: ignore[arg-type]
                           "couchsync/directory", on_restored=repaired.append)


def test_a_database_never_protected_and_first_met_by_the_feed_is_protected_without_a_repair():
    couch, repaired = FakeCouch(), []
    assert guard(couch, repaired).check({DB: UPDATED}) == 1  # put in place (counted as put back)
    assert couch.design_revision(DB, design_docs.PROTECTION_DDOC) is not None
    assert repaired == []


def test_a_protection_the_guard_saw_in_place_then_deleted_is_put_back_and_its_instance_repaired():
    couch, repaired = FakeCouch(), []
    watching = guard(couch, repaired)
    assert watching.check({DB: CREATED}) == 0  # a first install
    assert watching.check({DB: UPDATED}) == 0  # unchanged: nothing to do
    del couch.designs[(DB, design_docs.PROTECTION_DDOC)]
    assert watching.check({DB: UPDATED}) == 1
    assert repaired == [DB]
