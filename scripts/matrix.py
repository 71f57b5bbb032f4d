"""The pytest runs of `scripts/test`, one per server, each announced, timed and summed up.

No pytest arguments: the whole suite on Apache CouchDB (the release COUCHSYNC_COUCHDB_RELEASE names, else
the shared one beside the checkout), then again on PouchDB Server, then the scale-out tests (marked
`cluster`) on a three-node CouchDB cluster of that release and a three-node RabbitMQ cluster. With
arguments: one run, on Apache CouchDB when a release is at hand. COUCHSYNC_TEST_SERVER=couchdb or pouchdb
keeps one server only (no cluster part); COUCHSYNC_TEST_COUCH_URL (a CouchDB with admin credentials)
replaces them all: one run there, the cluster tests left out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import localcouch

SERVER_ENV = "COUCHSYNC_TEST_SERVER"
CHOICES = {"couchdb": localcouch.COUCHDB, "pouchdb": localcouch.POUCHDB}
# pytest's last line, e.g. "==== 3 failed, 412 passed in 612.31s (0:10:12) ====" (no "=" with -q).
SUMMARY = re.compile(r"^=* ?(\d+ \w.* in [\d.]+s\b.*?) ?=*$")


@dataclass(frozen=True)
class Part:
    """One pytest run: on which server, and the environment that makes `localcouch.server()` pick it."""

    kind: str
    where: str | None = None  # the release, or the external URL
    selection: tuple[str, ...] = ()  # pytest arguments of the part (which tests)
    clusters: bool = False  # the part of the cluster tests

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        env = {key: value for key, value in base.items() if key != localcouch.RELEASE_ENV}
        if self.kind == localcouch.COUCHDB and self.where:
            env[localcouch.RELEASE_ENV] = self.where
        return env

    def label(self) -> str:
        """`Apache CouchDB 3.4.3`; finding the version unpacks a release tarball (once, as its run would)."""
        if self.kind == localcouch.EXTERNAL:
            parts = urlsplit(self.where or "")
            return f"the CouchDB at {parts.scheme}://{parts.hostname}:{parts.port or 5984}"
        if self.kind == localcouch.COUCHDB and self.where:
            version = localcouch.release_version(Path(self.where))
        else:
            version = localcouch.pouchdb_version()
        label = f"{localcouch.KIND_NAMES[self.kind]} {version}".strip()
        return f"clusters: {label} x3 nodes, RabbitMQ x3 nodes" if self.clusters else label


class UsageError(Exception):
    """The environment asks for a server that is not at hand."""


def plan(environ: Mapping[str, str], whole_suite: bool) -> list[Part]:
    """The runs to make, in order.

    Raises:
        UsageError: COUCHSYNC_TEST_SERVER is unknown, or asks for CouchDB with no release at hand.
    """
    # The whole suite leaves the cluster tests to a part of their own: they start their own clusters.
    one_server = ("-m", "not cluster") if whole_suite else ()
    if environ.get(localcouch.URL_ENV):
        return [Part(localcouch.EXTERNAL, environ[localcouch.URL_ENV], one_server)]
    wanted = environ.get(SERVER_ENV, "")
    if wanted and wanted not in CHOICES:
        raise UsageError(f"{SERVER_ENV} must be one of {', '.join(CHOICES)}, not {wanted!r}")
    release = localcouch.find_release(environ)
    if wanted == "couchdb" and not release:
        raise UsageError(f"{SERVER_ENV}=couchdb, but no release: set {localcouch.RELEASE_ENV} "
                         f"(none at {localcouch.SHARED_RELEASE} either)")
    parts = [Part(localcouch.COUCHDB, str(release), one_server)] if release and wanted != "pouchdb" else []
    if wanted != "couchdb" and (whole_suite or not parts):
        parts.append(Part(localcouch.POUCHDB, selection=one_server))
    if whole_suite and release and not wanted:
        parts.append(Part(localcouch.COUCHDB, str(release), ("-m", "cluster"), clusters=True))
    return parts


def run_pytest(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """pytest, its output passed through as it comes; its exit status and its closing summary."""
    summary = ""
    color = ["--color=yes"] if sys.stdout.isatty() else []  # piped through us, pytest would think otherwise
    with subprocess.Popen([sys.executable, "-m", "pytest", *color, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = SUMMARY.match(line.strip())
            summary = found.group(1) if found else summary
    return process.returncode, summary


def outcome(status: int) -> str:
    # 5 is pytest's "no tests collected": nothing was checked, which fails the part too.
    return {0: "passed", 1: "tests failed", 5: "no tests collected"}.get(status, f"pytest error {status}")


def main(args: list[str]) -> int:
    try:
        parts = plan(os.environ, whole_suite=not args)
    except UsageError as exc:
        print(f"test: {exc}", file=sys.stderr)
        return 2
    results = []
    for number, part in enumerate(parts, 1):
        title = f"part {number}/{len(parts)}: {part.label()}"
        print(f"\n== {title} ==", flush=True)
        started = time.monotonic()
        try:
            status, summary = run_pytest([*part.selection, *args], part.environ(os.environ))
        except KeyboardInterrupt:
            return 130  # pytest, in our process group, got the interrupt too and has said so
        results.append((title, status, summary, time.monotonic() - started))
    print("\n== servers ==")
    for title, status, summary, seconds in results:
        print(f"{title}: {outcome(status)} ({summary or 'no summary'}), {seconds:.0f} s")
    return next((status for _, status, _, _ in results if status != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
