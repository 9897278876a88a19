from __future__ import annotations

import os
import socket

import pytest

from agent.sdnotify import Notifier, watchdog_interval_s


@pytest.fixture
def systemd_socket(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's, announced in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_notifier_sends_the_protocol_messages(systemd_socket):
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready()
    assert received(systemd_socket) == "READY=1"
    notifier.ready(status="serving dense")
    assert received(systemd_socket) == "READY=1\nSTATUS=serving dense"
    notifier.status("switched to imp-l01-sparse: latency over SLO")
    assert received(systemd_socket) == "STATUS=switched to imp-l01-sparse: latency over SLO"
    notifier.watchdog()
    assert received(systemd_socket) == "WATCHDOG=1"
    notifier.stopping()
    assert received(systemd_socket) == "STOPPING=1"
    assert notifier.notify("RELOADING=1") is True
    assert received(systemd_socket) == "RELOADING=1"


def test_a_status_stays_on_one_line(systemd_socket):
    Notifier().status("first\nsecond")
    assert received(systemd_socket) == "STATUS=first second"


def test_abstract_namespace_socket(monkeypatch):
    name = f"edgeshift-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier().ready()
        assert received(sock) == "READY=1"


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("ok")
    notifier.status("ok")
    notifier.watchdog()
    notifier.stopping()
    assert notifier.notify("READY=1") is False


def test_an_explicit_socket_path_overrides_the_environment(tmp_path, systemd_socket):
    assert not Notifier("").enabled
    other = tmp_path / "other"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(other))
        sock.settimeout(2)
        Notifier(str(other)).watchdog()
        assert received(sock) == "WATCHDOG=1"


def test_a_vanished_systemd_never_raises(tmp_path):
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.enabled
    assert notifier.notify("WATCHDOG=1") is False
    notifier.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 1.0


def test_watchdog_meant_for_another_process_is_none(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval_s() is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon"])
def test_no_watchdog_is_none(monkeypatch, usec):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval_s() is None
