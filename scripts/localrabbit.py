"""A RabbitMQ cluster of our own on this machine, for the tests that need nodes to stop and come back.

`start_cluster()` starts three nodes of the installed RabbitMQ (the Debian package's scripts, run
directly), clusters them the documented way (`rabbitmqctl stop_app / reset / join_cluster / start_app`)
and returns once every node accepts AMQP and `cluster_status` lists them all. Everything the nodes own is
theirs alone, so the machine's RabbitMQ (rabbit@localhost, 5672/25672, epmd on 4369) is never touched:

- an epmd of their own on a free port (`ERL_EPMD_PORT`), started and stopped here: the nodes neither
  register in the machine's epmd nor start one that would outlive them (`-start_epmd false`);
- a node name, an AMQP port and a distribution port each (free ports of 127.0.0.1), an Erlang cookie of
  their own (in a HOME folder of their own), their own config, data, logs and (no) plugins;
- an empty `rabbitmq-env.conf` of their own: the machine's one names rabbit@localhost.

guest/guest works on every node over 127.0.0.1: the first node creates it on its first boot and the
others get it (with the rest of the cluster's metadata) as they join. Each node runs in a process group
of its own and is stopped through it, by process id; `stop()` removes the temporary folder too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions

import localports

# The Debian package's scripts: /usr/sbin/rabbitmq-server would cd to /var/lib/rabbitmq and switch users.
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 90.0  # a node's boot, measured at ~10-15 s on two busy cores
STOP_TIMEOUT = 30.0  # a graceful stop (SIGTERM) takes ~3 s; SIGKILL after this
CTL_TIMEOUT = 120.0
# rabbitmqctl's own distribution listens in this range (RABBITMQ_CTL_DIST_PORT_MIN..MAX): not for our nodes.
CTL_DIST_PORTS = range(35672, 35683)


@dataclass
class RabbitNode:
    """One node: its Erlang name, its ports, and its process while it runs (None once stopped)."""

    name: str
    amqp_port: int
    dist_port: int
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)  # its environment, to start it again
    folder: Path | None = None  # its config, data and logs

    @property
    def url(self) -> str:
        """Its AMQP URL, on the default virtual host (guest/guest, pika's default, is accepted)."""
        return f"amqp://127.0.0.1:{self.amqp_port}/%2F"

    @property
    def log(self) -> Path | None:
        """Its main log file, for the error messages."""
        return self.folder / "log" / f"{self.name}.log" if self.folder else None


@dataclass
class RabbitCluster:
    """The nodes, the folder that holds them all, and the epmd they register in."""

    nodes: list[RabbitNode]
    workdir: Path
    epmd_port: int = 0
    epmd: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def ctl(self, index: int, *args: str, tool: str = "rabbitmqctl") -> subprocess.CompletedProcess[str]:
        """`rabbitmqctl -n <node> args` (or `tool`: rabbitmq-queues, rabbitmq-diagnostics…) on that node.

        It runs with the cluster's cookie and epmd; the caller checks `returncode`.
        """
        return subprocess.run([str(RABBIT_BIN / tool), "-n", self.nodes[index].name, *args],
                              env=ctl_env(self.workdir, self.epmd_port), capture_output=True, text=True,
                              timeout=CTL_TIMEOUT, stdin=subprocess.DEVNULL, check=False)

    def ctl_ok(self, index: int, *args: str, tool: str = "rabbitmqctl") -> str:
        """`ctl()`, its output; raises RuntimeError with the tool's stderr when it fails."""
        done = self.ctl(index, *args, tool=tool)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {self.nodes[index].name} failed "
                               f"({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def running_nodes(self, index: int) -> set[str]:
        """The nodes that node `index` sees running in its cluster (`cluster_status`)."""
        status = json.loads(self.ctl_ok(index, "cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    def stop_node(self, index: int) -> None:
        """Stop that node (SIGTERM to its process group: a graceful stop; SIGKILL after STOP_TIMEOUT)."""
        node = self.nodes[index]
        if node.process is not None:
            stop_group(node.process)
            node.process = None

    def start_node(self, index: int) -> None:
        """Start a stopped node again on its data: it rejoins the cluster by itself.

        Returns once it accepts AMQP and sees every node that runs (it included) in its cluster.
        A node that was not the last to stop waits for one that was, so start them in reverse order
        after stopping them all. A failed or interrupted start stops it again.
        """
        node = self.nodes[index]
        if node.process is not None and node.process.poll() is None:
            return
        try:
            launch(node)
            wait_for_amqp(node)
            self.wait_running(index)
        except BaseException:
            self.stop_node(index)
            raise

    def wait_running(self, index: int) -> None:
        """Wait until node `index` sees every node whose process runs as running in its cluster.

        Raises:
            RuntimeError: it does not within START_TIMEOUT.
        """
        expected = {node.name for node in self.nodes if node.process is not None and node.process.poll() is None}
        deadline = time.monotonic() + START_TIMEOUT
        seen: set[str] = set()
        while time.monotonic() < deadline:
            try:
                seen = self.running_nodes(index)
            except (RuntimeError, ValueError):
                seen = set()
            if expected <= seen:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.nodes[index].name} sees {sorted(seen)} running, not {sorted(expected)}")

    def stop(self) -> None:
        """Stop every node, then their epmd, then remove the folder. Safe to call twice.

        A node that cannot be stopped does not keep the others running: the first error is raised last.
        """
        errors: list[Exception] = []
        for index in range(len(self.nodes)):
            try:
                self.stop_node(index)
            except Exception as exc:  # every node gets its stop
                errors.append(exc)
        if self.epmd is not None:
            stop_group(self.epmd)
            self.epmd = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]


def available() -> bool:
    """Whether RabbitMQ (its scripts) and Erlang's epmd are installed here."""
    return (RABBIT_BIN / "rabbitmq-server").exists() and (RABBIT_BIN / "rabbitmqctl").exists() \
        and shutil.which("epmd") is not None and shutil.which("erl") is not None


def start_cluster(size: int = 3) -> RabbitCluster:
    """Start `size` nodes, cluster them onto the first, and return once `cluster_status` shows them all.

    An interrupted or failed start stops whatever it started and removes its folder.

    Raises:
        RuntimeError: RabbitMQ is not installed, a node did not start or could not join.
    """
    if not available():
        raise RuntimeError(f"RabbitMQ is not installed here (no {RABBIT_BIN / 'rabbitmq-server'} or no epmd)")
    workdir = Path(tempfile.mkdtemp(prefix="couchsync-rabbit-"))
    cluster = RabbitCluster([], workdir)
    try:
        ports = localports.free_ports(1 + 2 * size, exclude=CTL_DIST_PORTS)
        cluster.epmd_port = ports.pop()
        prepare_workdir(workdir)
        cluster.epmd = start_epmd(workdir, cluster.epmd_port)
        tag = secrets.token_hex(3)
        for index in range(size):
            cluster.nodes.append(new_node(workdir, f"couchsync-r{index + 1}-{tag}@localhost",
                                          ports.pop(), ports.pop(), cluster.epmd_port))
        for node in cluster.nodes:  # they boot side by side
            launch(node)
        for node in cluster.nodes:
            wait_for_amqp(node)
        first = cluster.nodes[0].name
        for index in range(1, size):
            for args in (("stop_app",), ("reset",), ("join_cluster", first), ("start_app",)):
                cluster.ctl_ok(index, *args)
            wait_for_amqp(cluster.nodes[index])
        cluster.wait_running(0)
    except BaseException:  # an interrupted start too: no node is left behind
        cluster.stop()
        raise
    return cluster


def prepare_workdir(workdir: Path) -> None:
    """The files every node shares: a HOME with the cluster's cookie, an empty env file, no plugins."""
    home = workdir / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16).upper())
    cookie.chmod(0o400)  # Erlang refuses a cookie others can read
    (workdir / "rabbitmq-env.conf").write_text("# empty: the machine's /etc/rabbitmq/rabbitmq-env.conf is not read\n")
    (workdir / "enabled_plugins").write_text("[].\n")  # no management listener on 15672


def base_env(workdir: Path, epmd_port: int) -> dict[str, str]:
    """The environment without the caller's RabbitMQ and Erlang settings, with the cluster's own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}
    env.update(HOME=str(workdir / "home"), ERL_EPMD_PORT=str(epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
               RABBITMQ_CONF_ENV_FILE=str(workdir / "rabbitmq-env.conf"), LC_ALL="C.UTF-8")
    return env


def ctl_env(workdir: Path, epmd_port: int) -> dict[str, str]:
    """rabbitmqctl's environment: the cluster's cookie and epmd; it never starts an epmd of its own."""
    return {**base_env(workdir, epmd_port),
            "RABBITMQ_CTL_ERL_ARGS": "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"}


def new_node(workdir: Path, name: str, amqp_port: int, dist_port: int, epmd_port: int) -> RabbitNode:
    """A node's folder (config, data, logs) and environment; not started."""
    folder = workdir / name.split("@")[0]
    (folder / "conf.d").mkdir(parents=True)  # read instead of /etc/rabbitmq/conf.d
    (folder / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{amqp_port}\nlog.console = false\n")
    env = {**base_env(workdir, epmd_port),
           "RABBITMQ_NODENAME": name,
           "RABBITMQ_USE_LONGNAME": "false",
           "RABBITMQ_DIST_PORT": str(dist_port),
           "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
           "RABBITMQ_CONFIG_FILES": str(folder / "conf.d"),
           "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),  # absent
           "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
           "RABBITMQ_LOG_BASE": str(folder / "log"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
           "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
           # distribution on loopback only; an epmd that is gone is an error, not a new daemon left behind
           "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false"}
    return RabbitNode(name, amqp_port, dist_port, None, env, folder)


def launch(node: RabbitNode) -> None:
    """Start the node's process, in a session (process group) of its own; does not wait."""
    assert node.folder is not None
    with (node.folder / "stdout.log").open("ab") as out:
        node.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=node.env, cwd=node.folder,
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)


def start_epmd(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """The cluster's epmd on 127.0.0.1:`port`, in the foreground of a process group of its own.

    Raises:
        RuntimeError: it does not listen within 10 s.
    """
    with (workdir / "epmd.log").open("ab") as out:
        process = subprocess.Popen(["epmd", "-port", str(port), "-address", "127.0.0.1"], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    stop_group(process)
    raise RuntimeError(f"epmd did not listen on 127.0.0.1:{port}: {(workdir / 'epmd.log').read_text()}")


def wait_for_amqp(node: RabbitNode) -> None:
    """Wait until the node completes an AMQP handshake as guest (its listener starts last in a boot).

    Raises:
        RuntimeError: its process ended or START_TIMEOUT passed; its log's tail is in the message.
    """
    params = pika.ConnectionParameters("127.0.0.1", node.amqp_port, connection_attempts=1, socket_timeout=5,
                                       blocked_connection_timeout=5)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if node.process is None or node.process.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", node.amqp_port), timeout=1):
                pass  # cheaper than a pika attempt while the node boots
            pika.BlockingConnection(params).close()
            return
        except (OSError, pika.exceptions.AMQPError):
            time.sleep(0.25)
    raise RuntimeError(f"RabbitMQ node {node.name} did not accept AMQP on {node.amqp_port}:\n{log_tail(node)}")


def log_tail(node: RabbitNode) -> str:
    """The end of the node's log and of its stdout, where a failed boot says why."""
    parts = []
    for path in (node.log, node.folder / "stdout.log" if node.folder else None):
        if path is not None and path.exists():
            parts.append(f"--- {path}\n{path.read_text(errors='replace')[-2000:]}")
    return "\n".join(parts)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started in a session of its own, with everything in its group, and wait for them.

    SIGTERM first (RabbitMQ shuts down gracefully on it), SIGKILL after STOP_TIMEOUT.
    """
    if process.poll() is None or group_alive(process.pid):
        signal_group(process.pid, signal.SIGTERM)
        if not wait_group(process, STOP_TIMEOUT):
            signal_group(process.pid, signal.SIGKILL)
            wait_group(process, STOP_TIMEOUT)
    process.wait()


def signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still there (zombies awaiting their reaper count too)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until the process has ended and no process of its group is left; False after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()  # reaps our child, the group's leader
        if process.returncode is not None and not group_alive(process.pid):
            return True
        time.sleep(0.1)
    return False
