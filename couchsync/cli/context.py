"""What every command needs (`Context`), built once from the global options, and the CouchDB-side objects
it builds: the gateway, the design documents, the instance directory, the synchronizer, the reconciler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from couchsync import config, design_docs
from couchsync.couch import CouchGateway, MangoIndex
from couchsync.design_docs import DesignDocs
from couchsync.instances import InstanceDirectory
from couchsync.reconcile import Reconciler
from couchsync.settle import Settling
from couchsync.sync import Synchronizer


@dataclass
class Context:
    """What every command needs, built once from the options."""

    couch: config.CouchSettings
    sync: config.SyncSettings
    design_source: Path | None  # None: the sources shipped in the package
    on_rejected: Callable[[str], None] | None = None  # a skipped instance record (the worker counts them)
    identity: config.SyncIdentity | None = None  # given, a bootstrap installs the protection before it copies
    on_seeded: Callable[[str], None] | None = None  # a state seeded again, with why (the worker counts them)

    def gateway(self) -> CouchGateway:
        return CouchGateway(self.couch)

    def design(self) -> DesignDocs:
        return design_docs.load(self.design_source)

    def directory(self, couch: CouchGateway, indexes: Sequence[MangoIndex] = ()) -> InstanceDirectory:
        return InstanceDirectory(couch, self.sync.global_db, indexes=indexes, page_size=self.sync.page_size,
                                 on_rejected=self.on_rejected)

    def synchronizer(self, couch: CouchGateway, settling: Settling | None = None) -> Synchronizer:
        design = self.design()
        protection = design.protection(self.identity) if self.identity else None
        # Whatever the command, a state database it makes is protected (by --sync-name, else --couch-user).
        identity = self.identity or config.load_identity([self.couch.username or ""])
        return Synchronizer(couch, self.directory(couch, design.global_indexes), design, self.sync, protection,
                            settling, state_target=design.state_target(self.sync.state_db, identity),
                            on_seeded=self.on_seeded)

    def reconciler(self, couch: CouchGateway, sync: Synchronizer) -> Reconciler:
        return Reconciler(couch, sync.directory, sync.states, sync.instances_of, sync.reader, sync.writer,
                          sync.copier, page_size=self.sync.page_size, concurrency=self.sync.concurrency)
