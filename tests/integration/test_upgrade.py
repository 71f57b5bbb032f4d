"""A rolling upgrade: two workers whose protections differ (the packaged one, and a newer one from a
`--design-docs` folder naming version 9.0.0) run side by side for two minutes while events are applied:
the newer protection stays in every database and neither guard puts its own back.

The newer checkout is emulated by the override folder and its `VERSION` file, which is what a newer
couchsync's packaged documents are to an older worker: other sources, a higher version.
"""

from __future__ import annotations

import time

import localcouch
from couchsync.design_docs import PROTECTION_SOURCE, VERSION_FIELD, packaged
from couchsync.documents import CONTACTS, GROUPS

from tests.integration.test_ops import PROTECTION, following, needs_feed
from tests.integration.test_protection import deploy
from tests.integration.test_worker import group_messages, seed, wait_until
from tests.integration.test_worker import start_worker  # noqa: F401 (the fixture)

DOMAINS = ["acme.twake.app", "alice.acme.twake.app", "bob.acme.twake.app"]
MARK = "/* the newer protection */"
SIDE_BY_SIDE = 120.0


def newer_sources(folder):
    folder.mkdir()
    for source in packaged().iterdir():
        if source.is_file():
            text = source.read_text(encoding="utf-8")
            if source.name == PROTECTION_SOURCE:
                text = text.replace("{", "{ " + MARK, 1)  # inside the function: still starts with `function`
            (folder / source.name).write_text(text, encoding="utf-8")
    (folder / "VERSION").write_text("9.0.0\n")
    return folder


def protections(world):
    found = {}
    for domain in DOMAINS:
        for doctype in (CONTACTS, GROUPS):
            db = world.db(domain, doctype)
            found[db] = world.server.request("GET", f"{localcouch.db_path(db)}/{PROTECTION}").json()
    return found


def all_newer(world) -> bool:
    return all(MARK in doc.get("validate_doc_update", "") and doc.get(VERSION_FIELD) == "9.0.0"
               for doc in protections(world).values())


def restored(worker) -> float:
    return worker.metrics().get("couchsync_protection_restored_total", 0.0)


def test_two_versions_side_by_side_leave_the_newer_protection_and_restore_nothing(
        world, broker, start_worker, tmp_path):  # noqa: F811 (the fixture)
    needs_feed(world)
    seed(world, DOMAINS)
    older = start_worker(world)
    wait_until(lambda: following(older), 30, "the older worker follows _db_updates")
    newer = start_worker(world, COUCHSYNC_DESIGN_DOCS=str(newer_sources(tmp_path / "newer")))
    wait_until(lambda: following(newer), 30, "the newer worker follows _db_updates")
    # The newer worker resumes the feed where the older left it (one sequence, in the state database): it
    # installs its protection in a database once that database changes, as the events below change them.
    messages = group_messages(240)
    broker.publish(messages[:30])
    messages = messages[30:]
    wait_until(lambda: all_newer(world), 30, "the newer protection is everywhere")
    before = restored(older), restored(newer)
    # Two minutes of events (each write is a _db_updates event both guards look at).
    started = time.monotonic()
    while time.monotonic() - started < SIDE_BY_SIDE:
        broker.publish(messages[:10])
        messages = messages[10:] or group_messages(240)
        time.sleep(5)
    revisions = {db: doc["_rev"] for db, doc in protections(world).items()}
    print(f"\nprotection revisions after {SIDE_BY_SIDE:.0f}s side by side: {sorted(revisions.values())}; restored "
          f"after the first install: older {restored(older) - before[0]:.0f}, newer {restored(newer) - before[1]:.0f}")
    assert all_newer(world)
    # The newer worker's first install over the older protection counts once, as a restoration of what
    # it sees changed; after that neither puts its own back.
    assert (restored(older), restored(newer)) == before
    assert older.log.read_text().count("a newer couchsync's _design/couchsync-protection") == 1
    assert all(revision.startswith(("1-", "2-")) for revision in revisions.values())  # no back and forth
    # A rollback: the older version's deploy leaves the newer documents unless told to replace them.
    for worker in (older, newer):
        assert worker.stop() == 0
    kept = deploy(world)
    assert kept.returncode == 0, kept.stderr
    assert "left as a newer couchsync wrote them: " in kept.stdout and all_newer(world)
    replaced = deploy(world, "--replace-newer")
    assert replaced.returncode == 0, replaced.stderr
    assert not any(MARK in doc.get("validate_doc_update", "") for doc in protections(world).values())
