from urllib.parse import urlsplit

import pytest

from couchsync.documents import (
    database_name, emails_of, group_ids_of, host_of, is_managed, managed_contact_id, managed_group_id,
    match_contact, with_group)


def test_group_id_of_the_spec_example():
    assert managed_group_id("acme", "engineering") == "b2b-group-eff7808d5b54bb721b52529759597c29"
    assert managed_group_id(" acme ", "engineering\n") == managed_group_id("acme", "engineering")


def test_contact_id_is_stable_per_organization_and_email_case_insensitive():
    assert managed_contact_id("acme", "Bob@Acme.com") == managed_contact_id("acme", "bob@acme.com")
    assert managed_contact_id("acme", "bob@acme.com") != managed_contact_id("other", "bob@acme.com")


@pytest.mark.parametrize("prefix, doctype, expected", [
    ("alice.acme.twake.app", "io.cozy.contacts", "alice-acme-twake-app/io-cozy-contacts"),
    ("Alice.Acme.twake.app:8080", "io.cozy.contacts.groups", "alice-acme-twake-app-8080/io-cozy-contacts-groups"),
    ("cozy3ab4", "io.cozy.settings", "cozy3ab4/io-cozy-settings"),
])
def test_database_name_follows_the_stack(prefix, doctype, expected):
    assert database_name(prefix, doctype) == expected


def test_only_a_true_managed_flag_makes_a_document_managed():
    assert is_managed({"twakeDirectory": {"managed": True}})
    assert not is_managed({"twakeDirectory": {"managed": "true"}})
    assert not is_managed({"twakeDirectory": None})
    assert not is_managed({})


def test_hosts_of_urls_and_bare_names():
    assert host_of("https://Bob.Acme.twake.app:443/apps") == "bob.acme.twake.app"
    assert host_of("bob.acme.twake.app") == "bob.acme.twake.app"
    assert host_of("  ") is None


@pytest.mark.parametrize("text", [
    "Bob.Acme.twake.app", "https://Bob.Acme.twake.app/apps?x#y", "HTTPS://a.b", "//a.b/c", "a.b/c", "a.b?q", "a.b#f",
    ".a.1#://", "1a://host", "ab:c://d", "a:b://c", "https://a/b://c", "https://a\tb/", "https://ab/\nx",
    "https://a.b:8080/", "HTTPS://A.B.",
    "https://user@host/", "https://[::1]/", "host:8080", "https://bücher.example/", "a%41.b", "https://", "-.-"])
def test_hosts_read_without_urlsplit_are_the_ones_urlsplit_reads(text):
    # host_of reads a plain host itself (a big event asks for thousands); urlsplit is the reference.
    parsed = urlsplit(text if "://" in text else f"//{text}")
    assert host_of(text) == (parsed.hostname.lower() if parsed.hostname else None)


def contact(doc_id, *emails, external=False, managed_org=None, urls=()):
    doc = {"_id": doc_id, "email": [{"address": email} for email in emails],
           "cozy": [{"url": url} for url in urls]}
    if external:
        doc["metadata"] = {"external": True}
    if managed_org:
        doc["twakeDirectory"] = {"managed": True, "kind": "contact", "organizationId": managed_org}
    return doc


def test_a_member_matches_an_external_contact_by_email_whatever_its_case():
    found = match_contact("bob@acme.com", None, [contact("c1", "Bob@ACME.com", external=True)], "acme")
    assert found.contact["_id"] == "c1" and found.refusal is None


def test_email_is_tried_before_cozy_url():
    by_url = contact("url", "other@x.com", external=True, urls=["https://bob.acme.twake.app"])
    by_email = contact("mail", "bob@acme.com", managed_org="acme")
    assert match_contact("bob@acme.com", "bob.acme.twake.app", [by_url, by_email], "acme").contact is by_email
    assert match_contact("new@acme.com", "bob.acme.twake.app", [by_url], "acme").contact is by_url


def test_a_personal_contact_with_the_email_is_refused_not_reused():
    found = match_contact("bob@acme.com", None, [contact("mine", "bob@acme.com")], "acme")
    assert found.contact is None
    assert "mine" in found.refusal and "neither managed nor external" in found.refusal


def test_two_reusable_candidates_are_an_error_never_a_guess():
    candidates = [contact("a", "bob@acme.com", external=True), contact("b", "bob@acme.com", managed_org="acme")]
    found = match_contact("bob@acme.com", None, candidates, "acme")
    assert found.contact is None and "2 contacts match" in found.refusal


def test_the_contact_couchsync_gave_a_member_is_their_match_beside_look_alikes():
    own = contact(managed_contact_id("acme", "bob@acme.com"), "bob@acme.com", managed_org="acme")
    candidates = [contact("a", "Bob@acme.com", external=True), own, contact("p", "bob@acme.com")]
    assert match_contact("BOB@acme.com", None, candidates, "acme").contact is own


def test_a_contact_managed_for_another_organization_is_not_reused():
    found = match_contact("bob@acme.com", None, [contact("x", "bob@acme.com", managed_org="other")], "acme")
    assert found.contact is None and found.refusal


def test_group_relationships_are_added_and_removed_without_touching_others():
    doc = {"_id": "c", "relationships": {"groups": {"data": [{"_id": "mine", "_type": "io.cozy.contacts.groups"}]},
                                         "other": {"data": []}}}
    added = with_group(doc, "managed", True)
    assert group_ids_of(added) == ["mine", "managed"]
    assert added["relationships"]["other"] == {"data": []}
    assert group_ids_of(with_group(added, "managed", False)) == ["mine"]
    assert group_ids_of(doc) == ["mine"]  # the input is not changed


def test_emails_of_includes_the_managed_email():
    assert emails_of({"email": [{"address": " A@B.c "}], "twakeDirectory": {"email": "x@y.z"}}) == {"a@b.c", "x@y.z"}


def test_a_managed_contact_of_another_member_is_not_matched_by_cozy_url():
    alice = contact("alice", "alice@acme.com", managed_org="acme", urls=["https://shared.acme.twake.app"])
    alice["twakeDirectory"]["email"] = "alice@acme.com"
    assert match_contact("bob@acme.com", "shared.acme.twake.app", [alice], "acme").contact is None
