"""The MQTT link between an Agent and its fleet (DESIGN.md, "MQTT").

Birth and Last Will on `status`, telemetry every interval, the Agent's events, commands and their
results. Events and results go through an outbox first and leave it only when the broker has
acknowledged them (PUBACK, matched by message id), so a broker outage loses none: whatever is
pending is replayed, in order and flagged `historical`, as soon as the link is back. The outbox
is sent oldest first, at most MAX_IN_FLIGHT unacknowledged at a time.

paho-mqtt runs the network in its own thread. Two rules keep it alive: no callback lets an
exception out, and no callback ever waits for `_lock` while paho may hold its own locks (acks are
handed to a worker thread through a queue).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.transport import no_delay
from agent import __version__
from agent.backends import available_backends
from agent.config import ConfigError, MqttConfig
from agent.fleet.commands import CommandHandler
from agent.fleet.home_assistant import HomeAssistant
from agent.fleet.topics import (EVENT_SCHEMA, RESULT_SCHEMA, STATUS_SCHEMA, TELEMETRY_SCHEMA, Topics, decode,
                                encode, envelope)
from agent.monitor import ResourceMonitor

if TYPE_CHECKING:
    from agent.service import Agent, Event

log = logging.getLogger("edgeshift.fleet")

STATE_FILE = "fleet-link.json"
STOP_PUBLISH_TIMEOUT_S = 3.0
MAX_IN_FLIGHT = 20  # outbox messages sent and not yet acknowledged; the others wait their turn


# ------------------------------------------------------------------ the outbox


class OutboxItem(NamedTuple):
    id: int
    topic: str
    payload: bytes
    qos: int


class Outbox(Protocol):
    """Where events and results wait until the broker has them (agent.fleet.spool.Spool keeps them
    on disk). `put` returns an id that is never reused; `pending` returns up to `limit` messages not
    acked yet, oldest first, each with `id`, `topic`, `payload` and `qos` attributes."""

    def put(self, topic: str, payload: bytes, qos: int) -> int: ...

    def pending(self, limit: int = 100) -> Sequence[OutboxItem]: ...

    def ack(self, id: int) -> None: ...

    def __len__(self) -> int: ...

    def dropped(self) -> int: ...  # messages lost to the outbox's bounds, reported in telemetry


class MemoryOutbox:
    """An Outbox that lives as long as the process; beyond `limit` messages the oldest are dropped."""

    def __init__(self, limit: int = 10_000):
        self.limit = limit
        self._items: dict[int, OutboxItem] = {}  # insertion order is put order
        self._next_id = 1
        self._dropped = 0
        self._lock = threading.Lock()

    def put(self, topic: str, payload: bytes, qos: int) -> int:
        with self._lock:
            item = OutboxItem(self._next_id, topic, payload, qos)
            self._next_id += 1
            self._items[item.id] = item
            while len(self._items) > self.limit:
                dropped = self._items.pop(next(iter(self._items)))
                self._dropped += 1
                log.warning("outbox full (%d messages): dropped the oldest, on %s", self.limit, dropped.topic)
            return item.id

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        with self._lock:
            return list(islice(self._items.values(), limit))

    def ack(self, id: int) -> None:
        with self._lock:
            self._items.pop(id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def dropped(self) -> int:
        return self._dropped


# ------------------------------------------------------------------ counters that survive restarts


class _Counters:
    """The connection session and the event sequence number, kept in the state directory so both
    keep rising across restarts."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            stored = json.loads(path.read_text())
            self.session, self.event_seq = int(stored["session"]), int(stored["event_seq"])
        except FileNotFoundError:
            self.session, self.event_seq = 0, 0
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s is unreadable (%s): counting sessions and events from 0 again", path, error)
            self.session, self.event_seq = 0, 0

    def set_session(self, session: int) -> None:
        with self._lock:
            self.session = session
            self._save()

    def next_event_seq(self) -> int:
        with self._lock:
            self.event_seq += 1
            self._save()
            return self.event_seq

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"session": self.session, "event_seq": self.event_seq}))
        os.replace(partial, self.path)


# ------------------------------------------------------------------ the link


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that logs its exceptions instead of ending the network thread."""
    def guarded(self: FleetLink, *args: Any) -> None:
        try:
            callback(self, *args)
        except Exception:
            log.exception("MQTT callback %s failed", callback.__name__)
    guarded.__name__ = callback.__name__
    return guarded


class FleetLink:
    """Connects an Agent to its fleet over MQTT; `start` returns at once, the link connects (and
    reconnects, backing off from 1 to 30 s) in the background while the agent serves."""

    def __init__(self, agent: Agent, config: MqttConfig, state_dir: Path, outbox: Outbox | None = None,
                 agent_version: str = __version__, *, commands: CommandHandler | None = None,
                 reconnect_delay_s: tuple[int, int] = (1, 30)):
        self.agent = agent
        self.config = config
        self.topics = Topics(config.fleet, config.device_id)
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.agent_version = agent_version
        self.commands = commands or CommandHandler(agent)
        self.reconnect_delay_s = reconnect_delay_s
        self.last_error: str | None = None  # why the link is not up, for operators and tests
        self._counters = _Counters(Path(state_dir) / STATE_FILE)
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()          # outbox order, in-flight ids, the ready flag
        self._ready = False                    # connected and birth sent: the outbox may flow
        self._connecting_session = 0
        self._inflight: dict[int, int] = {}    # MQTT message id -> outbox id
        self._live: set[int] = set()           # outbox ids put during this connection: not historical
        self._properties: dict[int, Properties] = {}  # outbox id -> MQTT 5 properties of a result
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.Queue = queue.Queue()  # commands and rebirths, run in order by one worker
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._backends: list[str] = []
        self._monitor: ResourceMonitor | None = None
        self._telemetry_seq = 0
        self._served_before = (time.monotonic(), 0, 0)  # (when, requests, errors) at the last telemetry
        self._telemetry_lock = threading.Lock()
        self.home_assistant = HomeAssistant.for_link(self, Path(state_dir))  # None: discovery off, nothing to clear

    # -------------------------------------------------------------- public

    @property
    def connected(self) -> bool:
        """Connected, with the birth published (the outbox may still be catching up)."""
        return self._ready

    @property
    def session(self) -> int:
        """The session of the current or last connection (counted across restarts); 0 before any."""
        return self._counters.session

    @property
    def client(self) -> mqtt.Client | None:
        return self._client

    def run_job(self, job: Callable[[], None]) -> None:
        """Run `job` on the worker that runs commands (in order, off the network thread)."""
        if not self._stopping.is_set():
            self._jobs.put(job)

    def publish_telemetry(self) -> None:
        """One telemetry sample now (QoS 0), if connected."""
        if self._ready:
            with self._telemetry_lock:
                payload = encode(self._telemetry_payload())
            self._client.publish(self.topics.telemetry, payload, qos=0)

    def start(self) -> None:
        """Returns at once; ConfigError if the TLS files cannot be used."""
        if self._client is not None:
            raise RuntimeError("the fleet link is already started")
        self._backends = available_backends()
        self._served_before = (time.monotonic(), *self._served_totals())
        self._client = self._make_client()
        self.agent.listeners.append(self._on_agent_event)
        if self.home_assistant is not None:
            self.agent.listeners.append(self.home_assistant.on_event)
        for target, name in ((self._ack_worker, "acks"), (self._command_worker, "commands"),
                             (self._telemetry_loop, "telemetry")):
            thread = threading.Thread(target=target, name=f"fleet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        kwargs = {"clean_start": True} if self.config.protocol == 5 else {}
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive_s, **kwargs)
        self._client.loop_start()
        log.info("fleet link to %s:%d as %s", self.config.host, self.config.port, self.topics.prefix)

    def stop(self) -> None:
        """Publish `offline` (retained, same session), then disconnect; the broker drops the Will."""
        client = self._client
        if client is None or self._stopping.is_set():
            return
        self._stopping.set()
        for listener in (self._on_agent_event, getattr(self.home_assistant, "on_event", None)):
            if listener in self.agent.listeners:
                self.agent.listeners.remove(listener)
        self._jobs.put(None)
        for thread in self._threads[1:]:  # commands and telemetry; acks last
            thread.join(timeout=10)
        if self._ready:
            info = client.publish(self.topics.status, encode(self._offline_payload("stopped")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=STOP_PUBLISH_TIMEOUT_S)
            except (RuntimeError, ValueError) as error:
                log.warning("could not publish offline before stopping: %s", error)
        self._ready = False
        # paho's network thread may poll once more after the disconnect and log "Client is not
        # connected" at ERROR: about the connection we are closing, so not worth a user's attention.
        client.disable_logger()
        client.disconnect()
        client.loop_stop()
        self._acks.put((None, None))
        self._threads[0].join(timeout=10)
        log.info("fleet link stopped")

    def publish_event(self, event_type: str, reason: str, details: dict) -> None:
        """An event (QoS 1) with the next sequence number; waits in the outbox until the broker has it."""
        self._publish_event(event_type, reason, details, time.time())

    # -------------------------------------------------------------- client set-up

    def _make_client(self) -> mqtt.Client:
        c = self.config
        v5 = c.protocol == 5
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgeshift-{c.fleet}-{c.device_id}",
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
        client.suppress_exceptions = True  # a second net under _guarded
        client.enable_logger(logging.getLogger("edgeshift.fleet.paho"))
        if c.username is not None:
            client.username_pw_set(c.username, c.password)
        if c.tls_ca or c.tls_cert:
            _check_readable(c)
            try:
                client.tls_set(ca_certs=c.tls_ca, certfile=c.tls_cert, keyfile=c.tls_key)
            except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
                raise ConfigError(f"mqtt: the TLS files cannot be used: {error}") from None
        client.reconnect_delay_set(*self.reconnect_delay_s)
        client.on_pre_connect = self._on_pre_connect
        client.on_socket_open = no_delay
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # -------------------------------------------------------------- paho callbacks (network thread)

    @_guarded
    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        # The Will must carry the session this connection will have if the broker accepts it.
        self._connecting_session = self._counters.session + 1
        client.will_set(self.topics.status, encode(self._offline_payload("connection lost", self._connecting_session)),
                        qos=1, retain=True)

    @_guarded
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"the broker refused the connection: {reason_code}"
            log.error("%s (%s:%d)", self.last_error, self.config.host, self.config.port)
            return
        with self._lock:
            self._counters.set_session(self._connecting_session)
            # paho would resend what it still holds; the outbox replays the same, in order, once.
            _drop_out_messages(client)
            self._inflight.clear()
            self._live.clear()
            wanted = [self.topics.commands, self.topics.broadcast_commands, self.topics.controller_status]
            ha = self.home_assistant
            client.subscribe([(topic, 1) for topic in wanted + ([ha.status_topic] if ha and ha.status_topic else [])])
            try:
                self._publish_birth()
            except Exception:  # a birth that cannot be made must not also hold back the outbox
                log.exception("could not publish the birth")
            if ha is not None:
                self._jobs.put(ha.on_connect)  # publishes (or clears) discovery, after the birth
            self._ready = True
            self._pump()
        self.last_error = None
        log.info("connected to %s:%d, session %d", self.config.host, self.config.port, self.session)

    @_guarded
    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.last_error = f"cannot reach the broker at {self.config.host}:{self.config.port}"
        log.warning("%s; retrying", self.last_error)

    @_guarded
    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_ready, self._ready = self._ready, False  # no lock: paho may hold its own here
        if was_ready and not self._stopping.is_set():
            self.last_error = f"connection lost: {reason_code}"
            log.warning("%s; reconnecting", self.last_error)

    @_guarded
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.controller_status:
            self._jobs.put(partial(self._on_controller_status, message.payload))
            return
        ha = self.home_assistant
        if ha is not None and message.topic == ha.status_topic:
            self._jobs.put(partial(ha.on_status, message.payload))
            return
        name = self.topics.command_name(message.topic)
        if name is not None:
            self._jobs.put(partial(self._run_command, name, message.payload, getattr(message, "properties", None)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._acks.put((mid, reason_code))  # never blocks: paho holds its message lock here

    # -------------------------------------------------------------- workers

    def _ack_worker(self) -> None:
        while True:
            mid, reason_code = self._acks.get()
            if mid is None:
                return
            try:
                with self._lock:
                    item_id = self._inflight.pop(mid, None)
                    if item_id is None:
                        continue  # telemetry, birth, or an ack from a connection that is gone
                    self._forget(item_id)
                    self._pump()
                if getattr(reason_code, "is_failure", False):
                    log.warning("the broker refused message %d: %s", item_id, reason_code)
            except Exception:
                log.exception("acknowledging message %s failed", mid)

    def _command_worker(self) -> None:
        """Commands run here, one at a time and in order, so a long one never stalls the network."""
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("fleet job %s failed", job)

    def _run_command(self, name: str, payload: bytes, request: Properties | None) -> None:
        self._send_result(name, self.commands.handle(name, payload), request)

    def _telemetry_loop(self) -> None:
        while not self._stopping.wait(self.config.telemetry_interval_s):
            try:
                self.publish_telemetry()
            except Exception:
                log.exception("telemetry failed")

    # -------------------------------------------------------------- publishing

    def _on_agent_event(self, event: Event) -> None:
        self._publish_event(event.type, event.reason, event.details, event.ts)

    def _publish_event(self, event_type: str, reason: str, details: dict, ts: float) -> None:
        with self._lock:  # the sequence number and the outbox order must agree
            seq = self._counters.next_event_seq()
            payload = envelope(EVENT_SCHEMA, {"seq": seq, "type": event_type, "reason": reason,
                                              "details": details}, ts)
            self._enqueue(self.topics.events, encode(payload), 1)

    def _send_result(self, name: str, result: dict, request: Properties | None) -> None:
        payload = encode(envelope(RESULT_SCHEMA, {"device": self.config.device_id, **result}))
        topic, properties = self.topics.result(name), None
        response_topic = getattr(request, "ResponseTopic", None) if self.config.protocol == 5 else None
        if response_topic and not any(c in response_topic for c in "+#"):
            topic = response_topic
            correlation = getattr(request, "CorrelationData", None)
            if correlation is not None:
                properties = Properties(PacketTypes.PUBLISH)
                properties.CorrelationData = correlation
        with self._lock:
            self._enqueue(topic, payload, 1, properties)

    def _enqueue(self, topic: str, payload: bytes, qos: int, properties: Properties | None = None) -> None:
        """Under _lock: into the outbox, and on towards the broker if the link is up."""
        item_id = self.outbox.put(topic, payload, qos)
        if properties is not None:
            self._properties[item_id] = properties
        if self._ready:
            self._live.add(item_id)
            self._pump()

    def _pump(self) -> None:
        """Under _lock: send the oldest outbox messages that are not in flight yet, up to MAX_IN_FLIGHT.
        Runs on connect, on each new message and on each ack, so the outbox drains in order."""
        if not self._ready:
            return
        in_flight = set(self._inflight.values())
        for item in self.outbox.pending(2 * MAX_IN_FLIGHT):
            if len(in_flight) >= MAX_IN_FLIGHT:
                return
            if item.id not in in_flight:
                self._send(item, historical=item.id not in self._live)
                in_flight.add(item.id)

    def _send(self, item: OutboxItem, historical: bool) -> None:
        """Under _lock: publish one outbox message and remember its MQTT id until the broker acks it."""
        payload = _mark_historical(item.payload) if historical else item.payload
        try:
            info = self._client.publish(item.topic, payload, item.qos, properties=self._properties.get(item.id))
        except ValueError as error:  # a topic or payload no broker will take: retrying cannot help
            log.error("dropping outbox message %d for %s: %s", item.id, item.topic, error)
            self._forget(item.id)
            return
        if item.qos == 0:
            self._forget(item.id)
        else:
            self._inflight[info.mid] = item.id

    def _forget(self, item_id: int) -> None:
        """Under _lock: the broker has it (or can never take it)."""
        self._properties.pop(item_id, None)
        self._live.discard(item_id)
        self.outbox.ack(item_id)

    def _publish_birth(self) -> None:
        self._client.publish(self.topics.status, encode(self._birth_payload()), qos=1, retain=True)

    def _on_controller_status(self, payload: bytes) -> None:
        try:
            state = decode(payload)
        except ValueError:
            return
        if isinstance(state, dict) and state.get("state") == "online" and self._ready:
            log.info("the controller is online: publishing the birth again")
            with self._lock:
                self._publish_birth()

    # -------------------------------------------------------------- payloads

    def _birth_payload(self) -> dict:
        agent = self.agent
        status = agent.status()
        return envelope(STATUS_SCHEMA, {
            "state": "online", "session": self._counters.session, "device_id": self.config.device_id,
            "fleet": self.config.fleet, "agent_version": self.agent_version, "device": agent.profile.name,
            "portfolio": {"name": agent.name, "digest": agent.portfolio.digest},
            "variants": status["variants"], "unhealthy": status["unhealthy"], "active": status["active"],
            "pin": status["pin"], "backend": agent.backend.name, "backends": self._backends,
            "providers": status["providers"],
        })

    def _offline_payload(self, reason: str, session: int | None = None) -> dict:
        return envelope(STATUS_SCHEMA, {"state": "offline", "reason": reason,
                                        "session": self._counters.session if session is None else session,
                                        "device_id": self.config.device_id, "agent_version": self.agent_version})

    def _telemetry_payload(self) -> dict:
        agent = self.agent
        windows = agent.runtime.windows if agent.runtime is not None else {}
        now = time.monotonic()
        requests, errors = self._served_totals()
        since, requests_before, errors_before = self._served_before
        self._served_before = (now, requests, errors)
        self._telemetry_seq += 1
        return envelope(TELEMETRY_SCHEMA, {
            "seq": self._telemetry_seq, "session": self._counters.session,
            "active": agent.active if agent.runtime is not None else None,
            "pin": agent.policy.settings.pin if agent.policy is not None else None,
            "resources": self._resources(),
            "latency": {vid: window.summary().to_dict() for vid, window in windows.items()},
            "providers": dict(agent.runtime.providers) if agent.runtime is not None else {},
            "requests": {vid: window.total for vid, window in windows.items()},
            "throughput_rps": round((requests - requests_before) / max(now - since, 1e-6), 3),
            "errors": errors - errors_before, "errors_total": errors,
            "outbox": {"pending": len(self.outbox), "dropped": self.outbox.dropped()},
        })

    def _served_totals(self) -> tuple[int, int]:
        runtime = self.agent.runtime
        windows = runtime.windows.values() if runtime is not None else []
        return sum(w.total for w in windows), sum(w.errors for w in windows)

    def _resources(self) -> dict:
        """The policy loop's last snapshot while fresh; else our own (the agent's monitor measures CPU
        between its own calls, so it is left alone)."""
        snapshot = self.agent.last_snapshot
        if snapshot is None or time.time() - snapshot.time > 2 * self.config.telemetry_interval_s:
            if self._monitor is None:
                self._monitor = ResourceMonitor(self.agent.profile)
            snapshot = self._monitor.snapshot()
        return snapshot.to_dict()


def _check_readable(config: MqttConfig) -> None:
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(config, key)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"mqtt.{key}: cannot read {path}")


def _drop_out_messages(client: mqtt.Client) -> None:
    """paho's drop_out_messages (2.2+); on 2.1, the last paho for Python 3.8, the same by hand."""
    drop = getattr(client, "drop_out_messages", None)
    if drop is not None:
        drop()
        return
    with client._out_message_mutex:
        client._out_messages.clear()


def _mark_historical(payload: bytes) -> bytes:
    try:
        message = decode(payload)
    except ValueError:
        return payload
    if not isinstance(message, dict):
        return payload
    return encode({**message, "historical": True})


__all__ = ["FleetLink", "MemoryOutbox", "Outbox", "OutboxItem"]
