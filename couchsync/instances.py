"""InstanceDirectory: which instances an organization has, read from the global instances database.

Lookups go through the `by-orgid` and `by-orgdomain` Mango indexes and page with bookmarks (see
`CouchGateway.find`), so an organization of any size is listed completely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from couchsync.couch import CouchGateway, MangoIndex
from couchsync.documents import SETTINGS, SETTINGS_DOC_ID, database_name

logger = logging.getLogger(__name__)

_FIELDS = ("_id", "domain", "prefix", "org_id", "org_domain", "deleting", "moved", "blocked")


@dataclass(frozen=True, slots=True)
class Instance:
    """One Cozy instance: its domain, the prefix of its databases, its organization."""

    domain: str
    prefix: str
    org_id: str
    org_domain: str | None = None

    @property
    def is_organization_instance(self) -> bool:
        """Whether this is the organization's own instance (first domain label = organization id)."""
        return self.domain.split(".", 1)[0] == self.org_id

    def database(self, doctype: str) -> str:
        """The name of this instance's database for a doctype."""
        return database_name(self.prefix, doctype)


def instance_from_doc(doc: dict[str, Any]) -> Instance | None:
    """The instance a global document describes; None when it is being deleted, moved or blocked."""
    if doc.get("deleting") or doc.get("moved") or doc.get("blocked") or not doc.get("domain"):
        return None
    domain = str(doc["domain"]).strip().lower()
    return Instance(domain=domain, prefix=str(doc.get("prefix") or domain),
                    org_id=str(doc.get("org_id") or ""), org_domain=doc.get("org_domain") or None)


class InstanceDirectory:
    """Finds instances in the global database (`global/instances` by default)."""

    def __init__(self, couch: CouchGateway, global_db: str, *, indexes: Sequence[MangoIndex] = (),
                 page_size: int = 1000) -> None:
        self._couch = couch
        self._global_db = global_db
        self._indexes = tuple(indexes)  # `by-orgid`, `by-orgdomain`, from design_docs/
        self._page_size = page_size
        self._indexed = False

    def ensure_indexes(self) -> None:
        """Create the global database's indexes where they are missing (idempotent)."""
        for index in self._indexes:
            self._couch.ensure_index(self._global_db, index)
        self._indexed = True

    def _find(self, selector: dict[str, Any]) -> Iterator[Instance]:
        if not self._indexed:
            # Once per process: without them every lookup scans the global database. CouchDB
            # answers "exists" where the stack already made them.
            self.ensure_indexes()
        for doc in self._couch.find(self._global_db, selector, page_size=self._page_size, fields=_FIELDS):
            instance = instance_from_doc(doc)
            if instance is not None:
                yield instance

    def every_instance(self) -> Iterator[Instance]:
        """Every usable instance of the cluster, page by page."""
        return self._find({"domain": {"$gt": None}})

    def instance(self, domain: str) -> Instance | None:
        """The usable instance with this domain, if any."""
        return next(self._find({"domain": domain.strip().lower()}), None)

    def instances_of(self, org_id: str) -> list[Instance]:
        """Every usable instance of the organization, the organization instance included."""
        return list(self._find({"org_id": org_id}))

    def organization_of_domain(self, org_domain: str) -> str | None:
        """The organization id that has this custom domain, if any instance says so."""
        for instance in self._find({"org_domain": org_domain.strip().lower()}):
            if instance.org_id:
                return instance.org_id
        return None

    def settings(self, instance: Instance) -> dict[str, Any] | None:
        """The instance's settings document (its owner's `email`, `public_name`, `phone`), if any."""
        return self._couch.get(instance.database(SETTINGS), SETTINGS_DOC_ID)

    def owner_email(self, instance: Instance) -> str | None:
        """The email of the instance's owner, from its settings document."""
        email = (self.settings(instance) or {}).get("email")
        return email.strip() if isinstance(email, str) and email.strip() else None
