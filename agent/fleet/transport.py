"""Socket tuning shared by the device link and the controller."""
from __future__ import annotations

import socket
from typing import Any


def no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """paho's on_socket_open: send small packets at once. With Nagle's algorithm against delayed
    ACKs, each MQTT hop of a command and its result waits ~40 ms even on loopback."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # a WebSocket wrapper or a Unix socket: nothing to tune
        pass
