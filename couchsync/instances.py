"""InstanceDirectory: which instances an organization has, read from the global instances database.

Lookups go through the `by-orgid` and `by-orgdomain` Mango indexes and page with bookmarks (see
`CouchGateway.find`), so an organization of any size is listed completely.

The global database is input too. A record is used only when its `domain` and `prefix` are valid
instance names (`instance_name`) and no other usable record maps to the same databases; a record that
fails either rule is skipped, reported once (a WARNING and `on_rejected`), and never stops the others.
An organization with several candidates for its organization instance is refused as a whole
(`AmbiguousOrganization`, naming them) by whatever takes that instance as its reference.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from couchsync.couch import CouchGateway, MangoIndex
from couchsync.documents import SETTINGS, SETTINGS_DOC_ID, database_name
from couchsync.errors import AmbiguousOrganization

logger = logging.getLogger(__name__)

_FIELDS = ("_id", "domain", "prefix", "org_id", "org_domain", "deleting", "moved", "blocked")
# A host name, with a port perhaps: labels of letters, digits, `-` and `_`, the first starting with a
# letter (a CouchDB database name must). No `/` (it would reach other databases), no leading `_`
# (CouchDB's own `_users`, `_replicator`), no empty label.
_NAME = re.compile(r"[a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)*(?::[0-9]{1,5})?")
MAX_NAME = 200  # database names are at most 238 characters, and a doctype follows the prefix
INVALID = "invalid"
SHARED = "shared_databases"
CLAIMS_TTL = 300.0  # seconds a view of which record uses which databases is kept


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

    @property
    def databases(self) -> str:
        """What this instance's database names start with: two instances with the same share them."""
        return database_name(self.prefix, "")


def organization_instance(instances: Iterable[Instance]) -> Instance | None:
    """The organization instance among the instances of one organization; None when there is none.

    Raises:
        AmbiguousOrganization: several could be it (a stranger's `acme.evil.test` for org `acme`).
    """
    candidates = [instance for instance in instances if instance.is_organization_instance]
    if len(candidates) > 1:
        raise AmbiguousOrganization(f"organization {candidates[0].org_id!r} has several organization instances",
                                    sorted(instance.domain for instance in candidates))
    return candidates[0] if candidates else None


def instance_name(value: object) -> str | None:
    """`value` as an instance name (lower case), or None when it is not one."""
    if not isinstance(value, str):
        return None
    name = value.strip().lower()
    return name if len(name) <= MAX_NAME and _NAME.fullmatch(name) else None


def instance_from_doc(doc: dict[str, Any]) -> Instance | None:
    """The instance a global document describes; None when it is being deleted, moved or blocked.

    Raises:
        ValueError: the record is not usable (the message says which field); nothing is written for it.
    """
    if doc.get("deleting") or doc.get("moved") or doc.get("blocked"):
        return None
    domain = instance_name(doc.get("domain"))
    if domain is None:
        raise ValueError(f"domain {_shown(doc.get('domain'))} is not an instance name")
    prefix = doc.get("prefix") or domain
    if instance_name(prefix) is None:
        raise ValueError(f"prefix {_shown(prefix)} is not an instance name")
    org_id, org_domain = doc.get("org_id") or "", doc.get("org_domain") or None
    if not isinstance(org_id, str) or not (org_domain is None or isinstance(org_domain, str)):
        raise ValueError("org_id or org_domain is not a string")
    return Instance(domain=domain, prefix=str(prefix).strip(), org_id=org_id, org_domain=org_domain)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


class InstanceDirectory:
    """Finds instances in the global database (`global/instances` by default)."""

    def __init__(self, couch: CouchGateway, global_db: str, *, indexes: Sequence[MangoIndex] = (),
                 page_size: int = 1000, on_rejected: Callable[[str], None] | None = None,
                 claims_ttl: float = CLAIMS_TTL) -> None:
        self._couch = couch
        self._global_db = global_db
        self._indexes = tuple(indexes)  # `by-orgid`, `by-orgdomain`, from design_docs/
        self._page_size = page_size
        self._indexed = False
        self._on_rejected = on_rejected  # called with INVALID or SHARED, once per record and problem
        self._reported: set[tuple[str, str]] = set()
        self._claims_ttl = claims_ttl
        self._claims: dict[str, set[str]] = {}  # databases prefix → ids of the usable records using them
        self._claimed_by: dict[str, str] = {}  # record id → its databases prefix
        self._claims_at = -claims_ttl
        self._lock = threading.RLock()  # a refresh reports the invalid records it reads

    def ensure_indexes(self) -> None:
        """Create the global database's indexes where they are missing (idempotent)."""
        for index in self._indexes:
            self._couch.ensure_index(self._global_db, index)
        self._indexed = True

    def _records(self, selector: dict[str, Any]) -> Iterator[tuple[str, Instance]]:
        """The usable, valid records a selector finds, with their ids; invalid ones reported."""
        if not self._indexed:
            # Once per process: without them every lookup scans the global database. CouchDB
            # answers "exists" where the stack already made them.
            self.ensure_indexes()
        for doc in self._couch.find(self._global_db, selector, page_size=self._page_size, fields=_FIELDS):
            record_id = str(doc.get("_id"))
            try:
                instance = instance_from_doc(doc)
            except ValueError as exc:
                self._report(record_id, INVALID, str(exc))
                continue
            if instance is not None:
                yield record_id, instance

    def _find(self, selector: dict[str, Any], *, whole: bool = False) -> list[Instance]:
        """The instances a selector finds, those sharing databases with another record left out
        (`whole`: the selector finds every record, no other needs to be read)."""
        found = list(self._records(selector))
        users: dict[str, set[str]] = {}
        for record_id, instance in found:
            users.setdefault(instance.databases, set()).add(record_id)
        claims = {} if whole else self._cluster_claims({record_id for record_id, _ in found})
        usable = []
        for record_id, instance in found:
            sharing = users[instance.databases] | claims.get(instance.databases, set())
            if len(sharing) > 1:
                others = ", ".join(sorted(sharing - {record_id}))
                self._report(record_id, SHARED, f"{instance.domain} would share the databases "
                                                f"{instance.databases}* with record(s) {others}")
            else:
                usable.append(instance)
        return usable

    def _cluster_claims(self, record_ids: set[str]) -> dict[str, set[str]]:
        """Which records use which databases, over the whole global database: read again when older
        than the TTL or when it does not know one of `record_ids` (a record added since)."""
        with self._lock:
            stale = time.monotonic() - self._claims_at > self._claims_ttl
            if stale or not record_ids <= self._claimed_by.keys():
                claims: dict[str, set[str]] = {}
                claimed_by: dict[str, str] = {}
                for record_id, instance in self._records({"domain": {"$gt": None}}):
                    claims.setdefault(instance.databases, set()).add(record_id)
                    claimed_by[record_id] = instance.databases
                self._claims, self._claimed_by, self._claims_at = claims, claimed_by, time.monotonic()
            return self._claims

    def _report(self, record_id: str, problem: str, detail: str) -> None:
        """Log a skipped record once per process, and count it."""
        with self._lock:
            if (record_id, problem) in self._reported:
                return
            self._reported.add((record_id, problem))
        logger.warning("skipped the instance record %s of %s: %s", record_id, self._global_db, detail)
        if self._on_rejected is not None:
            self._on_rejected(problem)

    def every_instance(self) -> Iterator[Instance]:
        """Every usable instance of the cluster."""
        return iter(self._find({"domain": {"$gt": None}}, whole=True))

    def organizations(self, after: str = "") -> Iterator[str]:
        """Every organization id that some instance record names, in order, those up to `after` left out.

        Pages on the `by-orgid` index by `org_id > last id seen`: each page brings at least one new
        organization whatever its size, and a page is never read twice. Records are not checked here;
        reconciling an organization reads its usable instances.
        """
        if not self._indexed:
            self.ensure_indexes()
        while True:
            docs = self._couch.find_sorted(self._global_db, {"org_id": {"$gt": after}}, "org_id",
                                           limit=self._page_size, fields=("org_id",))
            ids = sorted({doc["org_id"] for doc in docs if isinstance(doc.get("org_id"), str) and doc["org_id"]})
            yield from ids
            if len(docs) < self._page_size or not ids:
                return
            after = ids[-1]

    def instance(self, domain: str) -> Instance | None:
        """The usable instance with this domain, if any."""
        return next(iter(self._find({"domain": domain.strip().lower()})), None)

    def instances_of(self, org_id: str, *, one_reference: bool = True) -> list[Instance]:
        """Every usable instance of the organization, the organization instance included.

        Raises:
            AmbiguousOrganization: several could be its organization instance (when `one_reference`:
                events, bootstraps and reconcile take it as their reference; only a deployment need not).
        """
        instances = self._find({"org_id": org_id})
        if one_reference:
            organization_instance(instances)
        return instances

    def organization_of_domain(self, org_domain: str) -> str | None:
        """The organization id that has this custom domain, if any instance says so.

        Raises:
            AmbiguousOrganization: instances of several organizations say so.
        """
        found = sorted({instance.org_id for instance in self._find({"org_domain": org_domain.strip().lower()})
                        if instance.org_id})
        if len(found) > 1:
            raise AmbiguousOrganization(f"the domain {org_domain!r} is claimed by several organizations", found)
        return found[0] if found else None

    def settings(self, instance: Instance) -> dict[str, Any] | None:
        """The instance's settings document (its owner's `email`, `public_name`, `phone`), if any."""
        return self._couch.get(instance.database(SETTINGS), SETTINGS_DOC_ID)

    def owner_email(self, instance: Instance) -> str | None:
        """The email of the instance's owner, from its settings document."""
        email = (self.settings(instance) or {}).get("email")
        return email.strip() if isinstance(email, str) and email.strip() else None
