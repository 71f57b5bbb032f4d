"""The validate_doc_update of design_docs/protection.validate.js, run in Node.js (no server), as deployed.

One table: who writes (the sync identity by name or by role, a second server admin, a user, nobody),
the document before and after, and the rule that refuses the write (None: accepted). Every rule is
checked on both sides, for create, update, strip, forge and delete, and for replicated revisions.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from couchsync import config, design_docs
from couchsync.couch import MangoIndex
from couchsync.errors import ConfigError

RUNNER = Path(__file__).with_name("run_validate_doc_update.js")
IDENTITY = config.load_identity(["couchsync"], ["directory-sync"])

SYNC = {"name": "couchsync", "roles": ["_admin"]}
SYNC_BY_ROLE = {"name": "directory-bot", "roles": ["directory-sync"]}
ADMIN = {"name": "admin", "roles": ["_admin"]}  # the stack's own server admin
USER = {"name": "carol", "roles": []}
NOBODY = {"name": None, "roles": []}

ENGINEERING = {"_id": "b2b-group-eff7808d5b54bb721b52529759597c29", "_type": "io.cozy.contacts.groups"}
OWN_GROUP = {"_id": "tennis-club", "_type": "io.cozy.contacts.groups"}
CONTACT_TAG = {"managed": True, "kind": "contact", "organizationId": "acme", "email": "bob@acme.com"}
CONTACT = {"_id": "b2b-contact-0123", "_rev": "1-a", "fullname": "Bob Martin",
           "email": [{"address": "bob@acme.com", "primary": True}],
           "relationships": {"groups": {"data": [ENGINEERING]}}, "twakeDirectory": CONTACT_TAG}
GROUP = {"_id": ENGINEERING["_id"], "_rev": "1-a", "name": "Engineering",
         "twakeDirectory": {"managed": True, "kind": "group", "organizationId": "acme", "externalId": "engineering"}}
PERSONAL = {"_id": "mum", "_rev": "1-a", "fullname": "Mum", "email": [{"address": "mum@example.org"}]}
LOOSE_TAG = {**PERSONAL, "_id": "released", "twakeDirectory": {"managed": False, "note": "left the directory"}}
SQUAT = {"_id": CONTACT["_id"], "_rev": "1-s", "fullname": "x"}  # an untagged document at a derived id


def new(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as a creation sends it (no revision)."""
    return {k: v for k, v in doc.items() if k != "_rev"}


def edit(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The next revision of the document with top-level changes (None removes a field)."""
    result = {**copy.deepcopy(doc), **changes}
    return {k: v for k, v in result.items() if v is not None}


def groups(doc: dict[str, Any], *refs: dict[str, str]) -> dict[str, Any]:
    return edit(doc, relationships={"groups": {"data": list(refs)}})


def deletion(doc: dict[str, Any], *, with_body: bool = False) -> dict[str, Any]:
    """DELETE sends only the id and revision; a client may also send the whole body with _deleted."""
    return {**(doc if with_body else {"_id": doc["_id"], "_rev": doc["_rev"]}), "_deleted": True}


def replicated(doc: dict[str, Any]) -> dict[str, Any]:
    """A revision as a replicator or PouchDB pushes it (new_edits=false): with its _revisions."""
    return {**doc, "_rev": "2-b", "_revisions": {"start": 2, "ids": ["b", "a"]}}


@dataclass(frozen=True)
class Write:
    name: str
    user: dict[str, Any]
    old: dict[str, Any] | None
    new: dict[str, Any]
    refused_by: str | None  # the rule named in the 403's reason; None: the write is accepted


WRITES = [
    # create
    Write("a user creates a managed contact", USER, None, new(CONTACT), "managed-create"),
    Write("a second server admin creates a managed group", ADMIN, None, new(GROUP), "managed-create"),
    Write("an anonymous client creates a managed contact", NOBODY, None, new(CONTACT), "managed-create"),
    Write("a user creates a document with an unmanaged twakeDirectory", USER, None, new(LOOSE_TAG), "tag-forge"),
    Write("a user creates a personal contact", USER, None, new(PERSONAL), None),
    Write("a user creates a personal contact in their own group", USER, None, groups(new(PERSONAL), OWN_GROUP), None),
    Write("a user creates a personal contact in a managed group", USER, None, groups(new(PERSONAL), ENGINEERING),
          "managed-relationship"),
    Write("the sync identity creates a managed contact", SYNC, None, new(CONTACT), None),
    Write("the sync identity by role creates a managed group", SYNC_BY_ROLE, None, new(GROUP), None),
    # update a managed document
    Write("a user renames a managed contact", USER, CONTACT, edit(CONTACT, fullname="Bobby"), "managed-change"),
    Write("a second server admin renames a managed group", ADMIN, GROUP, edit(GROUP, name="Eng"), "managed-change"),
    Write("a user adds a field to a managed contact", USER, CONTACT, edit(CONTACT, note="hi"), "managed-change"),
    Write("a user puts a managed group in their own group", USER, GROUP, groups(GROUP, OWN_GROUP), "managed-change"),
    Write("a user changes the organization in twakeDirectory", USER, CONTACT,
          edit(CONTACT, twakeDirectory={**CONTACT_TAG, "organizationId": "evil"}), "tag-change"),
    Write("a user unsets twakeDirectory.managed", USER, CONTACT,
          edit(CONTACT, twakeDirectory={**CONTACT_TAG, "managed": False}), "tag-change"),
    Write("a user strips twakeDirectory from a managed contact", USER, CONTACT,
          edit(CONTACT, twakeDirectory=None), "tag-strip"),
    Write("a second server admin strips twakeDirectory from a managed group", ADMIN, GROUP,
          edit(GROUP, twakeDirectory=None), "tag-strip"),
    Write("a user puts a managed contact in their own group", USER, CONTACT,
          groups(CONTACT, OWN_GROUP, ENGINEERING), None),
    Write("a user takes a managed contact out of their own group", USER, groups(CONTACT, OWN_GROUP, ENGINEERING),
          groups(CONTACT, ENGINEERING), None),
    Write("a user relates a managed contact that had no relationships", USER, edit(CONTACT, relationships=None),
          groups(CONTACT, OWN_GROUP), None),
    Write("a user takes a managed contact out of a managed group", USER, CONTACT, groups(CONTACT),
          "managed-relationship"),
    Write("a user puts a managed contact in another managed group", USER, CONTACT,
          groups(CONTACT, ENGINEERING, {"_id": "b2b-group-ffff", "_type": "io.cozy.contacts.groups"}),
          "managed-relationship"),
    Write("a user breaks a managed contact's relationship list", USER, CONTACT,
          edit(CONTACT, relationships={"groups": {"data": "tennis-club"}}), "managed-change"),
    Write("a client re-sends a managed contact with its keys in another order", USER, CONTACT,
          dict(reversed(list(edit(CONTACT, _rev="1-a").items()))), None),
    Write("the sync identity renames a managed contact", SYNC, CONTACT, edit(CONTACT, fullname="Robert"), None),
    Write("the sync identity takes a contact out of a managed group", SYNC, CONTACT, groups(CONTACT), None),
    Write("the sync identity by role strips twakeDirectory", SYNC_BY_ROLE, CONTACT,
          edit(CONTACT, twakeDirectory=None), None),
    # update an unmanaged document
    Write("a user edits a personal contact", USER, PERSONAL, edit(PERSONAL, fullname="Mother"), None),
    Write("a user forges a managed twakeDirectory on a personal contact", USER, PERSONAL,
          edit(PERSONAL, twakeDirectory=CONTACT_TAG), "tag-forge"),
    Write("a second server admin forges twakeDirectory on a personal contact", ADMIN, PERSONAL,
          edit(PERSONAL, twakeDirectory={"managed": False}), "tag-forge"),
    Write("a user changes an unmanaged twakeDirectory", USER, LOOSE_TAG,
          edit(LOOSE_TAG, twakeDirectory={"managed": False}), "tag-change"),
    Write("a user strips an unmanaged twakeDirectory", USER, LOOSE_TAG, edit(LOOSE_TAG, twakeDirectory=None),
          "tag-strip"),
    Write("a user puts a personal contact in a managed group", USER, PERSONAL, groups(PERSONAL, ENGINEERING),
          "managed-relationship"),
    Write("a user puts a personal contact in their own group", USER, PERSONAL, groups(PERSONAL, OWN_GROUP), None),
    Write("the sync identity forges twakeDirectory on a personal contact", SYNC, PERSONAL,
          edit(PERSONAL, twakeDirectory=CONTACT_TAG), None),
    # delete
    Write("a user deletes a managed contact", USER, CONTACT, deletion(CONTACT), "managed-delete"),
    Write("a second server admin deletes a managed group", ADMIN, GROUP, deletion(GROUP), "managed-delete"),
    Write("a user deletes a managed contact, sending its body", USER, CONTACT, deletion(CONTACT, with_body=True),
          "managed-delete"),
    Write("a user deletes a personal contact", USER, PERSONAL, deletion(PERSONAL), None),
    Write("a user deletes a personal contact related to a managed group", USER, groups(PERSONAL, ENGINEERING),
          deletion(groups(PERSONAL, ENGINEERING)), None),
    Write("a user deletes a document with an unmanaged twakeDirectory", USER, LOOSE_TAG, deletion(LOOSE_TAG), None),
    Write("a user deletes a personal contact with a forged managed tag", USER, PERSONAL,
          deletion(edit(PERSONAL, twakeDirectory=CONTACT_TAG), with_body=True), "tag-forge"),
    Write("the sync identity deletes a managed group, keeping its memory", SYNC, GROUP,
          deletion(GROUP, with_body=True), None),
    # replicated revisions (what PouchDB apps and _replicate send)
    Write("a replicated revision renames a managed contact", USER, CONTACT, replicated(edit(CONTACT, fullname="B")),
          "managed-change"),
    Write("a replicated revision strips twakeDirectory", ADMIN, CONTACT, replicated(edit(CONTACT, twakeDirectory=None)),
          "tag-strip"),
    Write("a replicated tombstone deletes a managed contact", USER, CONTACT, replicated(deletion(CONTACT)),
          "managed-delete"),
    Write("a replicated new managed document", USER, None, replicated(new(CONTACT)), "managed-create"),
    Write("a replicated revision adds a managed contact to the user's own group", USER, CONTACT,
          replicated(groups(CONTACT, OWN_GROUP, ENGINEERING)), None),
    Write("a replicated revision of a personal contact", USER, PERSONAL, replicated(edit(PERSONAL, fullname="M")),
          None),
    # the ids couchsync derives are reserved to it (issue 18, findings 1 and 2)
    Write("a user squats a managed contact's id with a personal contact", USER, None, new(SQUAT), "reserved-id"),
    Write("a second server admin writes a disjoint untagged branch at a managed group's id", ADMIN, None,
          {**new(edit(GROUP, twakeDirectory=None, name="hijacked")), "_rev": "5-e",
           "_revisions": {"start": 5, "ids": ["e", "d", "c", "b", "x"]}}, "reserved-id"),
    Write("a second server admin writes a disjoint tombstone at a managed contact's id", ADMIN, None,
          {"_id": CONTACT["_id"], "_rev": "3-z", "_deleted": True, "_revisions": {"start": 3, "ids": ["z", "y", "x"]}},
          "reserved-id"),
    Write("a user edits a document squatting a reserved id", USER, SQUAT, edit(SQUAT, fullname="y"), "reserved-id"),
    Write("a user deletes a document squatting a reserved id", USER, SQUAT, deletion(SQUAT), None),
    Write("the sync identity writes at a reserved id over a squat", SYNC, SQUAT, edit(CONTACT, _rev="1-s"), None),
    # over the tombstone of a deleted managed group (the sync keeps its memory there)
    Write("a user writes over a managed group's tombstone", USER, deletion(GROUP, with_body=True),
          new(edit(GROUP, twakeDirectory=None)), "tag-strip"),
    Write("a user revives a managed group's tombstone as it was", USER, deletion(GROUP, with_body=True), GROUP,
          "managed-change"),
]


def run_in_node(source: str, writes: list[Write]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node, "Node.js is needed to run the validation function (scripts/setup installs it)"
    cases = [{"newDoc": w.new, "oldDoc": w.old, "userCtx": w.user} for w in writes]
    done = subprocess.run([node, str(RUNNER)], input=json.dumps({"source": source, "cases": cases}),
                          capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(done.stdout))


@pytest.fixture(scope="module")
def verdicts() -> dict[str, dict[str, Any]]:
    source = design_docs.load().protection(IDENTITY)["validate_doc_update"]
    return {write.name: verdict for write, verdict in zip(WRITES, run_in_node(source, WRITES))}


def test_the_table_names_each_write_once():
    assert len({write.name for write in WRITES}) == len(WRITES)


@pytest.mark.parametrize("write", WRITES, ids=[write.name for write in WRITES])
def test_protection(write: Write, verdicts):
    verdict = verdicts[write.name]
    if write.refused_by is None:
        assert verdict == {"ok": True}
    else:
        assert set(verdict) == {"forbidden"}, verdict
        assert verdict["forbidden"].startswith(f"couchsync {write.refused_by}: "), verdict


def test_every_rule_is_seen_refusing_and_every_kind_of_writer_accepted_somewhere():
    rules = {write.refused_by for write in WRITES} - {None}
    assert rules == {"managed-create", "managed-change", "managed-delete", "managed-relationship",
                     "tag-forge", "tag-strip", "tag-change", "reserved-id"}
    accepted_users = {write.user["name"] for write in WRITES if write.refused_by is None}
    assert {"couchsync", "directory-bot", "carol"} <= accepted_users


def test_unrendered_the_function_lets_nobody_write_managed_documents():
    source = design_docs.load().validation_source
    sync_write = Write("sync", SYNC, None, new(CONTACT), "managed-create")
    personal = Write("personal", USER, None, new(PERSONAL), None)
    verdicts = run_in_node(source, [sync_write, personal])
    assert verdicts[0]["forbidden"].startswith("couchsync managed-create: ")
    assert verdicts[1] == {"ok": True}


def test_the_identity_is_rendered_as_json_in_place_of_the_marker():
    rendered = design_docs.load().protection(IDENTITY)["validate_doc_update"]
    assert design_docs.IDENTITY_MARKER not in rendered
    assert 'var identity = {"names": ["couchsync"], "roles": ["directory-sync"]};' in rendered


def test_a_validation_source_that_does_not_start_with_function_is_refused(tmp_path):
    # PouchDB Server evaluates `return <source>`: a leading comment would make it return nothing.
    for name in ("contacts-lookup.map.js", "global-by-orgid.index.json", "state.validate.js"):
        (tmp_path / name).write_text((design_docs.packaged() / name).read_text())
    source = (design_docs.packaged() / "protection.validate.js").read_text()
    (tmp_path / "protection.validate.js").write_text("// a comment first\n" + source)
    with pytest.raises(ConfigError, match="must start with `function`"):
        design_docs.load(tmp_path)
    (tmp_path / "protection.validate.js").write_text(source)
    assert design_docs.load(tmp_path).global_indexes == (MangoIndex("by-orgid", ("org_id",)),)
