"""couchsync as an operator installs it: the wheel in a clean venv, every command run far from the checkout.

Builds the sdist and the wheel (`python -m build`: the wheel is made from the sdist), installs the wheel
into a new venv in a temporary folder, starts the local CouchDB server (Apache CouchDB when a release is
at hand) with the demo organization, and runs from an empty folder, with nothing of the checkout on the
path: `--version`, `deploy-design-docs --create-missing` then `--check`, `apply` of a few events, a
`worker` that consumes one event and stops on SIGTERM, `bootstrap-member` and `reconcile --dry-run`.
Each command is printed with its exit status; any unexpected status fails the run (exit 1).
Part of `scripts/test` (the whole suite); `python3 scripts/installed.py` runs it alone.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import demo
import localbroker
import localcouch
import localports

ROOT = Path(__file__).resolve().parents[1]
EXCHANGE = "couchsync-installed.b2b"
AUTH_EXCHANGE = "couchsync-installed.auth"
UNITS = ("couchsync.service", "couchsync-reconcile.service", "couchsync-reconcile.timer")
QUEUE_PREFIX = "couchsync-installed."


class Failed(Exception):
    """A step did not end as it should."""


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None, expect: int = 0,
        quiet: bool = False) -> str:
    """Run one command, print it with its exit status (and the end of its output unless `quiet`); raise when
    the status is not `expect`."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    shown = " ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command))
    print(f"installed: $ {shown}  -> exit {done.returncode}", flush=True)
    output = (done.stdout + done.stderr).strip()
    if output and not quiet:
        print("\n".join("    " + line for line in output.splitlines()[-6:]), flush=True)
    if done.returncode != expect:
        raise Failed(f"{shown} exited {done.returncode}, expected {expect}:\n{output[-3000:]}")
    return done.stdout


def build_and_install(work: Path) -> Path:
    """The wheel built from the sdist, installed in a new venv; the venv."""
    dist, venv = work / "dist", work / "venv"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=work, quiet=True)
    [wheel] = dist.glob("couchsync-*.whl")
    print(f"installed: built {', '.join(sorted(path.name for path in dist.iterdir()))}", flush=True)
    run([sys.executable, "-m", "venv", str(venv)], cwd=work, quiet=True)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(wheel)], cwd=work, quiet=True)
    return venv


def clean_env(bin_dir: Path, couch: localcouch.LocalCouch, work: Path) -> dict[str, str]:
    """An operator's environment: the venv first on PATH, no PYTHONPATH, the password in a file."""
    password = work / "couch-password"
    password.write_text(couch.sync[1] + "\n")
    password.chmod(0o600)
    return {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8",
            "COUCHSYNC_COUCH_URL": couch.url, "COUCHSYNC_COUCH_USER": couch.sync[0],
            "COUCHSYNC_COUCH_PASSWORD_FILE": str(password), "COUCHSYNC_GLOBAL_DB": demo.GLOBAL_DB,
            "COUCHSYNC_EXCHANGE": EXCHANGE, "COUCHSYNC_AUTH_EXCHANGE": AUTH_EXCHANGE,
            "COUCHSYNC_QUEUE_PREFIX": QUEUE_PREFIX, "COUCHSYNC_RETRY_DELAY": "0.5"}


def check_far_from_checkout(bin_dir: Path, env: dict[str, str], here: Path) -> None:
    """The couchsync that runs is the venv's, and its design documents are the package's."""
    where = run([str(bin_dir / "python"), "-c", "import couchsync, couchsync.design_docs as d; "
                 "print(couchsync.__file__); print(d.packaged())"], cwd=here, env=env)
    if any(Path(line).resolve().is_relative_to(ROOT) for line in where.split()):
        raise Failed(f"the venv's couchsync reads from the checkout: {where}")


def verify_units(venv: Path, here: Path) -> None:
    """systemd verifies the units as shipped, their ExecStart finding this install where the README puts it.

    In a mount namespace of its own, /opt is an empty tmpfs and /opt/couchsync this venv: the machine's /opt
    is not touched.
    """
    if not (shutil.which("systemd-analyze") and shutil.which("unshare")):
        print("installed: systemd-analyze or unshare missing: the units are not verified here", flush=True)
        return
    units = " ".join(str(ROOT / "scripts" / name) for name in UNITS)
    script = (f"mount -t tmpfs tmpfs /opt && mkdir /opt/couchsync && mount --bind {venv} /opt/couchsync && "
              f"/opt/couchsync/bin/couchsync --version && systemd-analyze verify {units}")
    run(["unshare", "--mount", "sh", "-c", script], cwd=here)


def run_worker(env: dict[str, str], here: Path) -> None:
    """A worker that consumes one event, then stops on SIGTERM with exit 0 and says where its designs come from."""
    port = localports.free_port()
    log = here / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(["couchsync", "--log-level", "INFO", "worker", "--metrics-port", str(port)],
                                  cwd=here, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: localbroker.consuming(port), worker, "the worker to consume")
            event = {"timestamp": "2026-06-16T11:00:00.000Z", "organizationId": "acme", "id": "support",
                     "name": "Support", "members": [{"email": "alice@acme.com", "firstName": "Alice"}]}
            demo.publish([("b2b.group.created", json.dumps(event).encode())], EXCHANGE, AUTH_EXCHANGE)
            wait_for(lambda: localbroker.events_handled(port) >= 1, worker, "the worker to handle the event")
        finally:
            worker.send_signal(signal.SIGTERM)
            status = worker.wait(60)
    text = log.read_text(errors="replace")
    print(f"installed: $ couchsync --log-level INFO worker  -> consumed 1 event, exit {status} on SIGTERM",
          flush=True)
    print("\n".join("    " + line for line in text.splitlines() if "design documents from" in line), flush=True)
    if status != 0 or "design documents from the package" not in text:
        raise Failed(f"worker exited {status}:\n{text[-3000:]}")


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise Failed(f"waited in vain for {what} (exit status {process.poll()})")
        time.sleep(0.2)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="couchsync-installed-"))
    here = work / "empty"
    here.mkdir()
    couch = None
    try:
        venv = build_and_install(work)
        bin_dir = venv / "bin"
        couch = localcouch.server(discover=True)
        print(f"installed: {couch.label} at {couch.url}", flush=True)
        demo.seed(couch)
        env = clean_env(bin_dir, couch, work)
        check_far_from_checkout(bin_dir, env, here)
        couchsync = str(bin_dir / "couchsync")
        run([couchsync, "--version"], cwd=here, env=env)
        run([couchsync, "deploy-design-docs", "--create-missing"], cwd=here, env=env)
        run([couchsync, "deploy-design-docs", "--check"], cwd=here, env=env)
        events = here / "events.jsonl"
        shutil.copy(ROOT / "scripts" / "demo-events.jsonl", events)
        run([couchsync, "apply", str(events)], cwd=here, env=env)
        run_worker(env, here)
        demo.add_instance(couch, demo.NEW_MEMBER, "acme", "erin@acme.com")
        run([couchsync, "bootstrap-member", demo.NEW_MEMBER], cwd=here, env=env)
        run([couchsync, "reconcile", "--org", "acme", "--dry-run"], cwd=here, env=env)
        verify_units(venv, here)
    except Failed as exc:
        print(f"installed: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if couch is not None:
            couch.stop()
        localbroker.remove(QUEUE_PREFIX, EXCHANGE, AUTH_EXCHANGE)
        shutil.rmtree(work, ignore_errors=True)
    print("installed: every command ran from the wheel, far from the checkout", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
