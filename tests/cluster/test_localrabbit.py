"""scripts/localrabbit.py against the installed RabbitMQ: three nodes of our own, one of them stopped and
started again under a quorum queue, and the machine's own RabbitMQ left alone throughout.

Skipped where RabbitMQ is not installed, failed instead under CI.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from typing import Any

import pika
import pika.exceptions
import pytest

import localrabbit

pytestmark = pytest.mark.cluster

MACHINE_RABBIT = pika.ConnectionParameters("127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"),
                                           connection_attempts=3, retry_delay=1)


def machine_rabbit_answers() -> bool:
    try:
        pika.BlockingConnection(MACHINE_RABBIT).close()
    except pika.exceptions.AMQPError:
        return False
    return True


@pytest.fixture
def machine_rabbit() -> bool:
    """Whether the machine's own RabbitMQ answered before our cluster started (it must still, after)."""
    return machine_rabbit_answers()


@pytest.fixture
def cluster(machine_rabbit):
    if not localrabbit.available():
        if os.environ.get("CI"):
            pytest.fail("CI needs RabbitMQ installed (rabbitmq-server and epmd)")
        pytest.skip("RabbitMQ is not installed here")
    cluster = localrabbit.start_cluster()
    yield cluster
    cluster.stop()


def queue_info(cluster: localrabbit.RabbitCluster, index: int, name: str) -> dict[str, Any]:
    """The queue's type, members and online members, as node `index` lists them."""
    rows = json.loads(cluster.ctl_ok(index, "list_queues", "name", "type", "members", "online",
                                     "--formatter", "json"))
    return next(row for row in rows if row["name"] == name)


def wait_online(cluster: localrabbit.RabbitCluster, index: int, name: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        info = queue_info(cluster, index, name)
        if len(info["online"]) == count or time.monotonic() > deadline:
            return info
        time.sleep(1)


def connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


@pytest.mark.cluster
def test_a_quorum_queue_survives_a_node_going_and_coming_back(cluster, machine_rabbit):
    names = {node.name for node in cluster.nodes}
    assert len(names) == 3 and cluster.running_nodes(0) == names

    queue = f"t{secrets.token_hex(4)}.quorum"
    with connect(cluster.urls[0]) as connection:
        connection.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    info = queue_info(cluster, 0, queue)
    assert info["type"] == "quorum" and set(info["members"]) == names

    bodies = [f"message {n}".encode() for n in range(10)]
    with connect(cluster.urls[1]) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:  # raises on a nack or an unroutable message
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)

    pgid = cluster.nodes[0].process.pid
    cluster.stop_node(0)
    assert cluster.nodes[0].process is None and not localrabbit.group_alive(pgid)

    received = []
    with connect(cluster.urls[2]) as connection:
        channel = connection.channel()
        for method, _, body in channel.consume(queue, inactivity_timeout=30):
            assert method is not None, f"only {len(received)} of the 10 messages came"
            received.append(body)
            channel.basic_ack(method.delivery_tag)
            if len(received) == len(bodies):
                break
        channel.cancel()
    assert sorted(received) == sorted(bodies)

    cluster.start_node(0)
    assert cluster.running_nodes(0) == names
    info = wait_online(cluster, 0, queue, 3)
    assert set(info["online"]) == names

    pgids = [node.process.pid for node in cluster.nodes]
    workdir = cluster.workdir
    cluster.stop()
    assert all(node.process is None for node in cluster.nodes) and cluster.epmd is None
    assert not any(localrabbit.group_alive(pgid) for pgid in pgids)
    assert not workdir.exists()
    if machine_rabbit:
        assert machine_rabbit_answers(), "the machine's RabbitMQ on 5672 no longer answers"
    machine_epmd = subprocess.run(["epmd", "-names"], capture_output=True, text=True,
                                  env={**os.environ, "ERL_EPMD_PORT": "4369"}).stdout
    assert not any(name.split("@")[0] in machine_epmd for name in names), "our nodes used the machine's epmd"
