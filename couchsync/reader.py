"""InstanceReader: what planning reads from an instance, shared by every use case.

Contacts are found by id where couchsync knows it, else through the `couchsync/lookup` view
(installed where an instance's database lacks it); owners' emails are cached for a while, since an
event may touch thousands of instances and an owner changes their email rarely.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from cachetools import TTLCache

from couchsync import design_docs
from couchsync.couch import CouchGateway
from couchsync.design_docs import LOOKUP_DDOC, LOOKUP_VIEW, DesignDocs
from couchsync.documents import CONTACTS, ContactLookup, Doc, choose_leaf, is_managed, lookup_keys
from couchsync.errors import NotFound
from couchsync.instances import Instance, InstanceDirectory

OWNER_CACHE_SECONDS = 600  # an instance's owner email changes rarely; re-read it every 10 minutes


class InstanceReader:
    """Reads contacts and owners of instances through a CouchGateway (thread-safe)."""

    def __init__(self, couch: CouchGateway, directory: InstanceDirectory, design: DesignDocs) -> None:
        self._couch = couch
        self._directory = directory
        self._design = design
        self._owners: TTLCache[str, str | None] = TTLCache(maxsize=100_000, ttl=OWNER_CACHE_SECONDS)
        self._owners_lock = threading.Lock()

    def contacts(self, instance: Instance, keys: Sequence[list[str]], organization_id: str, *,
                 stale: bool = False) -> list[Doc]:
        """The distinct contacts the lookup view emits for these keys (see `documents.lookup_keys`), each
        the leaf `documents.choose_leaf` picks. `stale`: as the view was last indexed (see `CouchGateway.view`).
        """
        db = instance.database(CONTACTS)
        try:
            docs = self._couch.view(db, LOOKUP_DDOC, LOOKUP_VIEW, keys, stale=stale)
        except NotFound:
            # The database exists without our view (a new instance): install it, once.
            design_docs.ensure(self._couch, db, LOOKUP_DDOC, self._design.lookup)
            docs = self._couch.view(db, LOOKUP_DDOC, LOOKUP_VIEW, keys)
        return _chosen(self._couch.with_leaves(db, docs), organization_id)

    def documents(self, instance: Instance, doctype: str, doc_ids: Sequence[str],
                  organization_id: str) -> dict[str, Doc]:
        """The live documents with these ids, each the leaf `documents.choose_leaf` picks."""
        chosen = _chosen(self._couch.leaves(instance.database(doctype), doc_ids), organization_id)
        return {doc["_id"]: doc for doc in chosen}

    def find(self, instance: Instance, lookup: ContactLookup) -> list[Doc]:
        """The contacts a lookup names: the known people's own contacts, and candidates for the others.

        A view answers only once it has indexed every write since its last query: in an instance that
        receives events, that is most of what a query costs (PouchDB Server indexes about a thousand
        contacts a second). A person couchsync gave a contact has it under the id couchsync derives,
        which is their match (`documents.match_contact`): every person's is read by its id, in one
        request. The view is asked for the others (personal or external contacts to adopt or respect, a
        contact adopted under another id) and for the groups' related contacts. An unmanaged document
        found at a derived id is kept too: planning refuses to create over it.
        """
        org = lookup.organization_id
        at_own_ids = list(self.documents(instance, CONTACTS, lookup.own_ids(), org).values())
        found = {doc["_id"] for doc in at_own_ids if is_managed(doc)}
        rest = lookup.others(found)
        keys = lookup_keys([email for email, _ in rest], [host for _, host in rest], lookup.group_ids)
        seen = {doc["_id"] for doc in at_own_ids}
        return at_own_ids + [doc for doc in self.contacts(instance, keys, org) if doc["_id"] not in seen]

    def owner_email(self, instance: Instance) -> str | None:
        """The email of the instance's owner (its settings), cached for OWNER_CACHE_SECONDS."""
        with self._owners_lock:
            if instance.domain in self._owners:
                return self._owners[instance.domain]
        email = self._directory.owner_email(instance)
        with self._owners_lock:
            self._owners[instance.domain] = email
        return email


def _chosen(leaves: dict[str, list[Doc]], organization_id: str) -> list[Doc]:
    return [doc for doc in (choose_leaf(found, organization_id) for found in leaves.values()) if doc is not None]
