"""The harness's free ports (scripts/localports.py): outside the kernel's ephemeral range, distinct."""

import socket

import pytest

import localports


@pytest.fixture
def ephemeral(monkeypatch, tmp_path):
    """Sets the ephemeral range the module reads."""
    def set_range(low: int, high: int) -> None:
        path = tmp_path / "ip_local_port_range"
        path.write_text(f"{low}\t{high}\n")
        monkeypatch.setattr(localports, "EPHEMERAL_RANGE_FILE", path)
    return set_range


def test_ports_are_distinct_and_outside_the_ephemeral_range(ephemeral):
    ephemeral(32768, 60999)
    ports = localports.free_ports(40)
    assert len(set(ports)) == 40
    assert all(not 32768 <= port <= 60999 for port in ports)


def test_a_port_something_listens_on_is_not_handed_out(ephemeral):
    ephemeral(11000, 65535)  # leaves 10000-10999 only: a listener there is likely drawn, and must be skipped
    taken = next(port for port in range(10000, 11000) if _bindable(port))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", taken))
        listener.listen()
        ports = localports.free_ports(900)
    assert taken not in ports
    assert all(10000 <= port < 11000 for port in ports)


def test_excluded_ports_are_not_handed_out(ephemeral):
    ephemeral(11000, 65535)
    excluded = range(10000, 10500)
    ports = localports.free_ports(100, exclude=excluded)
    assert not set(ports) & set(excluded)


def test_without_room_outside_the_range_the_kernel_picks(ephemeral):
    ephemeral(1024, 65535)
    ports = localports.free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= port <= 65535 for port in ports)


def test_an_unreadable_range_file_means_linux_default(monkeypatch, tmp_path):
    monkeypatch.setattr(localports, "EPHEMERAL_RANGE_FILE", tmp_path / "absent")
    assert localports.ephemeral_range() == (32768, 60999)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
