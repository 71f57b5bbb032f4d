"""Design documents couchsync installs, built from the files in `design_docs/`, and their deployment.

The folder is found once, by `load(source)`: the CLI passes `--design-docs` (environment
`COUCHSYNC_DESIGN_DOCS`), which defaults to the `design_docs/` folder of the checkout couchsync runs
from. Deployment compares before it writes, so an unchanged design document gets no new revision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from couchsync.couch import CouchGateway
from couchsync.errors import ConfigError

LOOKUP_DDOC = "couchsync"
LOOKUP_VIEW = "lookup"
DEFAULT_SOURCE = Path(__file__).resolve().parent.parent / "design_docs"

Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DesignDocs:
    """The design documents, ready to put."""

    lookup: Doc  # `_design/couchsync` of every io.cozy.contacts database


def _read(source: Path, name: str) -> str:
    try:
        return (source / name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"design document source {source / name} cannot be read: {exc.strerror}") from exc


def load(source: Path = DEFAULT_SOURCE) -> DesignDocs:
    """The design documents built from the files in `source`.

    Raises:
        ConfigError: a file is missing or unreadable.
    """
    lookup_map = _read(source, "contacts-lookup.map.js")
    lookup = {"language": "javascript", "views": {LOOKUP_VIEW: {"map": lookup_map.strip()}}}
    return DesignDocs(lookup=lookup)


def ensure(couch: CouchGateway, db: str, name: str, body: Doc, *, dry_run: bool = False) -> str:
    """Put `_design/<name>` unless it already has this body: "installed", "updated" or "unchanged"."""
    current = couch.get_design(db, name)
    if current is not None and {k: v for k, v in current.items() if not k.startswith("_")} == body:
        return "unchanged"
    if not dry_run:
        couch.put_design(db, name, {**body, "_rev": current["_rev"]} if current else body)
    return "updated" if current else "installed"
