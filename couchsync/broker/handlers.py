"""What the consumer is handed by whoever wires it (the CLI): the callables that handle a message, gather
and handle batches, route a message to its partition and ask for CouchDB's health.

The broker side never imports `sync`: these callables are its only way to the use cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
