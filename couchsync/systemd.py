"""systemd notifications for a Type=notify service: READY, WATCHDOG, STOPPING and STATUS.

The protocol is one datagram to the socket named by $NOTIFY_SOCKET, so it is written here rather than
taken from a package: the small ones (sdnotify) are unmaintained, and systemd-python needs libsystemd's
headers to build. Outside systemd (no socket) every call does nothing.
"""

from __future__ import annotations

import logging
import socket
import time

logger = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd; the watchdog at half its interval at most."""

    def __init__(self, socket_path: str | None, watchdog_seconds: float | None = None) -> None:
        self._address = socket_path
        if socket_path and socket_path.startswith("@"):
            self._address = "\0" + socket_path[1:]  # an abstract socket
        self._watchdog_interval = watchdog_seconds / 2 if watchdog_seconds else None
        self._last_watchdog = 0.0

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def watchdog(self) -> None:
        """Tell the watchdog the worker is alive, if it is due."""
        if self._watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self._watchdog_interval:
            self._last_watchdog = now
            self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode("utf-8"))
        except OSError as exc:
            # A lost notification is systemd's to notice (the watchdog): never a reason to stop working.
            logger.warning("cannot notify systemd: %s", exc)
