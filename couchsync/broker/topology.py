"""couchsync's exchanges, queues and bindings, and the connection to the broker they are declared on.

Topology, declared idempotently on every connection (names from `AmqpSettings`):

    <exchange> (topic, the directory's)  --b2b.group.#-->  <prefix>b2b.group        quorum, x-delivery-limit
    <prefix>b2b.group.pNNN    P partitions: quorum, x-single-active-consumer, fed from <prefix>b2b.group
                              (the intake) by the workers, each organization to one (`couchsync.partitions`)
    <prefix>b2b.group.retry   quorum; a failed attempt waits there (per-message TTL), then goes back
    <prefix>dlx (direct)  -->  <prefix>b2b.group.dead   the dead letters, each with its reason
"""

from __future__ import annotations

import logging
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from couchsync.config import AmqpSettings, redact
from couchsync.errors import BrokerUnavailable, ConfigError

logger = logging.getLogger(__name__)

BINDING = "b2b.group.#"  # every group event, unknown ones too: they are dead-lettered, not lost unrouted
USER_BINDING = "user.created"


def declare(connection: BlockingConnection, settings: AmqpSettings) -> BlockingChannel:
    """Declare the exchanges, queues and bindings (idempotent); the channel to go on with.

    Every queue is a quorum queue, replicated on the cluster's nodes: a classic queue lives on one node,
    and while that node is down it can be neither declared (404) nor published to. A dead-letter queue
    an older couchsync declared as a classic queue is used as it is (see the README, "Upgrading").

    Raises:
        ConfigError: a queue exists with other arguments (406), or cannot be declared.
    """
    channel = connection.channel()
    try:
        channel.exchange_declare(settings.exchange, "topic", durable=True)
        channel.exchange_declare(settings.auth_exchange, "topic", durable=True)
        channel.exchange_declare(settings.dead_letter_exchange, "direct", durable=True)
        channel.queue_declare(settings.queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-delivery-limit": settings.delivery_limit,
            "x-dead-letter-exchange": settings.dead_letter_exchange,
            "x-dead-letter-routing-key": settings.dead_letter_queue})
        channel.queue_bind(settings.queue, settings.exchange, BINDING)
        channel.queue_bind(settings.queue, settings.auth_exchange, USER_BINDING)
        for partition in settings.partition_queues:
            # One active consumer at a time (the first registered, on RabbitMQ 3.10): one worker per
            # partition, so per organization. Fed through the default exchange only, by the intake's consumers.
            channel.queue_declare(partition, durable=True, arguments={
                "x-queue-type": "quorum", "x-single-active-consumer": True,
                "x-delivery-limit": settings.delivery_limit,
                "x-dead-letter-exchange": settings.dead_letter_exchange,
                "x-dead-letter-routing-key": settings.dead_letter_queue})
        # Expired retries go back to the main queue at least once, even if a broker node fails meanwhile.
        channel.queue_declare(settings.retry_queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": settings.queue,
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise ConfigError(f"cannot declare couchsync's queues: {exc.reply_text}") from exc
    try:
        # No delivery limit: `dlq list` reads dead letters and puts them back.
        channel.queue_declare(settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise ConfigError(f"cannot declare couchsync's dead-letter queue: {exc.reply_text}") from exc
        logger.warning("the dead-letter queue %s is a classic queue, on one broker node: see the README, "
                       "Upgrading, to make it a quorum queue", settings.dead_letter_queue)
        channel = connection.channel()
    try:
        channel.queue_bind(settings.dead_letter_queue, settings.dead_letter_exchange, settings.dead_letter_queue)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise ConfigError(f"cannot bind couchsync's dead-letter queue: {exc.reply_text}") from exc
    return channel


def connect(settings: AmqpSettings, first: int = 0) -> tuple[BlockingConnection, int]:
    """A connection to the broker: its addresses tried in turn from number `first`; the connection and the
    number of the address that answered.

    Raises:
        ConfigError: a node refused the credentials (restarting will not help).
        BrokerUnavailable: no address could be reached.
    """
    failures = []
    for offset in range(len(settings.urls)):
        number = (first + offset) % len(settings.urls)
        url = settings.urls[number]
        parameters = pika.URLParameters(url)
        parameters.credentials = pika.PlainCredentials(settings.username, settings.password.value)
        parameters.heartbeat = settings.heartbeat
        parameters.blocked_connection_timeout = 60
        parameters.client_properties = {"connection_name": "couchsync"}
        try:
            return BlockingConnection(parameters), number
        except pika.exceptions.ProbableAuthenticationError as exc:
            raise ConfigError(f"the broker at {redact(url)} refused the credentials of {settings.username}") from exc
        except pika.exceptions.AMQPError as exc:
            failures.append(f"{redact(url)}: {type(exc).__name__}")
    raise BrokerUnavailable(f"broker unreachable ({'; '.join(failures)})")


def peek(channel: BlockingChannel, queue: str, limit: int) -> list[tuple[Any, pika.BasicProperties, bytes]]:
    """Up to `limit` messages of the queue (method, properties, body), left unacknowledged: closing the
    channel puts them back, in order (how `dlq` and `hold` read their queues without taking from them)."""
    found = []
    for _ in range(limit):
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        found.append((method, properties, body))
    return found
