"""Consumer: the pika connection, couchsync's queues, the message loop, reconnection and shutdown.

Topology, declared idempotently on every connection (names from `AmqpSettings`):

    <exchange> (topic, the directory's)  --b2b.group.#-->  <prefix>b2b.group        quorum, x-delivery-limit
    <prefix>b2b.group.pNNN    P partitions: quorum, x-single-active-consumer, fed from <prefix>b2b.group
                              (the intake) by the workers, each organization to one (`couchsync.partitions`)
    <prefix>b2b.group.retry   quorum; a failed attempt waits there (per-message TTL), then goes back
    <prefix>dlx (direct)  -->  <prefix>b2b.group.dead   the dead letters, each with its reason

Every outcome is decided by `disposition` (pure) and settled on the connection's thread:
applied → ack; a passing failure → republished to the retry queue with the attempt count in a header,
then acked; a lasting failure, or the last attempt → published to the dead-letter queue with the reason
in `x-couchsync-reason`, then acked. Publishing is confirmed before the ack, so nothing is acked away
unhandled. Retries are counted by couchsync's own header, not by the broker, whose counting changed
across versions (3.10 counts every requeue, 4.3 only rejects); `x-delivery-limit` stays as the
backstop for a message that kills the worker each time it is handled.

A failure that is CouchDB's own (the server down, or refusing the sync identity: `health()` says so, the
breaker of `couchsync.breaker`) is a pause, not an attempt: the consumer is cancelled, each message held
is republished unchanged (same headers, same attempt count) to its own queue and acked, and `health()`
is asked every `pause_probe` seconds; once it answers None, the consumer is started again. Holding no
delivery while paused is what keeps a paused message clear of the broker's `consumer_timeout` (which
closes the channel of a delivery held too long) and of `x-delivery-limit` (which counts requeues).

`couchsync.dead_letters` reads and replays the dead letters.

Events are handled on a thread pool (`prefetch` threads): the connection's thread only moves frames,
so heartbeats never lapse during a long fan-out, and results come back to it through
`add_callback_threadsafe`. With `Batching`, messages of one key (an organization) are gathered on the
connection's thread for up to `batch_wait` seconds or `batch` messages, then handled together on one
thread; each is still settled on its own.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pika
import pika.data
import pika.exceptions
import tenacity
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from couchsync.config import AmqpSettings, redact
from couchsync.errors import (
    AccessDenied, BrokerUnavailable, ConfigError, CouchsyncError, CouchUnavailable, InstancesFailed)
from couchsync.metrics import Metrics
from couchsync.partitions import partition_of, to_release
from couchsync.systemd import Notifier

logger = logging.getLogger(__name__)

BINDING = "b2b.group.#"  # every group event, unknown ones too: they are dead-lettered, not lost unrouted
USER_BINDING = "user.created"
ATTEMPT = "x-couchsync-attempt"
ROUTING_KEY = "x-couchsync-routing-key"  # the original key, once a message has gone through our queues
REASON = "x-couchsync-reason"
DEAD_AT = "x-couchsync-dead-lettered-at"
_OURS = frozenset({ATTEMPT, ROUTING_KEY, REASON, DEAD_AT, "x-delivery-count"})  # set again, never copied

# What a republished message may carry. Its properties and headers must fit in one frame (131,072 bytes
# unless the broker asks for less); a bigger one makes the broker close the connection (FRAME_ERROR),
# which drops every message in flight, again at each attempt. With these bounds they stay under 8 KiB.
MAX_REASON = 1000  # characters of a reason, in a header or a log line
MAX_ROUTING_KEY = 255  # an AMQP routing key is a short string
MAX_HEADER_BYTES = 512  # one of the publisher's headers, encoded; a bigger one is left out
MAX_HEADERS_BYTES = 2048  # all of the publisher's headers copied, encoded
PROBE_SECONDS = 5.0  # between two reads of the queue depths (one passive queue.declare per queue)
# A partition taken over with messages its previous holder had not settled (redelivered) waits this long
# before its first batch starts. That holder may have lost only its broker connection in the middle of a
# batch: the broker hands the partition over at once, while that batch still writes (it cannot be
# interrupted). Ten seconds covers a batch under a burst; the writes are idempotent anyway, so a longer
# one only costs contention. A partition whose first delivery is a new message starts at once.
TAKEOVER_SECONDS = 10.0

# Handles one message: (routing key, body) → log fields; raises a CouchsyncError on failure. A field
# `refusals` (an int) counts the changes an instance refused: the message is applied all the same;
# `bulk_writes` (an int) counts the `_bulk_docs` requests made to instance databases.
Handler = Callable[[str, bytes], Mapping[str, object]]
# Outcome of one message of a batch: its log fields, or the error that ends it.
Outcome = Mapping[str, object] | Exception
# CouchDB's health, asked when a message fails with an error it may be to blame for: None when it serves
# the sync identity, else the reason to pause ("couchdb", "credentials"). Blocking; called on pool threads.
Health = Callable[[], str | None]
# The organization a message belongs to, for its partition: (routing key, body) → the organization's id,
# or None for a message that names none (not a valid event). May read CouchDB (a user.created naming its
# organization by domain only); raises a CouchsyncError on failure, settled like a handler's.
Route = Callable[[str, bytes], str | None]


@dataclass(frozen=True, slots=True)
class Batching:
    """How messages are gathered into batches (`AmqpSettings.batch`, `batch_wait`).

    `key(routing_key, body)` runs on the connection's thread as each message arrives: the key of the
    messages it may be handled with (an organization), or None to handle it alone, at once (a message
    that is not a valid event is dead-lettered without waiting for a batch). `handle(messages)` handles
    one batch on a pool thread: one outcome per message, in order; each is then settled on its own,
    with its own attempt count.
    """

    key: Callable[[str, bytes], str | None]
    handle: Callable[[Sequence[tuple[str, bytes]]], Sequence[Outcome]]


@dataclass(frozen=True, slots=True)
class Ack:
    """Applied: acknowledge."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A passing failure: try again after `delay` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A lasting failure, or the last attempt: to the dead-letter queue with the reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class Pause:
    """CouchDB's fault, not the message's: handed back unchanged while the worker pauses; no attempt counted."""

    reason: str


Decision = Ack | Retry | DeadLetter | Pause


def retry_delay(attempt: int, first: float, cap: float) -> float:
    """The delay after failed attempt number `attempt` (1-based): doubling from `first`, at most `cap`."""
    return float(min(cap, first * 2 ** (attempt - 1)))


def disposition(error: BaseException | None, attempt: int, settings: AmqpSettings) -> Decision:
    """What to do with a message whose attempt number `attempt` ended with `error` (None: applied)."""
    if error is None:
        return Ack()
    if not isinstance(error, CouchsyncError):
        # A bug, most likely the same at every attempt: keep the message and the reason for a replay.
        return DeadLetter(bounded(f"unexpected {type(error).__name__}: {error}"))
    reason = f"{type(error).__name__}: {error}"
    if not error.retryable:
        return DeadLetter(bounded(reason))
    if attempt >= settings.delivery_limit:
        return DeadLetter(bounded(f"gave up after {attempt} attempts: {reason}"))
    return Retry(retry_delay(attempt, settings.retry_delay, settings.retry_delay_max), bounded(reason))


def suspects_server(error: BaseException | None) -> bool:
    """Whether a failure may be CouchDB's own rather than the message's: worth asking `Health`."""
    return isinstance(error, (CouchUnavailable, AccessDenied, InstancesFailed))


def decide(error: BaseException | None, attempt: int, settings: AmqpSettings, paused: str | None) -> Decision:
    """`disposition`, unless CouchDB is failing (`paused`: the reason) and the error may be its doing."""
    if paused is not None and suspects_server(error):
        return Pause(paused)
    return disposition(error, attempt, settings)


def bounded(text: str, limit: int = MAX_REASON) -> str:
    """`text`, cut to `limit` characters (an error's text may quote whatever a message held)."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message being handled, and the connection it came on (its tag is only valid there)."""

    generation: int
    tag: int
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    attempt: int
    queue: str  # the queue it came from: the intake, a partition, or (without partitions) the main queue

    @classmethod
    def of(cls, generation: int, method: Any, properties: pika.BasicProperties, body: bytes, *,
           queue: str) -> Delivery:
        """A delivery from couchsync's queue `queue` (the main one, or a partition)."""
        headers = properties.headers or {}
        # Our own count, and the broker's where it has one (a worker that died mid-message).
        attempt = max(count_header(headers.get(ATTEMPT)) or 1, count_header(headers.get("x-delivery-count")) + 1)
        return cls(generation, method.delivery_tag, routing_key_of(method, headers, queue), body, properties, attempt,
                   queue)

    @property
    def message_id(self) -> str:
        return str(self.properties.message_id or message_digest(self.routing_key, self.body))


def routing_key_of(method: Any, headers: Mapping[str, Any], queue: str) -> str:
    """The routing key a delivery from the main queue `queue` is handled as: its own, unless it came back
    through couchsync's own path.

    Couchsync's own path is the only one that reaches the main queue through the default exchange (""),
    addressed by the queue's name: the retry queue dead-letters an expired message there, and `dlq
    replay` publishes there. Only such a delivery is handled by the original key that couchsync kept in
    `x-couchsync-routing-key`. A message routed by the directory's exchanges arrives with the
    exchange's name and its own routing key, and that key decides, whatever headers its publisher set.
    Publishing to the default exchange needs write permission on `amq.default` (RabbitMQ's name for it
    in permissions), which the directory's publishers do not need and should not have; no HMAC is needed.
    """
    if method.exchange == "" and method.routing_key == queue:
        kept = headers.get(ROUTING_KEY)
        if isinstance(kept, bytes):
            kept = kept.decode("utf-8", errors="replace")
        if isinstance(kept, str) and 0 < len(kept) <= MAX_ROUTING_KEY:
            return kept
    return str(method.routing_key)


def republish_headers(original: Mapping[str, Any] | None, routing_key: str,
                      ours: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a message republished to the retry or dead-letter queue: `ours`, the routing key, and
    those of the publisher's that fit (at most MAX_HEADER_BYTES each, MAX_HEADERS_BYTES in all, encoded).

    Every value couchsync sets is bounded (reasons to MAX_REASON characters), so no message, whatever
    headers it came with, makes a republish too big for a frame.
    """
    kept: dict[str, Any] = {}
    left_out = 0
    room = MAX_HEADERS_BYTES
    for key, value in (original or {}).items():
        if key in _OURS:
            continue
        size = _encoded_size(key, value)
        if size <= min(MAX_HEADER_BYTES, room):
            kept[key] = value
            room -= size
        else:
            left_out += 1
    if left_out:
        logger.warning("left out %d header(s) too big to carry", left_out)
    own = {key: bounded(value) if isinstance(value, str) else value for key, value in ours.items()}
    return {**kept, ROUTING_KEY: bounded(routing_key, MAX_ROUTING_KEY), **own}


def _encoded_size(key: str, value: Any) -> int:
    """The size of one header in an AMQP field table; a header pika cannot encode counts as too big."""
    try:
        return int(pika.data.encode_table([], {key: value}))
    except (pika.exceptions.AMQPError, TypeError, ValueError, OverflowError, struct.error):
        return MAX_HEADERS_BYTES + 1


def count_header(value: object) -> int:
    """A count from a header; anything but a non-negative integer counts as 0 (a header is input too)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def message_digest(routing_key: str, body: bytes) -> str:
    """A short stable id for a message without one: its routing key and body."""
    return hashlib.sha256(routing_key.encode() + b"\0" + body).hexdigest()[:12]


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


_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosed, pika.exceptions.ChannelWrongStateError)


@dataclass
class _Session:
    """One connection's state; deliveries of an older one cannot be settled (the broker redelivers them)."""

    generation: int
    connection: BlockingConnection
    channel: BlockingChannel
    in_flight: dict[int, Delivery] = field(default_factory=dict)
    # Batches being gathered, by key: their deliveries (in flight too) and when the first came.
    gathering: dict[str, tuple[list[Delivery], float]] = field(default_factory=dict)
    consumers: dict[str, str] = field(default_factory=dict)  # queue → consumer tag; empty: paused or stopping
    # Messages to hand back once the consumers are cancelled (in flight too): handed back earlier, each
    # ack would make room for a new delivery.
    parked: list[Delivery] = field(default_factory=list)
    held: set[int] = field(default_factory=set)  # partitions delivered from: this worker is their active consumer
    held_since: dict[int, float] = field(default_factory=dict)  # when each became held (monotonic)
    # Partitions being given up: the deliveries that came meanwhile, handed back once the rest has settled.
    releasing: dict[int, list[Delivery]] = field(default_factory=dict)

    def queue_of(self, consumer_tag: str) -> str | None:
        return next((queue for queue, tag in self.consumers.items() if tag == consumer_tag), None)


class Consumer:
    """Consumes couchsync's queue until `stop()`, reconnecting with capped, jittered backoff.

    With `route`, the main queue is the intake: each message is re-published to the partition queue of
    its organization (confirmed, then acked), and the worker consumes every partition queue, holding
    those the broker makes it the active consumer of, and giving up those beyond its share (see
    `couchsync.partitions`). Without, it consumes the main queue itself.
    """

    def __init__(self, settings: AmqpSettings, handle: Handler, metrics: Metrics,
                 notifier: Notifier | None = None, *, batching: Batching | None = None,
                 health: Health | None = None, route: Route | None = None) -> None:
        self._settings = settings
        self._handle = handle
        self._route = route
        self._partitions = {queue: number for number, queue in enumerate(settings.partition_queues)} if route else {}
        self._workers = 1  # consumers of the intake queue at the last probe: one per worker
        # Organizations with a batch running (any connection's): their next batch waits for its writes.
        self._running: set[str] = set()
        self._running_lock = threading.Lock()
        self._health = health
        self.paused: str | None = None  # the reason, while paused (set and cleared on the connection's thread)
        self._health_probe: Future[str | None] | None = None
        self._next_health_probe = 0.0
        self._batching = batching if settings.batch > 1 else None
        self._metrics = metrics
        self._notifier = notifier or Notifier(None)
        self._pool = ThreadPoolExecutor(settings.prefetch, thread_name_prefix="couchsync-event")
        self._session: _Session | None = None
        self._generation = 0
        self._address = 0  # the number of the broker address to try first
        # A plain flag, not an Event: stop() runs in a signal handler, where taking a lock can deadlock.
        self._stop_requested = False
        self.consuming = False
        self.drained = True  # False when a shutdown left an event still running
        self._empty_at: float | None = None  # when the main queue was last seen empty (Unix time)
        self._last_published = 0.0  # the newest `timestamp` of a delivered message (Unix time)

    def stop(self) -> None:
        """Ask the consumer to stop (safe from a signal handler)."""
        self._stop_requested = True

    def problem(self) -> str | None:
        """What keeps the worker from consuming (for /healthz), or None while it consumes."""
        if self.paused is not None:
            return f"paused: {self.paused}"
        return None if self.consuming else "not consuming"

    def run(self) -> None:
        """Consume until stop(); return once in-flight messages are settled or handed back.

        Raises:
            ConfigError: wrong credentials, or queues that exist with other arguments.
        """
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(BrokerUnavailable),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
            stop=lambda state: self._stop_requested, sleep=self._sleep, reraise=True,
            before_sleep=lambda state: logger.warning("broker unavailable (%s), connecting again in %.1fs",
                                                      state.outcome.exception() if state.outcome else "",
                                                      state.upcoming_sleep))
        try:
            while not self._stop_requested:
                try:
                    retrying(self._consume)
                except BrokerUnavailable:
                    if not self._stop_requested:
                        raise
        finally:
            self._pool.shutdown(wait=False)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop_requested and time.monotonic() < deadline:
            self._notifier.watchdog()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _consume(self) -> None:
        """One connection: consume until it is lost (return, to connect again) or a stop is asked.

        A lost connection is opened again starting with the next address: its node may be the one that
        went away (a cluster's quorum queues are served by every node).
        """
        connection, number = connect(self._settings, self._address)
        self._address = (number + 1) % len(self._settings.urls)
        self._generation += 1
        try:
            channel = declare(connection, self._settings)
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self._settings.prefetch_count)
            session = self._session = _Session(self._generation, connection, channel)
            if self.paused is None:  # a connection made while paused consumes once the pause ends
                self._subscribe(session)
            if self._generation > 1:
                self._metrics.reconnects.inc()
            self.consuming = True
            self._notifier.ready(f"consuming {self._settings.queue}")
            logger.info("consuming %s at %s (prefetch %d)", self._settings.queue,
                        redact(self._settings.urls[number]), self._settings.prefetch)
            tick = min(0.5, self._settings.batch_wait / 2) if self._batching else 0.5
            next_probe = 0.0
            while not self._stop_requested:
                connection.process_data_events(time_limit=tick)
                if self.paused is None:
                    self._start_waited(session)
                    self._release_ready(session)
                else:
                    self._while_paused(session)
                self._notifier.watchdog()
                if time.monotonic() >= next_probe:
                    self._probe(channel)
                    next_probe = time.monotonic() + PROBE_SECONDS
            self._drain(session)
        except _LOST as exc:
            logger.warning("broker connection lost: %s", type(exc).__name__)
        finally:
            self.consuming = False
            if self._session is not None:
                self._metrics.in_flight.dec(len(self._session.in_flight))
                if self._session.held:  # the broker has made other workers active on them by now
                    self._session.held.clear()
                    self._log_held(self._session)
            self._session = None
            if connection.is_open:
                try:
                    connection.close()
                except _LOST:
                    pass

    def _probe(self, channel: BlockingChannel) -> None:
        """Queue depths (a passive queue.declare: the broker's own count of ready messages) and a bound on
        the age of the main queue's oldest ready message.

        AMQP shows no message without handing it out, so the age is bounded, not read: the main queue is
        FIFO, so every ready message arrived after the later of (a) the last time it was seen empty and (b)
        the `timestamp` property of the last message delivered (when its publisher set one; couchsync keeps
        it on a retry). Without timestamps it is how long the queue has not been empty.
        """
        depths = {label: channel.queue_declare(name, passive=True).method.message_count for label, name in (
            ("main", self._settings.queue), ("retry", self._settings.retry_queue),
            ("dead", self._settings.dead_letter_queue))}
        for label, count in depths.items():
            self._metrics.queue_messages.labels(label).set(count)
        now = time.time()
        if depths["main"] == 0 or self._empty_at is None:
            self._empty_at = now
        age = 0.0 if depths["main"] == 0 else now - max(self._empty_at, self._last_published)
        self._metrics.oldest_message_age.set(max(0.0, age))
        if self._route is not None and self.paused is None and self._session is not None:
            # Every worker has one consumer on the intake queue: the broker's count is the number of workers.
            self._workers = channel.queue_declare(self._settings.queue, passive=True).method.consumer_count
            self._rebalance(self._session)

    def _subscribe(self, session: _Session) -> None:
        """Consume the main queue, and with partitions every partition queue (active on those the broker says)."""
        for queue in (self._settings.queue, *self._partitions):
            session.consumers[queue] = session.channel.basic_consume(queue, self._on_message)

    def _unsubscribe(self, session: _Session) -> None:
        for tag in session.consumers.values():
            session.channel.basic_cancel(tag)
        session.consumers.clear()
        for number in list(session.releasing):
            session.parked.extend(session.releasing.pop(number))
        if session.held:
            session.held.clear()
            self._log_held(session)

    def _rebalance(self, session: _Session) -> None:
        """Start giving up the partitions held beyond this worker's share."""
        for number in to_release(session.held - session.releasing.keys(), self._settings.partitions, self._workers):
            queue = self._settings.partition_queues[number]
            waiting = session.releasing[number] = []
            for key in list(session.gathering):  # not started: handed back with what comes meanwhile
                deliveries, since = session.gathering[key]
                waiting.extend(d for d in deliveries if d.queue == queue)
                kept = [d for d in deliveries if d.queue != queue]
                if kept:
                    session.gathering[key] = (kept, since)
                else:
                    del session.gathering[key]

    def _release_ready(self, session: _Session) -> None:
        """Give up each partition being released once none of its messages is being handled here: cancelled,
        the next registered worker becomes its active consumer; what came meanwhile goes back unchanged, and
        this worker registers again, at the back of the line."""
        for number, waiting in list(session.releasing.items()):
            queue = self._settings.partition_queues[number]
            if sum(1 for d in session.in_flight.values() if d.queue == queue) > len(waiting):
                continue  # a batch of it is still running: the next worker must not start beside it
            del session.releasing[number]
            session.held.discard(number)  # first: the next worker may be active before the cancel returns
            session.channel.basic_cancel(session.consumers.pop(queue))
            for delivery in waiting:
                self._finish(session, delivery, Pause("released"), {}, 0.0)
            session.consumers[queue] = session.channel.basic_consume(queue, self._on_message)
            logger.info("released partition %d to the next worker (share %d of %d partitions among %d workers)",
                        number, -(-self._settings.partitions // max(1, self._workers)), self._settings.partitions,
                        self._workers)
            self._log_held(session)

    def _log_held(self, session: _Session) -> None:
        """The metric and the log line of which partitions this worker holds (is the active consumer of)."""
        for number in range(self._settings.partitions):
            self._metrics.partition_held.labels(str(number)).set(1 if number in session.held else 0)
        logger.info("partitions held: %s (%d of %d, %d workers)",
                    ",".join(map(str, sorted(session.held))) or "none", len(session.held),
                    self._settings.partitions, self._workers)

    def _trip(self, reason: str) -> None:
        """Pause (on the connection's thread): the loop cancels the consumer and hands back what it holds."""
        if self.paused == reason:
            return
        if self.paused is not None:
            logger.warning("paused: the reason is now %s (was %s)", reason, self.paused)
        else:
            logger.warning("paused (%s): CouchDB is failing; messages are handed back unchanged and consumption "
                           "resumes once a probe every %.0fs finds it answering", reason, self._settings.pause_probe)
        self.paused = reason
        self._metrics.set_paused(reason)
        self._next_health_probe = time.monotonic() + self._settings.pause_probe

    def _while_paused(self, session: _Session) -> None:
        """Cancel the consumer, hand back the messages held, probe CouchDB; consume again once it answers."""
        if session.consumers:
            # Cancelled first: the acks of the hand-backs below must not make room for new deliveries.
            self._unsubscribe(session)
        for key in list(session.gathering):
            deliveries, _ = session.gathering.pop(key)
            session.parked.extend(deliveries)
        while session.parked:
            self._finish(session, session.parked.pop(0), Pause(self.paused or "couchdb"), {}, 0.0)
        self._probe_health(session)

    def _probe_health(self, session: _Session) -> None:
        probe = self._health_probe
        if probe is not None and probe.done():
            self._health_probe = None
            reason = probe.result()
            if reason is None:
                self._resume(session)
                return
            self._trip(reason)
        if self._health is not None and self._health_probe is None and time.monotonic() >= self._next_health_probe:
            self._health_probe = self._pool.submit(self._ask_health)
            self._next_health_probe = time.monotonic() + self._settings.pause_probe

    def _ask_health(self) -> str | None:
        """`health()` (None without one); a bug in it is logged and taken as healthy, never lets a message
        go unsettled."""
        if self._health is None:
            return None
        try:
            return self._health()
        except Exception:  # noqa: BLE001 (as in _work: the message must still be settled)
            logger.exception("probing CouchDB failed")
            return None

    def _resume(self, session: _Session) -> None:
        logger.warning("resumed: CouchDB answers again (paused for %s)", self.paused)
        self.paused = None
        self._metrics.set_paused(None)
        self._subscribe(session)

    def _drain(self, session: _Session) -> None:
        """Stop taking messages; let in-flight ones finish for a while, then hand the rest back."""
        self._notifier.stopping()
        if session.consumers:
            self._unsubscribe(session)
        while session.parked:  # paused: back to the queue as they came, not requeued (a requeue counts)
            self._finish(session, session.parked.pop(0), Pause(self.paused or "couchdb"), {}, 0.0)
        deadline = time.monotonic() + self._settings.shutdown_timeout
        while session.in_flight and time.monotonic() < deadline:
            for key in list(session.gathering):  # received already: started, each once its previous batch ends
                self._start(session, key)
            session.connection.process_data_events(time_limit=0.2)
        for tag in list(session.in_flight):
            # basic.nack with requeue: "this consumer cannot take it now", not a failed attempt.
            session.channel.basic_nack(tag, multiple=False, requeue=True)
            logger.warning("handed back message %d, still running at shutdown", tag)
        self.drained = not session.in_flight

    def _on_message(self, channel: BlockingChannel, method: Any, properties: pika.BasicProperties,
                    body: bytes) -> None:
        assert self._session is not None
        session = self._session
        queue = session.queue_of(method.consumer_tag) or self._settings.queue
        delivery = Delivery.of(session.generation, method, properties, body, queue=queue)
        if isinstance(properties.timestamp, int) and properties.timestamp <= time.time():
            self._last_published = max(self._last_published, float(properties.timestamp))
        session.in_flight[delivery.tag] = delivery
        self._metrics.in_flight.inc()
        if self.paused is not None:  # sent before the broker took the cancel: handed back with the others
            session.parked.append(delivery)
            return
        if self._route is not None and queue == self._settings.queue:
            self._pool.submit(self._work_route, session.connection, delivery)
            return
        number = self._partitions.get(queue)
        if number is not None:
            if number not in session.held:
                session.held.add(number)
                session.held_since[number] = time.monotonic() if method.redelivered else 0.0
                self._log_held(session)
            if number in session.releasing:  # being given up: not started here
                session.releasing[number].append(delivery)
                return
        key = self._batching.key(delivery.routing_key, delivery.body) if self._batching else None
        if key is None:
            self._pool.submit(self._work, session.connection, delivery)
            return
        deliveries, _ = session.gathering.setdefault(key, ([], time.monotonic()))
        deliveries.append(delivery)
        if len(deliveries) >= self._settings.batch and time.monotonic() - self._taken_over(
                session, delivery) >= TAKEOVER_SECONDS:
            self._start(session, key)

    def _start_waited(self, session: _Session) -> None:
        """Start the batches whose first message has waited `batch_wait`, or that are full."""
        now = time.monotonic()
        for key in [key for key, (deliveries, since) in session.gathering.items()
                    if (now - since >= self._settings.batch_wait or len(deliveries) >= self._settings.batch)
                    and now - self._taken_over(session, deliveries[0]) >= TAKEOVER_SECONDS]:
            self._start(session, key)

    def _taken_over(self, session: _Session, delivery: Delivery) -> float:
        """When this worker became the holder of the delivery's partition (0: not from a partition)."""
        number = self._partitions.get(delivery.queue)
        return session.held_since.get(number, 0.0) if number is not None else 0.0

    def _start(self, session: _Session, key: str) -> None:
        """Start a batch of `key`, unless one is running: an organization's batches run one at a time, so
        the next one plans on the writes of the previous (it keeps gathering meanwhile)."""
        with self._running_lock:
            if key in self._running:
                return
            self._running.add(key)
        deliveries, since = session.gathering.pop(key)
        if len(deliveries) > self._settings.batch:
            session.gathering[key] = (deliveries[self._settings.batch:], since)
            deliveries = deliveries[:self._settings.batch]
        self._pool.submit(self._work_batch, session.connection, key, deliveries)

    def _work(self, connection: BlockingConnection, delivery: Delivery) -> None:
        """On a pool thread: handle the message, then settle it on the connection's thread."""
        started = time.monotonic()
        try:
            outcome: Outcome = self._handle(delivery.routing_key, delivery.body)
        except Exception as exc:  # noqa: BLE001 (the last-resort handler: a bug must not kill the worker)
            outcome = exc
        self._settle_later(connection, delivery, outcome, time.monotonic() - started)

    def _work_route(self, connection: BlockingConnection, delivery: Delivery) -> None:
        """On a pool thread: find the partition of a message of the intake queue, then forward it there (on
        the connection's thread); a failure to find it is settled as a handler's failure."""
        assert self._route is not None
        try:
            organization = self._route(delivery.routing_key, delivery.body)
        except Exception as exc:  # noqa: BLE001 (as in _work)
            self._settle_later(connection, delivery, exc, 0.0)
            return
        # A message naming no organization goes anywhere (the partition's consumer dead-letters it).
        number = partition_of(organization if organization is not None else delivery.message_id,
                              self._settings.partitions)
        try:
            connection.add_callback_threadsafe(functools.partial(self._forward, delivery, number))
        except _LOST:
            pass  # the connection is gone: the broker hands the message out again

    def _forward(self, delivery: Delivery, number: int) -> None:
        """On the connection's thread: re-publish a message of the intake queue to its partition, unchanged
        (its attempt count and original routing key in couchsync's headers), confirmed before the ack."""
        session = self._session
        if session is None or session.generation != delivery.generation or delivery.tag not in session.in_flight:
            return
        try:
            self._republish(session.channel, delivery, self._settings.partition_queues[number],
                            {ATTEMPT: delivery.attempt})
            session.channel.basic_ack(delivery.tag)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            logger.error("could not forward message %s to partition %d (%s): returned to the queue",
                         delivery.message_id, number, exc)
            session.channel.basic_reject(delivery.tag, requeue=True)
        del session.in_flight[delivery.tag]
        self._metrics.in_flight.dec()
        self._metrics.routed.labels(str(number)).inc()

    def _work_batch(self, connection: BlockingConnection, key: str, deliveries: list[Delivery]) -> None:
        """On a pool thread: handle a batch, then settle each of its messages on the connection's thread."""
        assert self._batching is not None
        started, started_at = time.monotonic(), time.time()
        try:
            outcomes = list(self._batching.handle([(d.routing_key, d.body) for d in deliveries]))
        except Exception as exc:  # noqa: BLE001 (as in _work)
            outcomes = [exc] * len(deliveries)
        finally:
            with self._running_lock:
                self._running.discard(key)
        seconds = time.monotonic() - started
        # One line per batch, with its organization and its span: whoever reads the workers' logs sees
        # which worker handled which organization when.
        logger.info("batch organization=%s messages=%d started=%.3f ended=%.3f", key, len(deliveries),
                    started_at, time.time())
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            self._settle_later(connection, delivery, outcome, seconds)

    def _settle_later(self, connection: BlockingConnection, delivery: Delivery, outcome: Outcome,
                      seconds: float) -> None:
        error = outcome if isinstance(outcome, Exception) else None
        if error is not None and not isinstance(error, CouchsyncError):
            logger.error("unexpected error on message %s", delivery.message_id, exc_info=error)
        fields = outcome if not isinstance(outcome, Exception) else {}
        # A plain read of `paused` from this thread: a pause starting meanwhile is caught by the probe.
        paused = self.paused or (self._ask_health() if suspects_server(error) else None)
        decision = decide(error, delivery.attempt, self._settings, paused)
        settle = functools.partial(self._settle, delivery, decision, fields, seconds)
        try:
            connection.add_callback_threadsafe(settle)
        except _LOST:
            pass  # the connection is gone: the broker hands the message out again

    def _settle(self, delivery: Delivery, decision: Decision, fields: Mapping[str, object], seconds: float) -> None:
        """On the connection's thread: ack, retry, dead-letter or (paused) hand back one message."""
        session = self._session
        if session is None or session.generation != delivery.generation or delivery.tag not in session.in_flight:
            return  # from a lost connection: redelivered, and applied again idempotently
        if isinstance(decision, Pause):
            self._trip(decision.reason)
            if session.consumers:
                session.parked.append(delivery)
                return
        self._finish(session, delivery, decision, fields, seconds)

    def _finish(self, session: _Session, delivery: Delivery, decision: Decision, fields: Mapping[str, object],
                seconds: float) -> None:
        try:
            if isinstance(decision, Pause):
                # Unchanged, to the queue it came from (its partition): the same attempt count (a pause
                # is no attempt), a new delivery count for the broker (a requeue would count towards
                # x-delivery-limit).
                self._republish(session.channel, delivery, delivery.queue, {ATTEMPT: delivery.attempt})
            elif isinstance(decision, Retry):
                self._republish(session.channel, delivery, self._settings.retry_queue, {
                    ATTEMPT: delivery.attempt + 1, REASON: decision.reason}, expiration=decision.delay)
            elif isinstance(decision, DeadLetter):
                self._republish(session.channel, delivery, self._settings.dead_letter_queue, {
                    ATTEMPT: delivery.attempt, REASON: decision.reason,
                    DEAD_AT: datetime.now(timezone.utc).isoformat(timespec="seconds")})
            session.channel.basic_ack(delivery.tag)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            # Not stored elsewhere: keep it here. A reject is a failed attempt on every broker version.
            logger.error("could not move message %s (%s): returned to the queue", delivery.message_id, exc)
            session.channel.basic_reject(delivery.tag, requeue=True)
        del session.in_flight[delivery.tag]
        self._metrics.in_flight.dec()
        self._record(delivery, decision, fields, seconds)

    def _republish(self, channel: BlockingChannel, delivery: Delivery, queue: str, headers: dict[str, Any],
                   expiration: float | None = None) -> None:
        properties = delivery.properties
        merged = republish_headers(properties.headers, delivery.routing_key, headers)
        channel.basic_publish("", queue, delivery.body, pika.BasicProperties(
            content_type=properties.content_type, content_encoding=properties.content_encoding,
            message_id=delivery.message_id, timestamp=properties.timestamp, delivery_mode=2, headers=merged,
            expiration=str(int(expiration * 1000)) if expiration is not None else None), mandatory=True)

    def _record(self, delivery: Delivery, decision: Decision, fields: Mapping[str, object], seconds: float) -> None:
        outcome = {Ack: "applied", Retry: "retried", DeadLetter: "dead_lettered", Pause: "paused"}[type(decision)]
        self._metrics.count_event(delivery.routing_key, outcome)
        refusals = fields.get("refusals")
        if isinstance(decision, Ack):
            self._metrics.observe_fanout(delivery.routing_key, seconds)
            if isinstance(refusals, int) and refusals > 0:
                self._metrics.count_refusals(delivery.routing_key, refusals)
            bulk_writes = fields.get("bulk_writes")
            if isinstance(bulk_writes, int) and bulk_writes > 0:
                self._metrics.bulk_writes.inc(bulk_writes)
        line = {"message": delivery.message_id, "delivery_tag": delivery.tag, "routing_key": delivery.routing_key,
                "attempt": delivery.attempt, "outcome": outcome, **fields, "seconds": round(seconds, 3)}
        if isinstance(decision, Ack):
            level = logging.WARNING if refusals else logging.INFO
            logger.log(level, "event %s", _logfmt(line), extra={"event": line})
        elif isinstance(decision, Pause):
            logger.info("event %s handed back, paused: %s", _logfmt(line), decision.reason,
                        extra={"event": {**line, "reason": decision.reason}})
        elif isinstance(decision, Retry):
            logger.warning("event %s retry_in=%.1fs reason=%r", _logfmt(line), decision.delay, decision.reason,
                           extra={"event": {**line, "retry_in": decision.delay, "reason": decision.reason}})
        else:
            logger.error("event %s reason=%r", _logfmt(line), decision.reason,
                         extra={"event": {**line, "reason": decision.reason}})


def _logfmt(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={value}" for key, value in fields.items())
