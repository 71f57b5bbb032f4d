"""Free TCP ports of 127.0.0.1 for the servers the tests, the demo and the benchmarks start.

The ports come from outside the kernel's ephemeral range. Binding port 0 would hand out one from inside
it, and a server takes seconds to bind the port it is given: meanwhile any outgoing connection of the
suite can get that port as its local end, and the server then dies with `eaddrinuse` (seen in CI: a
CouchDB node lost its port while it booted). The kernel never picks a port outside the range for an
outgoing connection; the random order keeps two servers started at once from drawing the same one.
"""
from __future__ import annotations

import random
import socket
from collections.abc import Container, Iterator
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10000  # below: well-known and registered ports that services of the machine may use
SPAN = 1000  # the fewest ports worth drawing from; a narrower gap falls back to port 0


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where unreadable)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def candidate_ports() -> list[int]:
    """Ports outside the ephemeral range, in random order (so that parallel runs rarely collide)."""
    low, high = ephemeral_range()
    ports = [*range(LOWEST, low), *range(high + 1, 65536)]
    random.shuffle(ports)
    return ports


def free_ports(count: int, exclude: Container[int] = ()) -> list[int]:
    """`count` distinct ports nothing listens on, outside the ephemeral range where there is room.

    The chosen ports are held together while they are chosen, so they differ; `exclude`: ports not to
    hand out (another program's fixed ports).
    """
    candidates = candidate_ports()
    draw = iter(candidates) if len(candidates) >= SPAN else None
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sockets.append(sock)
            port = _bind(sock, draw)
            if port not in exclude:
                ports.append(port)
        return ports
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One port nothing listens on (see `free_ports`)."""
    return free_ports(1)[0]


def _bind(sock: socket.socket, draw: Iterator[int] | None) -> int:
    """Bind `sock` to the next port of `draw` that is free (port 0, the kernel's pick, without one)."""
    for port in draw or ():
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    sock.bind(("127.0.0.1", 0))
    return int(sock.getsockname()[1])
