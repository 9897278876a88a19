"""The controller's side of the fleet contract (DESIGN.md, "MQTT"): read the devices' retained
status, follow their telemetry and events, send commands and collect their results.

Each command goes to one device on `<prefix>cmd/<name>` with a fresh id. With MQTT 5 the request
carries a Response Topic under that device's own prefix (`<prefix>cmd/<name>/result/<client id>`,
which the example ACL lets a device write) and the id as Correlation Data; with MQTT 3.1.1 the
controller listens on `<prefix>cmd/<name>/result` and matches the `id` of each result.

Controller code: nothing here imports torch, onnxruntime or the agent's runtime.
"""
from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.transport import no_delay
from agent.fleet.topics import RESERVED_IDS, ROOT, Topics, check_id, check_level, decode, encode, envelope

CONTROLLER_SCHEMA = "edgeshift.controller/1"
COMMAND_SCHEMA = "edgeshift.command/1"
SETTLE_S = 0.3        # retained messages are done when none arrived for this long ...
MAX_SETTLE_S = 3.0    # ... or after this long in all


class ControllerError(Exception):
    """The controller cannot do its work (no broker, refused credentials, unusable TLS files)."""


@dataclass(frozen=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "default"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    protocol: int = 5  # 5 or 3 (3.1.1)
    keepalive_s: int = 30


@dataclass(frozen=True)
class DeviceStatus:
    """What a device's retained `status` says: its birth while online, its Will or goodbye after."""

    device: str
    state: str                 # "online" | "offline" | "unknown"
    session: int | None
    active: str | None
    portfolio: str | None
    agent_version: str | None
    ts: float | None
    payload: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_payload(cls, device: str, payload: dict) -> DeviceStatus:
        portfolio = payload.get("portfolio")
        ts = payload.get("ts")
        return cls(device=device, state=str(payload.get("state", "unknown")), session=payload.get("session"),
                   active=payload.get("active"),
                   portfolio=portfolio.get("name") if isinstance(portfolio, dict) else None,
                   agent_version=payload.get("agent_version"),
                   ts=float(ts) if isinstance(ts, (int, float)) else None, payload=payload)

    @property
    def online(self) -> bool:
        return self.state == "online"

    def age_s(self, now: float | None = None) -> float | None:
        return None if self.ts is None else max(0.0, (time.time() if now is None else now) - self.ts)


@dataclass(frozen=True)
class CommandResult:
    device: str
    ok: bool
    result: dict | None = None
    error: str | None = None
    timed_out: bool = False
    elapsed_s: float | None = None  # from sending the command to its result


@dataclass
class _Pending:
    device: str
    sent: float
    answer: dict | None = None
    received: float | None = None


class Controller:
    """One MQTT connection of a fleet controller. Use as a context manager, or connect() and close()."""

    def __init__(self, options: BrokerOptions, client_id: str | None = None, follow_telemetry: bool = False):
        check_id(options.fleet, "fleet")
        if options.protocol not in (3, 5):
            raise ValueError(f"protocol must be 5 or 3 (3.1.1), got {options.protocol}")
        self.options = options
        self.client_id = client_id or f"edgeshift-fleet-{uuid.uuid4().hex[:12]}"
        check_level(self.client_id, "client id")
        self.follow_telemetry = follow_telemetry
        self._base = f"{ROOT}/{options.fleet}/"
        self._lock = threading.Condition()
        self._statuses: dict[str, DeviceStatus] = {}
        self._telemetry: dict[str, dict] = {}
        self._events: dict[str, dict] = {}
        self._pending: dict[str, _Pending] = {}
        self._last_status_at = 0.0
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._client = self._make_client()

    # -------------------------------------------------------------- connection

    def connect(self, timeout_s: float = 10.0) -> Controller:
        """Connect and subscribe; ControllerError if the broker cannot be reached or refuses us."""
        o = self.options
        kwargs = {"clean_start": True} if o.protocol == 5 else {}
        try:
            self._client.connect(o.host, o.port, o.keepalive_s, **kwargs)
        except (OSError, ValueError) as error:  # refused, unreachable, TLS handshake failures
            raise ControllerError(f"cannot connect to the broker at {o.host}:{o.port}: {error}") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self._subscribed.is_set() and self._refused is None and time.monotonic() < deadline:
            self._subscribed.wait(0.05)
        if not self._subscribed.is_set():
            self.close()
            why = self._refused or f"no answer within {timeout_s:g} s"
            raise ControllerError(f"the broker at {o.host}:{o.port} did not accept us: {why}")
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Controller:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- what the devices said

    def statuses(self, settle_s: float = SETTLE_S, max_wait_s: float = MAX_SETTLE_S) -> dict[str, DeviceStatus]:
        """Every device's latest status, after waiting for the retained ones to stop arriving."""
        started = time.monotonic()
        while time.monotonic() - started < max_wait_s:
            with self._lock:
                quiet_for = time.monotonic() - max(self._last_status_at, started)
            if quiet_for >= settle_s:
                break
            time.sleep(min(0.05, settle_s))
        with self._lock:
            return dict(sorted(self._statuses.items()))

    def online_devices(self) -> list[str]:
        return [device for device, status in self.statuses().items() if status.online]

    def telemetry(self) -> dict[str, dict]:
        """The latest telemetry payload per device (only with follow_telemetry)."""
        with self._lock:
            return dict(self._telemetry)

    def last_events(self) -> dict[str, dict]:
        """The latest event payload per device (only with follow_telemetry)."""
        with self._lock:
            return dict(self._events)

    def announce(self) -> None:
        """Say the controller is online (not retained): every connected device publishes its birth again."""
        payload = encode(envelope(CONTROLLER_SCHEMA, {"state": "online", "client_id": self.client_id}))
        self._client.publish(f"{self._base}controller/status", payload, qos=1).wait_for_publish(5.0)

    # -------------------------------------------------------------- commands

    def send(self, devices: Iterable[str], name: str, args: dict[str, Any] | None = None,
             timeout_s: float = 30.0) -> list[CommandResult]:
        """Send command `name` to each device on its own topic; wait up to timeout_s for all results.
        One CommandResult per device, in the order given; those without an answer have timed_out."""
        check_level(name, "command name")
        devices = list(dict.fromkeys(devices))
        topics = {device: Topics(self.options.fleet, device) for device in devices}  # ValueError for bad ids
        ids: dict[str, str] = {}
        for device in devices:
            command_id = uuid.uuid4().hex
            ids[device] = command_id
            with self._lock:
                self._pending[command_id] = _Pending(device, time.monotonic())
            payload = encode(envelope(COMMAND_SCHEMA, {"id": command_id, "args": args or {}}))
            self._client.publish(topics[device].command(name), payload, qos=1,
                                 properties=self._request_properties(topics[device], name, command_id))
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while any(self._pending[i].answer is None for i in ids.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            done = {device: self._pending.pop(command_id) for device, command_id in ids.items()}
        return [self._result(device, done[device], timeout_s) for device in devices]

    def _request_properties(self, topics: Topics, name: str, command_id: str) -> Properties | None:
        if self.options.protocol != 5:
            return None
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = f"{topics.result(name)}/{self.client_id}"
        properties.CorrelationData = command_id.encode()
        return properties

    @staticmethod
    def _result(device: str, pending: _Pending, timeout_s: float) -> CommandResult:
        answer = pending.answer
        if answer is None:
            return CommandResult(device, ok=False, error=f"no answer within {timeout_s:g} s", timed_out=True)
        elapsed = (pending.received or time.monotonic()) - pending.sent
        result = answer.get("result")
        return CommandResult(device, ok=answer.get("ok") is True, result=result if isinstance(result, dict) else None,
                             error=None if answer.get("ok") is True else str(answer.get("error", "failed")),
                             elapsed_s=elapsed)

    # -------------------------------------------------------------- paho

    def _make_client(self) -> mqtt.Client:
        o = self.options
        v5 = o.protocol == 5
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls_ca or o.tls_cert:
            try:
                client.tls_set(ca_certs=o.tls_ca, certfile=o.tls_cert, keyfile=o.tls_key)
            except (OSError, ValueError, ssl.SSLError) as error:
                raise ControllerError(f"the TLS files cannot be used: {error}") from None
        client.on_socket_open = no_delay
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _subscriptions(self) -> list[str]:
        base = self._base
        results = f"{base}+/cmd/+/result/{self.client_id}" if self.options.protocol == 5 else f"{base}+/cmd/+/result"
        wanted = [f"{base}+/status", results]
        if self.follow_telemetry:
            wanted += [f"{base}+/telemetry", f"{base}+/events"]
        return wanted

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        client.subscribe([(topic, 1) for topic in self._subscriptions()])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        failed = [code for code in reason_codes if getattr(code, "is_failure", False)]
        if failed:
            self._refused = f"subscription refused: {failed[0]}"
        else:
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            payload = decode(message.payload)
        except ValueError:
            return  # not ours to judge: a controller ignores what it cannot read
        if not isinstance(payload, dict) or not message.topic.startswith(self._base):
            return
        device, _, kind = message.topic[len(self._base):].partition("/")
        if device in RESERVED_IDS:  # controller/status (another controller's announce), all/cmd/...: no device
            return
        with self._lock:
            if kind == "status":
                self._statuses[device] = DeviceStatus.from_payload(device, payload)
                self._last_status_at = time.monotonic()
            elif kind == "telemetry":
                self._telemetry[device] = payload
            elif kind == "events":
                self._events[device] = payload
            elif kind.startswith("cmd/"):
                self._on_result(device, payload, getattr(message, "properties", None))

    def _on_result(self, device: str, payload: dict, properties: Any) -> None:
        """Under _lock: match a result to the command waiting for it (Correlation Data, else `id`)."""
        correlation = getattr(properties, "CorrelationData", None)
        command_id = correlation.decode(errors="replace") if isinstance(correlation, bytes) else payload.get("id")
        pending = self._pending.get(command_id) if isinstance(command_id, str) else None
        if pending is None or pending.device != device or pending.answer is not None:
            return
        pending.answer, pending.received = payload, time.monotonic()
        self._lock.notify_all()


__all__ = ["BrokerOptions", "CommandResult", "Controller", "ControllerError", "DeviceStatus"]
