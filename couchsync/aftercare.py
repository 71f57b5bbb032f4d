"""An instance reconciled as soon as the guard puts its protection back (the guard's `on_restored`).

While a protection was deleted, any server admin could write managed documents (measured: a renamed
managed contact and a forged one). The guard puts the protection back within seconds; this reconciles
that instance at once, on a thread of its own so that the guard goes on following the feed, with
reconcile's usual limit on deletions (a mass deletion is refused and said, as `reconcile` does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from couchsync.documents import CONTACTS, GROUPS
from couchsync.errors import CouchsyncError
from couchsync.instances import Instance, InstanceDirectory

logger = logging.getLogger(__name__)

Reconcile = Callable[[Instance], str]  # reconciles one instance; what it found, for the log


class ReconcileOnRestore:
    """Call with a database's name: its instance is reconciled, one instance at a time, in order."""

    def __init__(self, directory: InstanceDirectory, reconcile: Reconcile) -> None:
        self._directory = directory
        self._reconcile = reconcile
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="couchsync-aftercare")

    def __call__(self, db: str) -> None:
        self._pool.submit(self._run, db)

    def close(self) -> None:
        """Stop taking instances; those asked for already are left (reconcile finishes them later)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, db: str) -> None:
        try:
            instance = next((instance for instance in self._directory.every_instance()
                             if db in (instance.database(CONTACTS), instance.database(GROUPS))), None)
            if instance is None or not instance.org_id:
                return  # a database of no instance of an organization: nothing couchsync manages there
            outcome = self._reconcile(instance)
            logger.warning("protection guard: %s reconciled after its protection was put back: %s",
                           instance.domain, outcome)
        except CouchsyncError as exc:
            logger.warning("protection guard: %s not reconciled after its protection was put back (the next "
                           "reconcile will): %s", db, exc)
        except Exception:  # noqa: BLE001 (the thread's last resort: the next one must still run)
            logger.exception("protection guard: reconciling after a protection was put back failed")
