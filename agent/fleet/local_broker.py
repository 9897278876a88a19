"""A throwaway MQTT broker on a free loopback port, for demos: mosquitto if installed, else amqtt.

mosquitto speaks MQTT 5 and 3.1.1; the embedded amqtt broker speaks 3.1.1 only, so `protocol`
tells clients which to use.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalBroker:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.kind = "mosquitto" if _mosquitto() else "amqtt"
        self.protocol = 5 if self.kind == "mosquitto" else 3
        self._process: subprocess.Popen | None = None
        self._directory: tempfile.TemporaryDirectory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "LocalBroker":
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._start_amqtt()
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.kind} broker did not open port {self.port} within 10 s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start_mosquitto(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="edgeshift-broker-")
        config = Path(self._directory.name) / "mosquitto.conf"
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
        self._process = subprocess.Popen([_mosquitto(), "-c", str(config)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)

    def _start_amqtt(self) -> None:
        from amqtt.broker import Broker  # only when mosquitto is absent

        logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # it logs every port probe as an error
        loop = asyncio.new_event_loop()
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}}}, loop=loop)

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(broker.start())
            loop.run_forever()
            loop.run_until_complete(broker.shutdown())
            leftovers = asyncio.all_tasks(loop)  # amqtt's per-client tasks: end them before the loop goes
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
        self._thread.start()


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0
