"""systemd's notification protocol (sd_notify), without a dependency.

Under `Type=notify`, systemd passes a datagram socket in $NOTIFY_SOCKET; the service reports
READY=1, STATUS=..., WATCHDOG=1 and STOPPING=1 on it. Outside systemd every call is a no-op, and a
socket that has gone away is never an error: the agent must keep serving regardless.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, socket_path: str | None = None) -> None:
        """socket_path: defaults to $NOTIFY_SOCKET; empty or unset disables the notifier."""
        path = os.environ.get("NOTIFY_SOCKET") if socket_path is None else socket_path
        self._address = _socket_address(path) if path else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def notify(self, message: str) -> bool:
        """Send one datagram; True when it was sent, False when disabled or the send failed."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode("utf-8"), self._address)
            return True
        except OSError:
            return False


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1: half of $WATCHDOG_USEC, as systemd advises; None without a watchdog."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):  # the watchdog is meant for another process
        return None
    return usec / 2 / 1_000_000


def _socket_address(path: str) -> str:
    # "@name" names a socket in Linux's abstract namespace, written with a leading NUL byte.
    return "\0" + path[1:] if path.startswith("@") else path


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(text.splitlines())
