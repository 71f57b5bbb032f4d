"""Instance records of the global database: which are used, and which is the organization instance."""

import pytest

from couchsync.errors import AmbiguousOrganization, CouchsyncError
from couchsync.instances import Instance, instance_from_doc, instance_name, organization_instance


@pytest.mark.parametrize("doc, problem", [
    ({"domain": ["a.acme.test", "b.acme.test"], "org_id": "acme"}, "domain"),
    ({"domain": "a.acme.test", "prefix": "_users", "org_id": "acme"}, "prefix"),
    ({"domain": "a.acme.test", "prefix": "rt/../../_replicator", "org_id": "acme"}, "prefix"),
    ({"domain": "a.acme.test", "prefix": "a..b", "org_id": "acme"}, "prefix"),
    ({"domain": "1a.acme.test", "org_id": "acme"}, "domain"),
    ({"domain": "a" * 300 + ".test", "org_id": "acme"}, "domain"),
    ({"domain": "a.acme.test", "org_id": ["acme"]}, "org_id"),
    ({"org_id": "acme"}, "domain"),
])
def test_a_record_whose_domain_or_prefix_is_no_instance_name_is_refused_saying_which(doc, problem):
    with pytest.raises(ValueError, match=problem):
        instance_from_doc(doc)


def test_valid_records_are_read_and_unusable_ones_are_none():
    assert instance_from_doc({"domain": " Bob.Acme.Twake.App ", "prefix": "cozy1f2e", "org_id": "acme"}) == \
        Instance("bob.acme.twake.app", "cozy1f2e", "acme")
    assert instance_from_doc({"domain": "dev.cozy.localhost:8080", "org_id": "dev"}).database("io.cozy.contacts") \
        == "dev-cozy-localhost-8080/io-cozy-contacts"
    assert instance_from_doc({"domain": ["x"], "deleting": True}) is None
    assert instance_name("t1a2b-acme.twake.app") == "t1a2b-acme.twake.app" and instance_name(3) is None


def test_several_organization_instance_candidates_are_an_error_naming_them():
    acme = Instance("acme.twake.app", "acme.twake.app", "acme")
    evil = Instance("acme.evil.test", "acme.evil.test", "acme")
    bob = Instance("bob.acme.twake.app", "bob.acme.twake.app", "acme")
    assert organization_instance([bob, acme]) == acme
    assert organization_instance([bob]) is None
    with pytest.raises(AmbiguousOrganization, match="acme.evil.test, acme.twake.app") as raised:
        organization_instance([acme, bob, evil])
    assert isinstance(raised.value, CouchsyncError) and not raised.value.retryable
