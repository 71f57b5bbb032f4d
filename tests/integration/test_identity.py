"""People are who their address says, by one rule in Python and in the lookup view as the server runs it."""

from __future__ import annotations

import json
import unicodedata

from couchsync.documents import CONTACTS, TAG, digest, group_ids_of, managed_contact_id
from couchsync.events import parse_event
from couchsync.identity import legacy_key
from couchsync.state import group_state_id

from tests.integration.conftest import World
from tests.integration.test_worker import DOMAINS, seed

GROUP = "b2b-group-eff7808d5b54bb721b52529759597c29"  # acme/engineering
KATE = {"email": "Kate@x.com", "name": "Kate Real", "workplaceFqdn": "kate.x.com"}
KELVIN = {"email": "\u212aate@x.com", "name": "A Stranger", "workplaceFqdn": "stranger.evil.com"}
JOSE = "jos\u00e9@x.com"


def event(routing_key: str, minute: int, *members: dict, **fields) -> tuple[str, str]:
    return routing_key, json.dumps({"timestamp": f"2026-06-16T10:{minute:02d}:00Z", "organizationId": "acme",
                                    "id": "engineering", "members": list(members), **fields})


def apply(world: World, *events: tuple[str, str]) -> None:
    with world.synchronizer() as sync:
        for routing_key, body in events:
            assert sync.apply(parse_event(routing_key, body)).failures == []


def contacts_named(world: World, domain: str, name: str) -> list[dict]:
    return [doc for doc in world.docs(domain, CONTACTS).values() if doc.get("fullname") == name]


def test_the_kelvin_sign_look_alike_is_a_second_person_and_leaves_kate_unchanged(world):
    seed(world)
    apply(world, event("b2b.group.created", 30, KATE, name="Engineering"))
    kate = {domain: world.docs(domain, CONTACTS)[managed_contact_id("acme", "kate@x.com")] for domain in DOMAINS}
    apply(world, event("b2b.group.member.added", 40, KELVIN))
    for domain in DOMAINS:
        assert world.docs(domain, CONTACTS)[managed_contact_id("acme", "kate@x.com")] == kate[domain]
        strangers = contacts_named(world, domain, "A Stranger")
        assert len(strangers) == 1 and strangers[0]["_id"] != kate[domain]["_id"]


def test_composed_decomposed_unicode_and_punycode_spellings_give_one_contact(world):
    seed(world)
    apply(world, event("b2b.group.created", 30, {"email": JOSE, "name": "Jose 1"},
                       {"email": "bob@b\u00fccher.de", "name": "Bob 1"}, name="Engineering"),
          event("b2b.group.member.added", 40, {"email": unicodedata.normalize("NFD", JOSE), "name": "Jose 2"},
                {"email": "Bob@XN--BCHER-KVA.de", "name": "Bob 2"}))
    for domain in DOMAINS:
        names = sorted(doc["fullname"] for doc in world.docs(domain, CONTACTS).values())
        assert names == ["Bob 2", "Jose 2"], domain


def test_a_directory_written_under_the_earlier_rule_still_converges(world):
    """A decomposed address, as the earlier rule keyed it (Unicode lower-case, no NFC): its contact id,
    its membership in the group's state. The next events and reconcile keep one contact for that person."""
    seed(world)
    decomposed = unicodedata.normalize("NFD", "Jos\u00e9@X.com")
    apply(world, event("b2b.group.created", 30, {"email": "alice@x.com"}, name="Engineering"))
    old_id = "b2b-contact-" + digest("acme", legacy_key(decomposed))
    gateway = world.gateway()
    for domain in DOMAINS:
        contact = {"_id": old_id, "fullname": "Jose Old", "email": [{"address": decomposed, "primary": True}],
                   "relationships": {"groups": {"data": [{"_id": GROUP, "_type": "io.cozy.contacts.groups"}]}},
                   TAG: {"managed": True, "kind": "contact", "organizationId": "acme", "email": decomposed}}
        assert gateway.bulk_write(world.db(domain, CONTACTS), [contact])[0].ok
    state_id = group_state_id("acme", "engineering")
    state = gateway.get(world.state_db, state_id)
    state["members"][legacy_key(decomposed)] = ["2026-06-16T10:30:00.000Z#0#old", True]
    assert gateway.bulk_write(world.state_db, [state])[0].ok

    apply(world, event("b2b.group.member.added", 40, {"email": "jos\u00e9@x.com", "name": "Jose New"}))
    for domain in DOMAINS:
        joses = [doc for doc in world.docs(domain, CONTACTS).values() if "Jose" in doc.get("fullname", "")]
        assert [(doc["_id"], doc["fullname"], group_ids_of(doc)) for doc in joses] == [
            (old_id, "Jose New", [GROUP])], domain
    apply(world, event("b2b.group.member.removed", 50, {"email": decomposed}))
    for domain in DOMAINS:
        assert group_ids_of(world.docs(domain, CONTACTS)[old_id]) == []
