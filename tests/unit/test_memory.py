"""When an organization's directory state must be seeded again: the marker and the database's identity."""

import pytest

from couchsync.memory import MISSING, PURGED, RECREATED, DatabaseIdentity, purge_count, seed_reason

SEEDED = {"_id": "org-x:organization", "database": {"instanceStartTime": "0", "purges": 2}}


@pytest.mark.parametrize("marker, identity, reason", [
    (None, DatabaseIdentity("0", 0), MISSING),                       # new, or the database was deleted
    (SEEDED, DatabaseIdentity("0", 2), None),                        # as seeded
    (SEEDED, DatabaseIdentity("0", 3), PURGED),                      # a document purged since
    (SEEDED, DatabaseIdentity("1733500000000", 2), RECREATED),       # another database of that name
    ({"_id": "org-x:organization"}, DatabaseIdentity("0", 0), None),  # an older couchsync's marker
    ({"_id": "org-x:organization"}, DatabaseIdentity("0", 1), PURGED),
])
def test_the_state_is_seeded_again_only_when_its_marker_or_database_says_it_was_lost(marker, identity, reason):
    assert seed_reason(marker, identity) == reason


def test_the_purge_count_reads_couchdb_3_cluster_sequences_and_plain_numbers():
    assert purge_count("5-g1AAAAFTeJzLYWBg4MhgTmHgzcvPy09JdcjLz8gvLskBCScyJNX___8_") == 5
    assert purge_count(3) == 3 and purge_count(None) == 0 and purge_count("garbage") == 0
    assert DatabaseIdentity.of({"instance_start_time": "0", "purge_seq": "1-abc"}) == DatabaseIdentity("0", 1)
