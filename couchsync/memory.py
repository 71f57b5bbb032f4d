"""Whether an organization's directory state is still the one couchsync wrote (pure: no I/O).

The state database is couchsync's memory, and memory can go without the directory going: the
database deleted under a running worker, a state document purged by a second server admin. An empty
or partial state must not be taken for an empty directory, so before each event or batch the
organization's marker document (`org-<h>:organization`) is read with the database's identity. The
marker records that identity as it was when the state was seeded: its `instance_start_time` and its
purge count. A missing marker, another start time or purges since, and the state is seeded again from
the organization instance (a join at the lowest stamp: whatever the state still holds wins). Nothing is
kept in memory, so a worker started after the loss sees it as well as one that ran through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MISSING, RECREATED, PURGED = "missing", "recreated", "purged"  # why a state is seeded (a metric's label)
MARKER_DATABASE = "database"  # the marker's record of the database's identity


@dataclass(frozen=True, slots=True)
class DatabaseIdentity:
    """What tells one state database from another of the same name, and a purged one from itself."""

    start: str = ""  # instance_start_time: "0" on CouchDB 3 (where a missing marker tells a new database)
    purges: int = 0  # purges the database has seen (CouchDB 3 prefixes its purge_seq with their count)

    @classmethod
    def of(cls, info: dict[str, Any]) -> DatabaseIdentity:
        """The identity `GET /db` describes (an empty one for a database that does not exist)."""
        return cls(str(info.get("instance_start_time", "")), purge_count(info.get("purge_seq")))

    def recorded(self) -> dict[str, Any]:
        """As the marker records it."""
        return {"instanceStartTime": self.start, "purges": self.purges}


def purge_count(purge_seq: Any) -> int:
    """The number of purges a `purge_seq` says (an integer, or `N-<opaque>` on a CouchDB 3 cluster)."""
    if isinstance(purge_seq, int):
        return purge_seq
    head = str(purge_seq or "0").split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def seed_reason(marker: dict[str, Any] | None, identity: DatabaseIdentity) -> str | None:
    """Why the organization's state must be seeded again before an event is merged; None: it is whole."""
    if marker is None:
        return MISSING
    recorded = marker.get(MARKER_DATABASE)
    if not isinstance(recorded, dict):
        recorded = {}  # a marker of a couchsync that recorded nothing: no purge since, as far as it knew
    if str(recorded.get("instanceStartTime", identity.start)) != identity.start:
        return RECREATED
    purges = recorded.get("purges", 0)
    if identity.purges > (purges if isinstance(purges, int) else 0):
        return PURGED
    return None
