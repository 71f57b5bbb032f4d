"""A large organization directory as couchsync itself would have written it, for tests and benchmarks.

The documents are built with couchsync's own pure functions (the memory of each group, the managed
contacts and their relationships), so that seeding thousands of them takes a few bulk writes instead of
thousands of events. Person i is in group i % groups, and every tenth person in the next group too.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import localcouch
from couchsync.documents import managed_group_id, with_group
from couchsync.events import GroupEventKind, Member, event_stamp
from couchsync.plan import group_doc, upsert_contact
from couchsync.state import GroupState

STAMP = event_stamp(datetime(2026, 6, 16, 10, 0, tzinfo=timezone.utc), GroupEventKind.MEMBERS_ADDED, {"seed": True})


def email(org_id: str, i: int) -> str:
    return f"person{i:06d}@{org_id}.example"


def groups_of(i: int, groups: int) -> list[int]:
    return sorted({i % groups, (i + 1) % groups} if i % 10 == 0 else {i % groups})


def group_docs(org_id: str, contacts: int, groups: int) -> Iterator[dict[str, Any]]:
    """The organization's managed groups, as the stack's own consumer writes them (no state of couchsync's:
    the first event or bootstrap takes them over)."""
    members: list[list[str]] = [[] for _ in range(groups)]
    for i in range(contacts):
        for g in groups_of(i, groups):
            members[g].append(email(org_id, i))
    for g in range(groups):
        state = GroupState(org_id, f"group-{g}", alive=True,
                           values={"name": f"Group {g}", "description": f"Team {g}", "color": "#3366FF",
                                   "createdAt": "2026-06-16T10:00:00Z"},
                           stamps={key: STAMP for key in ("exists", "name", "description", "color", "createdAt")},
                           members={address: (STAMP, True) for address in members[g]})
        yield group_doc(state, None)


def contact_docs(org_id: str, contacts: int, groups: int) -> Iterator[dict[str, Any]]:
    """The organization's managed contacts, related to their groups."""
    for i in range(contacts):
        member = Member(email(org_id, i), username=f"person{i}", first_name="Person", last_name=f"{i:06d}",
                        workplace_fqdn=f"person{i:06d}.{org_id}.example")
        doc = upsert_contact(None, member, org_id)
        for g in groups_of(i, groups):
            doc = with_group(doc, managed_group_id(org_id, f"group-{g}"), True)
        yield doc


def chunks(docs: Iterator[dict[str, Any]], size: int = 1000) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def seed(couch: localcouch.LocalCouch, groups_db: str, contacts_db: str, org_id: str, contacts: int,
         groups: int) -> None:
    """Write the directory into these databases of an instance, as the stack's admin.

    Raises:
        RuntimeError: a document was not written.
    """
    for db, docs in ((groups_db, group_docs(org_id, contacts, groups)),
                     (contacts_db, contact_docs(org_id, contacts, groups))):
        for chunk in chunks(docs):
            failed = [row for row in localcouch.bulk(couch, db, chunk) if "error" in row]
            if failed:
                raise RuntimeError(f"{len(failed)} documents not written, the first: {failed[0]}")
