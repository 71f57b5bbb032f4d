"""Clusters for the scale-out tests: three Apache CouchDB nodes and three RabbitMQ nodes on this machine.

Started once per test session that asks for them (`-m cluster`, the last part of `scripts/test`), each
node on free ports with its data in a temporary folder, stopped by process id; the machine's own
RabbitMQ on 5672 is left alone. Missing (no CouchDB release, no RabbitMQ installed), they fail the tests
under CI and skip them elsewhere.
"""

from __future__ import annotations

import os

import pytest

import localcouch
import localrabbit
from tests.integration.conftest import couch_server, rabbitmq  # noqa: F401  (the single-node fixtures, reused)


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the cluster tests need {what}")
    pytest.skip(f"no {what}")


@pytest.fixture(scope="session")
def couch_cluster():
    release = localcouch.find_release()
    if release is None:
        _missing(f"an Apache CouchDB release ({localcouch.RELEASE_ENV})")
    cluster = localcouch.start_couchdb_cluster(release)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def rabbit_cluster():
    if not localrabbit.available():
        _missing("RabbitMQ (rabbitmq-server)")
    cluster = localrabbit.start_cluster(3)
    yield cluster
    cluster.stop()
