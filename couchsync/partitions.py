"""Partitions: which of couchsync's P partition queues an organization's messages go to, and how many of
them one worker should hold. Pure: no I/O, no clock.

Why couchsync's own hash and not RabbitMQ's consistent-hash exchange: the exchange is a plugin an operator
must enable on every broker node, and it hashes the routing key or a header the publisher sets. The
directory's routing keys (`b2b.group.member.added`, `user.created`) do not name the organization, its
publishers publish as they always did, and a `user.created` may name its organization only by a domain
that only CouchDB can resolve. So the worker's intake consumers read the organization from the body
(resolving a domain when they must), hash it here, and re-publish to the partition queue with a
publisher confirm before the ack: no plugin, nothing lost, and the same partition for every message of
an organization, retries included (a retry comes back through the intake queue and is hashed again).

The hash is SHA-256, not Python's `hash()` (salted per process): every worker and every version must
send an organization to the same partition.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection


def partition_of(key: str, partitions: int) -> int:
    """The partition (0 .. partitions-1) of an organization's (or any key's) messages; stable everywhere."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def share(partitions: int, workers: int) -> int:
    """How many partitions one of `workers` workers may hold: its fair share, rounded up."""
    return math.ceil(partitions / max(1, workers))


def to_release(held: Collection[int], partitions: int, workers: int) -> list[int]:
    """The partitions a worker holding `held` gives up, highest first, so that it holds at most its share.

    Giving one up sends it to the next worker registered on its queue (RabbitMQ 3.10 activates the first
    registered consumer of a single-active-consumer queue, the next one when it goes): a worker above its
    share passes the excess on, a worker below it takes what comes, and since each hand-over moves the
    releasing worker to the back of that queue's line, the partitions end up spread.
    """
    excess = len(held) - share(partitions, workers)
    return sorted(held, reverse=True)[:excess] if excess > 0 else []
