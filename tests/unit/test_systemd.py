"""systemd notifications, received on a real datagram socket as systemd would."""

import socket

from couchsync.systemd import Notifier


def test_notifications_reach_the_socket_and_the_watchdog_is_rate_limited(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(2)
        notifier = Notifier(path, watchdog_seconds=60)
        notifier.ready("consuming q")
        notifier.watchdog()
        notifier.watchdog()  # within half the interval: not sent again
        notifier.stopping()
        received = [receiver.recv(1024).decode() for _ in range(3)]
    assert received == ["READY=1\nSTATUS=consuming q", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]


def test_without_systemd_notifying_does_nothing_and_a_dead_socket_is_not_fatal(tmp_path):
    Notifier(None, 10).ready("x")
    Notifier(str(tmp_path / "nobody-listens")).ready("x")  # logs a warning, raises nothing
