"""The real CouchDB server for the integration tests, and a per-test world on it.

One server per test session, as `localcouch.server()` chooses: the CouchDB that COUCHSYNC_TEST_COUCH_URL
names, else Apache CouchDB from COUCHSYNC_COUCHDB_RELEASE, else PouchDB Server, each started on a free
port (the terminal summary says which ran). Each test gets its own global database and database
prefixes, so tests share nothing; on an external CouchDB they are deleted afterwards. A server that
cannot start fails the tests under CI and skips them elsewhere.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest
import requests

import localcouch
from couchsync import config, design_docs
from couchsync.couch import CouchGateway
from couchsync.documents import CONTACTS, GROUPS, SETTINGS, database_name
from couchsync.instances import InstanceDirectory
from couchsync.settle import Settling
from couchsync.sync import Synchronizer


SERVER_SEEN = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def couch_server(request):
    try:
        server = localcouch.server()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the CouchDB-compatible server is needed: {exc}")
        pytest.skip(f"no CouchDB-compatible server: {exc}")
    request.config.stash[SERVER_SEEN] = f"{server.label} at {server.url}"
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Which server the integration tests ran on, with its version, beside pytest's counts."""
    if SERVER_SEEN in config.stash:
        terminalreporter.write_line(f"integration tests ran on {config.stash[SERVER_SEEN]}")


@dataclass
class World:
    """Instances seeded the way the stack seeds them, and couchsync wired as in production."""

    server: localcouch.LocalCouch
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    databases: set[str] = field(default_factory=set)
    gateways: list[CouchGateway] = field(default_factory=list)
    protected: bool = False  # every instance gets couchsync's design documents, as deploy-design-docs installs them
    users: list[str] = field(default_factory=list)

    @property
    def global_db(self) -> str:
        return f"t{self.tag}-global/instances"

    @property
    def state_db(self) -> str:
        """couchsync's directory state database of this world (one per cluster in production)."""
        self.databases.add(f"t{self.tag}-couchsync/directory")
        return f"t{self.tag}-couchsync/directory"

    def prefix(self, domain: str) -> str:
        return f"t{self.tag}-{domain}"

    def db(self, domain: str, doctype: str) -> str:
        name = database_name(self.prefix(domain), doctype)
        self.databases.add(name)
        return name

    def add_instance(self, domain: str, org_id: str | None, *, email: str | None = None,
                     org_domain: str | None = None, **extra: Any) -> None:
        self.databases.add(self.global_db)
        localcouch.bulk(self.server, self.global_db, [localcouch.instance_doc(
            domain, org_id, org_domain, prefix=self.prefix(domain), **extra)])
        if email:
            localcouch.bulk(self.server, self.db(domain, SETTINGS), [localcouch.settings_doc(email, domain)])
        if self.protected:
            self.protect(domain)

    def protect(self, domain: str) -> None:
        """Install the protection and lookup design documents in the instance's databases (created)."""
        design = design_docs.load()
        protection = design.protection(config.load_identity([self.server.sync[0]]))
        gateway = self.gateway()
        for target in design.instance_targets(self.prefix(domain), protection):
            self.databases.add(target.db)
            outcome = design_docs.deploy(gateway, target, create_missing=True)
            assert outcome.error is None, outcome.error

    def add_instances(self, docs: list[dict[str, Any]]) -> None:
        self.databases.add(self.global_db)
        for start in range(0, len(docs), 1000):
            localcouch.bulk(self.server, self.global_db, docs[start:start + 1000])

    def put(self, domain: str, doctype: str, doc: dict[str, Any]) -> dict[str, Any]:
        """Write as the stack's admin (not the sync identity)."""
        return localcouch.bulk(self.server, self.db(domain, doctype), [doc])[0]

    def add_user(self, name: str, member_of: list[str]) -> requests.Session:
        """A CouchDB user (`_users`), made a member of these databases (created): a session of theirs.

        Membership matters on CouchDB 3, where databases are admin-only otherwise: it lets the user's
        writes reach validate_doc_update, so that a refusal there is what a test sees.
        """
        name = f"{name}-{self.tag}"
        password = secrets.token_hex(8)
        self.server.request("PUT", "/_users/org.couchdb.user:" + name, json={
            "name": name, "password": password, "roles": [], "type": "user"}).raise_for_status()
        self.users.append(name)
        for db in member_of:
            self.databases.add(db)
            localcouch.ensure_db(self.server, db)
            self.server.request("PUT", localcouch.db_path(db) + "/_security", json={
                "admins": {"names": [], "roles": []}, "members": {"names": [name], "roles": []}}).raise_for_status()
        session = requests.Session()
        session.auth = (name, password)
        return session

    def raw(self, domain: str, doctype: str, doc_id: str) -> bytes:
        response = self.server.request("GET", localcouch.db_path(self.db(domain, doctype)) + "/" + doc_id)
        return response.content

    def docs(self, domain: str, doctype: str) -> dict[str, dict[str, Any]]:
        """Live documents of an instance's database (design documents left out)."""
        response = self.server.request("GET", localcouch.db_path(self.db(domain, doctype)) + "/_all_docs",
                                       params={"include_docs": "true"})
        if response.status_code == 404:
            return {}
        response.raise_for_status()
        return {row["id"]: row["doc"] for row in response.json()["rows"] if not row["id"].startswith("_design/")}

    def directory(self, domain: str) -> dict[str, dict[str, dict[str, Any]]]:
        return {GROUPS: self.docs(domain, GROUPS), CONTACTS: self.docs(domain, CONTACTS)}

    def revisions(self, domain: str) -> dict[str, str]:
        return {f"{doctype}:{doc_id}": doc["_rev"] for doctype in (GROUPS, CONTACTS)
                for doc_id, doc in self.docs(domain, doctype).items()}

    def cli_env(self, **overrides: str) -> dict[str, str]:
        """The environment an operator gives `couchsync` to run as the sync identity on this world."""
        user, password = self.server.sync
        return {**os.environ, "COUCHSYNC_COUCH_URL": self.server.url, "COUCHSYNC_COUCH_USER": user,
                "COUCHSYNC_COUCH_PASSWORD": password, "COUCHSYNC_GLOBAL_DB": self.global_db,
                "COUCHSYNC_STATE_DB": self.state_db, **overrides}

    def couch_settings(self, **overrides: Any) -> config.CouchSettings:
        user, password = self.server.sync
        return config.load_couch(self.server.url, username=user, password=password, **overrides)

    def gateway(self, **overrides: Any) -> CouchGateway:
        """A gateway of the sync identity, closed with the world."""
        gateway = CouchGateway(self.couch_settings(**overrides))
        self.gateways.append(gateway)
        return gateway

    def synchronizer(self, concurrency: int = 8, page_size: int = 1000,
                     settling: Settling | None = None) -> Synchronizer:
        gateway = self.gateway(pool_size=concurrency)
        design = design_docs.load()
        directory = InstanceDirectory(gateway, self.global_db, indexes=design.global_indexes, page_size=page_size)
        settings = config.load_sync(global_db=self.global_db, state_db=self.state_db, concurrency=concurrency,
                                    page_size=page_size)
        return Synchronizer(gateway, directory, design, settings, settling=settling)

    def cleanup(self) -> None:
        for gateway in self.gateways:
            gateway.close()
        if self.server.process is not None:
            return  # a server of ours: its data goes with it
        for name in self.databases:
            self.server.request("DELETE", localcouch.db_path(name))
        for user in self.users:
            doc_id = "/_users/org.couchdb.user:" + user
            rev = self.server.request("GET", doc_id).json().get("_rev")
            self.server.request("DELETE", doc_id, params={"rev": rev})


@pytest.fixture
def world(couch_server):
    world = World(couch_server)
    yield world
    world.cleanup()


@pytest.fixture(params=["unprotected", "protected"])
def engine_world(request, couch_server):
    """A world, once without and once with the protection deployed: the engine must not notice."""
    world = World(couch_server, protected=request.param == "protected")
    yield world
    world.cleanup()


@pytest.fixture(scope="session")
def rabbitmq():
    """The real RabbitMQ on 127.0.0.1:5672 (guest/guest); missing, it fails the tests under CI."""
    parameters = pika.ConnectionParameters("127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"),
                                           connection_attempts=5, retry_delay=1)
    try:
        pika.BlockingConnection(parameters).close()
    except pika.exceptions.AMQPError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ is needed on 127.0.0.1:5672: {exc!r}")
        pytest.skip(f"no RabbitMQ on 127.0.0.1:5672: {exc!r}")
    return parameters


@dataclass
class Broker:
    """A test's own exchange and couchsync queue names on the real RabbitMQ, deleted afterwards."""

    parameters: pika.ConnectionParameters  # where the test publishes and looks
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    urls: tuple[str, ...] = (config.DEFAULT_AMQP_URL,)  # what couchsync is given (a cluster's nodes)
    partitions: int = 4  # fewer than a deployment's 16: quicker to declare, and each holds more organizations

    @property
    def exchange(self) -> str:
        return f"t{self.tag}.b2b"

    @property
    def auth_exchange(self) -> str:
        return f"t{self.tag}.auth"

    @property
    def settings(self) -> config.AmqpSettings:
        return config.load_amqp(self.urls, exchange=self.exchange, auth_exchange=self.auth_exchange,
                                queue_prefix=f"t{self.tag}.couchsync.", partitions=self.partitions)

    def env(self, **overrides: str) -> dict[str, str]:
        """What the CLI needs to use these names."""
        return {"COUCHSYNC_AMQP_URL": ",".join(self.urls), "COUCHSYNC_EXCHANGE": self.exchange,
                "COUCHSYNC_AUTH_EXCHANGE": self.auth_exchange, "COUCHSYNC_QUEUE_PREFIX": self.settings.queue_prefix,
                "COUCHSYNC_PARTITIONS": str(self.partitions), **overrides}

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish (routing key, body) pairs as the directory does: user.created to the auth exchange,
        the rest to the b2b one; persistent and confirmed."""
        self.publish_raw([(self.auth_exchange if routing_key.startswith("user.") else self.exchange, routing_key,
                           body, {}) for routing_key, body in messages])

    def publish_raw(self, messages: list[tuple[str, str, bytes, dict[str, Any]]]) -> None:
        """Publish (exchange, routing key, body, headers) as any publisher may, persistent and confirmed;
        "" is the default exchange (a key naming a queue)."""
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            for exchange in (self.exchange, self.auth_exchange):
                channel.exchange_declare(exchange, "topic", durable=True)
            channel.confirm_delivery()
            for exchange, routing_key, body, headers in messages:
                channel.basic_publish(exchange, routing_key, body,
                                      pika.BasicProperties(delivery_mode=2, headers=headers or None))
        finally:
            connection.close()

    def depths(self) -> dict[str, int]:
        """Ready messages in each of couchsync's queues (a passive declare: the queue's own count, not
        the management metrics, which lag); messages a consumer holds are not counted."""
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            settings = self.settings
            return {name: channel.queue_declare(name, passive=True).method.message_count
                    for name in (settings.queue, settings.retry_queue, settings.dead_letter_queue,
                                 *settings.partition_queues)}
        finally:
            connection.close()

    def cleanup(self) -> None:
        connection = pika.BlockingConnection(self.parameters)
        channel = connection.channel()
        settings = self.settings
        # Every partition a command may have declared, its default count included (a command run without
        # the test's COUCHSYNC_PARTITIONS): the machine's broker must not collect a test's quorum queues.
        partitions = [f"{settings.queue}.p{number:03d}"
                      for number in range(max(settings.partitions, config.DEFAULT_PARTITIONS))]
        for queue in (settings.queue, settings.retry_queue, settings.dead_letter_queue, f"{settings.queue}.held",
                      *partitions):
            channel.queue_delete(queue)
        for exchange in (self.exchange, self.auth_exchange, settings.dead_letter_exchange):
            channel.exchange_delete(exchange)
        connection.close()


@pytest.fixture
def broker(rabbitmq):
    broker = Broker(rabbitmq)
    yield broker
    broker.cleanup()
