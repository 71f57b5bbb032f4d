"""The local RabbitMQ and a `couchsync worker` on it, for the demo and the benchmarks."""

from __future__ import annotations

import pika
import pika.exceptions
import requests

from couchsync import config

QUEUE_SUFFIXES = ("b2b.group", "b2b.group.retry", "b2b.group.dead")


def consuming(metrics_port: int) -> bool:
    """Whether the worker consumes its queue (its /healthz): its queues are declared and bound by then."""
    try:
        return requests.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def events_handled(metrics_port: int) -> float:
    """Events the worker has handled (every outcome), from its /metrics; -1 while it does not answer."""
    return metric_total(metrics_port, "couchsync_events_total")


def metric_total(metrics_port: int, name: str) -> float:
    """The sum of a metric's samples (every label), from the worker's /metrics; -1 while it does not answer."""
    try:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    except requests.RequestException:
        return -1
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line == name or line.startswith((name + " ", name + "{")))


def remove(queue_prefix: str, *exchanges: str) -> None:
    """Delete couchsync's queues of this prefix, its dead-letter exchange and these exchanges."""
    try:
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    except pika.exceptions.AMQPError:
        return
    channel = connection.channel()
    # The partition queues and the hold queue too: the machine's broker must not collect quorum queues.
    partitions = [f"b2b.group.p{number:03d}" for number in range(config.DEFAULT_PARTITIONS)]
    for suffix in (*QUEUE_SUFFIXES, "b2b.group.held", *partitions):
        channel.queue_delete(queue_prefix + suffix)
    for exchange in (*exchanges, queue_prefix + "dlx"):
        channel.exchange_delete(exchange)
    connection.close()
