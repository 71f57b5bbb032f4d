"""Design documents couchsync installs, built from the files in `design_docs/`, and their deployment.

The sources are package data: the repository's top-level `design_docs/` ships in the wheel as the
package `couchsync.design_sources` (setup.cfg), read through `importlib.resources`, so an installed
couchsync needs no checkout. `load(source)` reads them once; `--design-docs` (environment
`COUCHSYNC_DESIGN_DOCS`) names another folder instead, an override for trying a changed protection.
They are:

    contacts-lookup.map.js        the `couchsync/lookup` view of every io.cozy.contacts database
    protection.validate.js        the validate_doc_update of every contacts and groups database
    state.validate.js             the validate_doc_update of couchsync's directory state database
    global-*.index.json           the Mango indexes of the global database (`_index` request bodies)

Deployment compares before it writes, so an unchanged design document gets no new revision.

Every design document carries the version of couchsync that wrote it (`couchsync_version`), and one is
never replaced by an older couchsync's (`ensure` answers "newer" and leaves it): during a rolling upgrade
the old and the new workers' guards do not put their own protections back in turn. A folder given by
`--design-docs` may hold a file `VERSION` naming the version its documents stand for (a changed protection
tried beside the installed one); without it, they are couchsync's own version. A design document without
a version (written before versions were stamped) counts as older than any.

A version number is only a claim: a second server admin could stamp a permissive protection "99.0" to
have every guard leave it. So each design document is sealed (`couchsync_seal`, an HMAC of its content
keyed by the sync identity's credentials, which every worker shares and no other admin has), and only a
newer document whose seal holds is left; any other is replaced. Without credentials (a server that asks
for none) nothing is sealed and no newer document is trusted.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from couchsync import __version__
from couchsync.config import SyncIdentity
from couchsync.couch import CouchGateway, MangoIndex
from couchsync.documents import CONTACTS, GROUPS, database_name, doctype_of_database
from couchsync.errors import ConfigError, CouchError, CouchsyncError, DocumentConflict

LOOKUP_DDOC = "couchsync"
LOOKUP_VIEW = "lookup"
PROTECTION_DDOC = "couchsync-protection"
PACKAGE = "couchsync.design_sources"  # design_docs/ as the wheel ships it
# The files `load` reads, by name or by pattern: what a built wheel must hold (tests/unit/test_wheel.py).
LOOKUP_SOURCE, PROTECTION_SOURCE, STATE_SOURCE = "contacts-lookup.map.js", "protection.validate.js", "state.validate.js"
INDEX_PATTERN = "global-*.index.json"
VERSION_SOURCE = "VERSION"  # in an override folder only: the version its documents stand for
VERSION_FIELD = "couchsync_version"  # in every design document: the version of couchsync that wrote it
SEAL_FIELD = "couchsync_seal"  # in every design document written with credentials: see `seal`
NEWER = "newer"  # what `ensure` answers for a design document a newer couchsync wrote: left as it is
# Where the sync identity goes in protection.validate.js: valid JavaScript as it stands (null lets
# nobody write managed documents), so the file runs unrendered too.
IDENTITY_MARKER = "/* couchsync:identity */ null"

Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DesignDocs:
    """The design documents, ready to put (the protection once given the sync identity)."""

    lookup: Doc                            # `_design/couchsync` of every io.cozy.contacts database
    validation_source: str                 # protection.validate.js, identity not rendered yet
    global_indexes: tuple[MangoIndex, ...]  # `by-orgid`, `by-orgdomain`
    state_validation_source: str = ""      # state.validate.js, identity not rendered yet
    version: str = __version__             # stamped in every design document as VERSION_FIELD

    def protection(self, identity: SyncIdentity) -> Doc:
        """`_design/couchsync-protection`, letting only `identity` write managed documents."""
        return _rendered(self.validation_source, identity, self.version)

    def state_target(self, state_db: str, identity: SyncIdentity) -> Target:
        """couchsync's directory state database, which only `identity` writes."""
        return Target(state_db, ((PROTECTION_DDOC, _rendered(self.state_validation_source, identity, self.version)),))

    def instance_targets(self, prefix: str, protection: Doc) -> tuple[Target, Target]:
        """An instance's contacts and groups databases, with the design documents each must hold."""
        guard = (PROTECTION_DDOC, protection)
        return (Target(database_name(prefix, CONTACTS), (guard, (LOOKUP_DDOC, self.lookup))),
                Target(database_name(prefix, GROUPS), (guard,)))

    def database_target(self, db: str, protection: Doc) -> Target | None:
        """The target of one database found by its name (a contacts or groups database), else None."""
        doctype = doctype_of_database(db)
        if doctype is None:
            return None
        contacts, groups = self.instance_targets(db.rpartition("/")[0], protection)
        return contacts if doctype == CONTACTS else groups

    def global_target(self, global_db: str) -> Target:
        """The global instances database, with its indexes."""
        return Target(global_db, indexes=self.global_indexes)


def _rendered(source: str, identity: SyncIdentity, version: str) -> Doc:
    rendered = json.dumps({"names": list(identity.names), "roles": list(identity.roles)}, sort_keys=True)
    return {"language": "javascript", "validate_doc_update": source.replace(IDENTITY_MARKER, rendered),
            VERSION_FIELD: version}


def version_key(version: object) -> tuple[int, ...]:
    """The order of a version: its release numbers ("0.10.1" → (0, 10, 1)); none at all comes first.

    A pre-release counts as its release ("0.2.0rc1" as 0.2.0). Bounded: a stored version is anyone's input.
    """
    release = re.match(r"\d{1,9}(?:\.\d{1,9}){0,9}", version[:100]) if isinstance(version, str) else None
    return tuple(int(number) for number in release.group().split(".")) if release else ()


def is_newer(current: Doc, body: Doc, key: bytes | None) -> bool:
    """Whether a stored design document (with its `_id`) was written by a newer couchsync than `body`'s:
    a higher version, sealed with `key` (a version number alone anyone who may write design documents
    can forge)."""
    newer = version_key(current.get(VERSION_FIELD)) > version_key(body.get(VERSION_FIELD))
    if not newer or key is None:
        return False
    found = str(current.get(SEAL_FIELD, "")).encode("utf-8", "replace")
    return hmac.compare_digest(found, seal(str(current.get("_id", "")), current, key).encode())


def seal(doc_id: str, body: Doc, key: bytes) -> str:
    """The design document's seal: an HMAC of its id and content keyed by the sync identity's credentials.

    Every couchsync worker logs in as the sync identity, so each version can tell a newer version's
    protection from one a second admin wrote with a higher version number to have it left in place. The
    id is sealed too: a genuine lookup document copied over a protection is no protection.
    """
    content = json.dumps([doc_id, _content(body)], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, content.encode(), hashlib.sha256).hexdigest()


def sealed(doc_id: str, body: Doc, key: bytes | None) -> Doc:
    """`body` with its seal (as it is without credentials: nothing to key a seal with)."""
    return body if key is None else {**_content(body), SEAL_FIELD: seal(doc_id, body, key)}


def _content(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if not k.startswith("_") and k != SEAL_FIELD}


def _read(path: Traversable) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"design document source {path} cannot be read: {exc.strerror}") from exc


def _index(path: Traversable) -> MangoIndex:
    try:
        body = json.loads(_read(path))
        name, fields = body["name"], body["index"]["fields"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not an _index body with a name and index.fields") from exc
    if body.get("ddoc", name) != name or not all(isinstance(field, str) for field in fields):
        raise ConfigError(f"{path}: the index must live in the design document of its name, on plain fields")
    return MangoIndex(name, tuple(fields))


def packaged() -> Traversable:
    """The design document sources shipped with couchsync."""
    return resources.files(PACKAGE)


def describe(source: Path | None) -> str:
    """Where the design documents come from, for the worker's first log line."""
    return f"override {source}" if source is not None else f"package {PACKAGE}"


def load(source: Path | None = None) -> DesignDocs:
    """The design documents built from the files in `source`, the packaged ones by default.

    Raises:
        ConfigError: a file is missing, unreadable or malformed.
    """
    folder: Traversable = packaged() if source is None else source
    version = _read(folder / VERSION_SOURCE).strip() if (folder / VERSION_SOURCE).is_file() else __version__
    if not version_key(version):
        raise ConfigError(f"{folder / VERSION_SOURCE} names no version (numbers, as in 0.2.0)")
    lookup = {"language": "javascript", "views": {LOOKUP_VIEW: {"map": _read(folder / LOOKUP_SOURCE).strip()}},
              VERSION_FIELD: version}
    validation, state = (_validation(folder / name) for name in (PROTECTION_SOURCE, STATE_SOURCE))
    indexes = tuple(_index(path) for path in sorted(_matching(folder, INDEX_PATTERN), key=lambda path: path.name))
    return DesignDocs(lookup=lookup, validation_source=validation, global_indexes=indexes,
                      state_validation_source=state, version=version)


def _matching(folder: Traversable, pattern: str) -> list[Traversable]:
    """The files of `folder` whose names match `pattern` (a Traversable has no glob)."""
    try:
        return [path for path in folder.iterdir() if path.is_file() and fnmatch.fnmatch(path.name, pattern)]
    except OSError as exc:
        raise ConfigError(f"design document folder {folder} cannot be read: {exc.strerror}") from exc


def _validation(path: Traversable) -> str:
    source = _read(path).strip()
    if not source.startswith("function") or source.count(IDENTITY_MARKER) != 1:
        # PouchDB Server evaluates `return <source>`: a leading comment would return nothing.
        raise ConfigError(f"{path} must start with `function` and hold {IDENTITY_MARKER!r} once")
    return source


def same_body(current: Doc, body: Doc) -> bool:
    """Whether a stored design document is `body` (CouchDB's `_id`, `_rev`, the seal and the like set aside)."""
    return _content(current) == _content(body)


def ensure(couch: CouchGateway, db: str, name: str, body: Doc, *, dry_run: bool = False,
           replace_newer: bool = False) -> str:
    """Put `_design/<name>` unless it already has this body: "installed", "updated" or "unchanged"; or
    NEWER, left as it is, when a newer couchsync wrote it (two versions side by side in an upgrade),
    unless `replace_newer` (a rollback)."""
    current = couch.get_design(db, name)
    if current is not None and same_body(current, body):
        return "unchanged"
    if current is not None and not replace_newer and is_newer(current, body, couch.seal_key):
        return NEWER
    body = sealed(f"_design/{name}", body, couch.seal_key)
    if not dry_run:
        try:
            couch.put_design(db, name, {**body, "_rev": current["_rev"]} if current else body)
        except DocumentConflict:
            # Someone installed it meanwhile (the worker's guard, another worker's first lookup): as good,
            # when it is this very body.
            again = couch.get_design(db, name)
            if again is not None and not replace_newer and is_newer(again, body, couch.seal_key):
                return NEWER
            if again is None or not same_body(again, body):
                raise
            return "unchanged"
    return "updated" if current else "installed"


def ensure_index(couch: CouchGateway, db: str, index: MangoIndex, *, dry_run: bool = False) -> str:
    """Create the Mango index unless it exists with these fields: "installed", "updated" or "unchanged"."""
    current = couch.index_fields(db, index.name)
    if current == index.fields:
        return "unchanged"
    if not dry_run:
        couch.ensure_index(db, index)
    return "updated" if current is not None else "installed"


@dataclass(frozen=True, slots=True)
class Target:
    """A database and the design documents and indexes it must hold."""

    db: str
    ddocs: tuple[tuple[str, Doc], ...] = ()
    indexes: tuple[MangoIndex, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What deploying did (or, in a dry run, would do) to one database."""

    db: str
    results: tuple[tuple[str, str], ...] = ()  # (`_design/<name>`, "installed" | "updated" | "unchanged")
    missing: bool = False                      # the database does not exist and was left so
    created: bool = False
    error: str | None = None


def deploy(couch: CouchGateway, target: Target, *, dry_run: bool = False, create_missing: bool = False,
           replace_newer: bool = False) -> Outcome:
    """Bring one database's design documents up to date; a failure is reported, not raised."""
    created = False
    try:
        if not couch.database_exists(target.db):
            if not create_missing:
                return Outcome(target.db, missing=True)
            if not dry_run:
                couch.create_database(target.db)
            created = True
        results = [(f"_design/{name}", ensure(couch, target.db, name, body, dry_run=dry_run,
                                              replace_newer=replace_newer))
                   for name, body in target.ddocs]
        results += [(f"_design/{index.name}", ensure_index(couch, target.db, index, dry_run=dry_run))
                    for index in target.indexes]
    except CouchsyncError as exc:
        return Outcome(target.db, created=created, error=str(exc))
    return Outcome(target.db, tuple(results), created=created)


def create_protected(couch: CouchGateway, target: Target) -> None:
    """Create a database with its design documents (its protection), as a write that found it missing does.

    Raises:
        CouchError: it could not be created or protected.
    """
    outcome = deploy(couch, target, create_missing=True)
    if outcome.error is not None:
        raise CouchError(f"not created with its protection: {outcome.error}", db=target.db)


def deploy_all(couch: CouchGateway, targets: Sequence[Target], *, concurrency: int, dry_run: bool = False,
               create_missing: bool = False, replace_newer: bool = False) -> Iterator[Outcome]:
    """Deploy to many databases at once (`concurrency` at a time); outcomes in the targets' order."""
    with ThreadPoolExecutor(concurrency, thread_name_prefix="couchsync-deploy") as pool:
        futures = [pool.submit(deploy, couch, target, dry_run=dry_run, create_missing=create_missing,
                               replace_newer=replace_newer) for target in targets]
        for future in futures:
            yield future.result()


MISSING, DIFFERS = "missing", "differs"


def findings(outcome: Outcome) -> list[tuple[str, str]]:
    """What a dry-run outcome says is wrong: (`_design/<name>`, "missing" | "differs") for each design
    document that deploying would install or update."""
    named = {"installed": MISSING, "updated": DIFFERS}
    return [(ddoc, named[status]) for ddoc, status in outcome.results if status in named]
