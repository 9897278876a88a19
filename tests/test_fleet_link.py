"""The fleet link against a real mosquitto that the tests start on a free port: birth and Last
Will, telemetry and events, every command over MQTT 5 and 3.1.1, a broker outage, and TLS with
passwords and the example ACL."""
from __future__ import annotations

import dataclasses
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import ConfigError, MqttConfig
from agent.fleet.link import FleetLink
from conftest import SMALL_PORTFOLIO_VARIANTS
from mqtt_broker import (Broker, free_port, make_certificates, mosquitto_available, plain_config, secure_config,
                         write_password_file)

REPO = Path(__file__).resolve().parents[1]
FLEET = "test"
WAIT_S = 30.0

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto")


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def link_factory(agent, broker, tmp_path, device_id):
    """Starts FleetLinks on the test broker (stopped at the end); waits until each is connected."""
    links = []

    def start(protocol: int = 5, telemetry_interval_s: float = 60.0) -> FleetLink:
        config = MqttConfig(port=broker.port, fleet=FLEET, device_id=device_id, protocol=protocol,
                            telemetry_interval_s=telemetry_interval_s)
        link = FleetLink(agent, config, tmp_path / "state")
        links.append(link)
        link.start()
        wait_until(lambda: link.connected, what="the link to connect")
        return link

    yield start
    for link in links:
        link.stop()
    agent.pin(None)


# ------------------------------------------------------------------ a test client


def wait_until(condition: Callable[[], object], timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Client:
    """A controller-side test client: subscribes, records every message, publishes commands."""

    def __init__(self, port: int, subscriptions: list[str], protocol: int = 5, client_id: str = "",
                 persistent: bool = False, username: str | None = None, password: str | None = None,
                 tls: dict | None = None):
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscriptions = subscriptions
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        v5 = protocol == 5
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(**tls)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        properties = None
        if persistent:  # the broker keeps the subscription and queues messages while this client is away
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
        self.client.connect(*(("localhost",) if tls else ("127.0.0.1",)), port,
                            **({"clean_start": not persistent, "properties": properties} if v5 else {}))
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), "the test client could not subscribe"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe([(topic, 1) for topic in self.subscriptions])

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append(message)

    def payloads(self, topic: str) -> list[dict]:
        with self._lock:
            return [json.loads(m.payload) for m in self.messages if m.topic == topic]

    def wait_for(self, topic: str, predicate: Callable[[dict], bool] = lambda p: True, count: int = 1) -> list[dict]:
        def enough() -> list[dict] | None:
            found = [p for p in self.payloads(topic) if predicate(p)]
            return found[:count] if len(found) >= count else None
        return wait_until(enough, what=f"{count} message(s) on {topic}")

    def correlated(self, topic: str, correlation: bytes) -> dict:
        """The message on `topic` whose MQTT 5 Correlation Data is `correlation`."""
        def find() -> dict | None:
            with self._lock:
                return next((json.loads(m.payload) for m in self.messages if m.topic == topic
                             and getattr(m.properties, "CorrelationData", None) == correlation), None)
        return wait_until(find, what=f"the answer correlated with {correlation!r} on {topic}")

    def command(self, topic: str, message: dict | bytes, response_topic: str | None = None,
                correlation: bytes | None = None) -> None:
        properties = None
        if response_topic:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
            properties.CorrelationData = correlation
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def prefix(device_id: str) -> str:
    return f"edgeshift/{FLEET}/{device_id}/"


# ------------------------------------------------------------------ birth and Last Will


def test_birth_is_retained_and_the_session_rises_with_each_connection(broker, link_factory, device_id, agent):
    first = link_factory()
    watcher = Client(broker.port, [prefix(device_id) + "status"])  # subscribes after: gets the retained birth
    birth = watcher.wait_for(prefix(device_id) + "status")[0]
    assert birth["state"] == "online" and birth["session"] == 1 and birth["schema"] == "edgeshift.status/1"
    assert birth["ts"] > 0 and birth["device_id"] == device_id and birth["device"] == "x86"
    assert birth["portfolio"] == {"name": agent.name, "digest": agent.portfolio.digest}
    assert birth["variants"] == agent.status()["variants"] and birth["active"] == agent.active
    assert birth["backend"] == "onnxruntime" and "onnxruntime" in birth["backends"] and birth["agent_version"]
    assert birth["providers"] == {vid: "CPUExecutionProvider" for vid in birth["variants"]}

    first.stop()
    offline = watcher.wait_for(prefix(device_id) + "status", lambda p: p["state"] == "offline")[0]
    assert offline["session"] == 1 and offline["reason"] == "stopped"

    second = link_factory()  # the same state directory: a restart of the agent
    assert second.session == 2
    watcher.close()
    late = Client(broker.port, [prefix(device_id) + "status"])
    again = late.wait_for(prefix(device_id) + "status")[0]
    late.close()
    assert again["state"] == "online" and again["session"] == 2
    assert {k: v for k, v in again.items() if k not in ("ts", "session")} == {
        k: v for k, v in birth.items() if k not in ("ts", "session")}


DEVICE_SCRIPT = """
import sys, time
from pathlib import Path
from agent.config import MqttConfig
from agent.fleet.link import FleetLink
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.service import Agent

portfolio, port, fleet, device_id, state_dir = sys.argv[1:]
agent = Agent(Portfolio.open(portfolio), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
              backend="onnxruntime", threads=1, bench_runs=3, state_dir=Path(state_dir))
agent.start()
FleetLink(agent, MqttConfig(port=int(port), fleet=fleet, device_id=device_id), Path(state_dir)).start()
while True:
    time.sleep(1)
"""


def test_the_last_will_arrives_when_the_agent_process_is_killed(broker, small_portfolio, device_id, tmp_path):
    watcher = Client(broker.port, [prefix(device_id) + "status"])
    device = subprocess.Popen([sys.executable, "-c", DEVICE_SCRIPT, str(small_portfolio), str(broker.port), FLEET,
                               device_id, str(tmp_path / "state")], cwd=REPO)
    try:
        birth = watcher.wait_for(prefix(device_id) + "status", lambda p: p["state"] == "online")[0]
        os.kill(device.pid, signal.SIGKILL)
        device.wait(timeout=WAIT_S)
        will = watcher.wait_for(prefix(device_id) + "status", lambda p: p["state"] == "offline")[0]
    finally:
        device.kill()
        watcher.close()
    assert will["session"] == birth["session"] == 1
    assert will["reason"] == "connection lost" and will["schema"] == "edgeshift.status/1"


# ------------------------------------------------------------------ telemetry and events


def test_telemetry_and_events_carry_ts_schema_and_a_rising_seq(broker, link_factory, device_id, agent):
    watcher = Client(broker.port, [prefix(device_id) + "telemetry", prefix(device_id) + "events"])
    link = link_factory(telemetry_interval_s=0.2)
    sample = agent.portfolio.samples().inputs[0][:1]
    for _ in range(20):
        agent.infer(sample)
    variants = agent.status()["variants"]
    for variant in (variants[1], variants[0]):
        agent.switch(variant, "test")
    link.publish_event("deploy", "portfolio v2 deployed", {"portfolio": "v2"})

    telemetry = watcher.wait_for(prefix(device_id) + "telemetry", count=3)
    assert [t["seq"] for t in telemetry] == sorted({t["seq"] for t in telemetry})
    latest = telemetry[-1]
    assert latest["schema"] == "edgeshift.telemetry/1" and latest["ts"] > 0 and latest["active"] == agent.active
    assert {"cpu_percent", "per_core_percent", "mem_available_mb", "rss_mb", "temperature_c", "throttling",
            "load_avg"} <= set(latest["resources"])
    assert set(latest["latency"]) == set(variants) == set(latest["providers"])
    assert set(latest["latency"][variants[0]]) == {"count", "p50", "p95", "p99"}
    assert sum(t["throughput_rps"] for t in telemetry) > 0 and latest["errors"] == 0
    assert latest["outbox"]["dropped"] == 0 and latest["outbox"]["pending"] >= 0

    events = watcher.wait_for(prefix(device_id) + "events", count=3)
    assert [e["type"] for e in events] == ["switch", "switch", "deploy"]
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + 3))
    assert events[0]["schema"] == "edgeshift.event/1" and events[0]["reason"] == "test"
    assert events[0]["details"]["to"] == variants[1] and "historical" not in events[0]
    assert events[2]["details"] == {"portfolio": "v2"}
    watcher.close()


# ------------------------------------------------------------------ commands


COMMANDS = [  # name, args, what the result must hold
    ("ping", {}, lambda r: r["ok"] and r["result"]["pong"] is True),
    ("status", {}, lambda r: r["ok"] and r["result"]["ready"] is True),
    ("switch", {"variant": "imp-l01-sparse"}, lambda r: r["result"] == {"active": "imp-l01-sparse"}),
    ("pin", {"variant": "dense"}, lambda r: r["result"] == {"pin": "dense", "active": "dense"}),
    ("unpin", {}, lambda r: r["result"] == {"pin": None, "active": "dense"}),
    ("set_policy", {"latency_slo_ms": 900}, lambda r: r["result"]["settings"]["latency_slo_ms"] == 900),
    ("bench", {"runs": 2}, lambda r: [v["count"] for v in r["result"]["variants"]] == [2] * len(SMALL_PORTFOLIO_VARIANTS)),
    ("deploy", {"portfolio": "x"}, lambda r: r["error"] == "deploy is not available on this agent"),
    ("rollback", {}, lambda r: r["error"] == "rollback is not available on this agent"),
    ("reboot", {}, lambda r: r["error"].startswith("unknown command 'reboot'")),
    ("switch", {"variant": 7}, lambda r: "argument 'variant' must be a non-empty string" in r["error"]),
]


@pytest.mark.parametrize("protocol", [5, 3])
def test_every_command_round_trips(broker, link_factory, device_id, agent, protocol):
    responses = prefix(device_id) + "cmd/responses/controller-1"
    client = Client(broker.port, [prefix(device_id) + "cmd/+/result", responses], protocol=protocol)
    link_factory(protocol=protocol)
    for number, (name, args, check) in enumerate(COMMANDS):
        command_id = f"{protocol}-{number}"
        if protocol == 5:  # the request's Response Topic and Correlation Data are honoured
            client.command(prefix(device_id) + f"cmd/{name}", {"id": command_id, "args": args},
                           response_topic=responses, correlation=command_id.encode())
            result = client.correlated(responses, command_id.encode())
            assert result["id"] == command_id
        else:
            client.command(prefix(device_id) + f"cmd/{name}", {"id": command_id, "args": args})
            result = client.wait_for(prefix(device_id) + f"cmd/{name}/result", lambda p: p["id"] == command_id)[0]
        assert result["schema"] == "edgeshift.result/1" and result["device"] == device_id
        assert check(result), result

    client.command(prefix(device_id) + "cmd/ping", b"\x00 not json")
    garbage = client.wait_for(prefix(device_id) + "cmd/ping/result", lambda p: p["id"] is None)[0]
    assert garbage["ok"] is False and "not valid JSON" in garbage["error"]
    agent.policy.update(latency_slo_ms=1000.0)
    client.close()


def test_a_broadcast_command_reaches_the_device(broker, link_factory, device_id):
    client = Client(broker.port, [prefix(device_id) + "cmd/ping/result"])
    link_factory()
    client.command(f"edgeshift/{FLEET}/all/cmd/ping", {"id": "everyone-1"})
    result = client.wait_for(prefix(device_id) + "cmd/ping/result")[0]
    assert result["id"] == "everyone-1" and result["ok"] and result["device"] == device_id
    client.close()


def test_the_birth_is_published_again_when_the_controller_comes_online(broker, link_factory, device_id):
    watcher = Client(broker.port, [prefix(device_id) + "status"])
    link = link_factory()
    watcher.wait_for(prefix(device_id) + "status")
    watcher.command(f"edgeshift/{FLEET}/controller/status", {"state": "online"})
    births = watcher.wait_for(prefix(device_id) + "status", count=2)
    assert [b["session"] for b in births] == [link.session] * 2 and births[1]["state"] == "online"
    watcher.close()


def test_a_failure_inside_a_callback_is_logged_and_the_link_goes_on(broker, link_factory, device_id, agent,
                                                                    monkeypatch, caplog):
    def broken_status() -> dict:
        raise RuntimeError("status is broken")
    monkeypatch.setattr(agent, "status", broken_status)
    client = Client(broker.port, [prefix(device_id) + "cmd/+/result"])
    link_factory()  # the birth fails inside on_connect, in paho's network thread
    assert "could not publish the birth" in caplog.text
    client.command(prefix(device_id) + "cmd/status", {"id": "broken-1"})
    client.command(prefix(device_id) + "cmd/ping", {"id": "after-1"})
    assert client.wait_for(prefix(device_id) + "cmd/status/result")[0]["error"] == \
        "status failed: RuntimeError: status is broken"
    assert client.wait_for(prefix(device_id) + "cmd/ping/result")[0]["ok"]
    client.close()


# ------------------------------------------------------------------ a broker outage


def test_events_during_a_broker_outage_arrive_afterwards_in_order_flagged_historical(
        broker, link_factory, device_id, agent):
    watcher = Client(broker.port, [prefix(device_id) + "events", prefix(device_id) + "status"],
                     client_id=f"watcher-{device_id}", persistent=True)
    link = link_factory()
    link.publish_event("test", "before the outage", {"n": 0})
    watcher.wait_for(prefix(device_id) + "events")
    wait_until(lambda: not link.outbox.pending(), what="the broker to acknowledge the first event")

    broker.stop()
    wait_until(lambda: not link.connected, what="the link to notice the outage")
    variants = agent.status()["variants"]
    for n in range(1, 61):  # more than the link keeps in flight at once
        link.publish_event("test", "during the outage", {"n": n})
        if n % 10 == 0:
            agent.switch(variants[n // 10 % 2], "during the outage")
    time.sleep(2.5)  # the link retries meanwhile, backing off
    assert len(link.outbox.pending()) == 66
    broker.start()
    wait_until(lambda: link.connected, what="the link to reconnect")
    link.publish_event("test", "after the outage", {"n": 61})  # queues behind the backlog

    events = watcher.wait_for(prefix(device_id) + "events", count=68)
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + 68))
    assert [e["details"]["n"] for e in events if e["type"] == "test"] == list(range(62))
    assert [e["type"] for e in events[1:67]] == (["test"] * 10 + ["switch"]) * 6
    assert [e.get("historical", False) for e in events] == [False] + [True] * 66 + [False]
    wait_until(lambda: not link.outbox.pending(), what="the outbox to empty")
    assert watcher.wait_for(prefix(device_id) + "status", lambda b: b["session"] == 2)
    watcher.close()


# ------------------------------------------------------------------ TLS, passwords and the example ACL


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mosquitto-tls")
    certs = make_certificates(directory / "certs")
    passwords = write_password_file(directory / "passwd", {"pi-kitchen-1": "kitchen-secret", "controller": "boss"})
    acl = Path(shutil.copy(REPO / "fleet" / "acl", directory / "acl"))
    port = free_port()
    with Broker(secure_config(port, directory, certs, passwords, acl), directory, port) as running:
        yield running, certs


def test_tls_with_passwords_and_the_example_acl(secure_broker, agent, tmp_path):
    broker, certs = secure_broker
    tls = {"tls_ca": str(certs.ca), "tls_cert": str(certs.client_cert), "tls_key": str(certs.client_key)}
    controller = Client(broker.port, ["edgeshift/default/pi-kitchen-1/#"], username="controller", password="boss",
                        tls=certs.client_tls())
    config = MqttConfig(host="localhost", port=broker.port, fleet="default", device_id="pi-kitchen-1",
                        username="pi-kitchen-1", password="kitchen-secret", **tls)
    link = FleetLink(agent, config, tmp_path / "state")
    link.start()
    try:
        wait_until(lambda: link.connected, what="the TLS link to connect")
        assert controller.wait_for("edgeshift/default/pi-kitchen-1/status")[0]["state"] == "online"
        controller.command("edgeshift/default/pi-kitchen-1/cmd/ping", {"id": "tls-1"})
        controller.command("edgeshift/default/all/cmd/status", {"id": "tls-2"})
        assert controller.wait_for("edgeshift/default/pi-kitchen-1/cmd/ping/result")[0]["ok"]
        assert controller.wait_for("edgeshift/default/pi-kitchen-1/cmd/status/result")[0]["id"] == "tls-2"
    finally:
        link.stop()
        controller.close()

    intruder = FleetLink(agent, dataclasses.replace(config, password="wrong"), tmp_path / "intruder")
    intruder.start()
    try:
        wait_until(lambda: intruder.last_error, what="the refusal to be reported")
        assert intruder.last_error == "the broker refused the connection: Not authorized"  # mosquitto's answer
        assert not intruder.connected and intruder.session == 0
        assert agent.infer(agent.portfolio.samples().inputs[0][:1]).outputs  # still serving
    finally:
        intruder.stop()


def test_unreadable_tls_files_are_a_configuration_error(agent, tmp_path):
    config = MqttConfig(port=free_port(), device_id="pi-1", tls_ca=str(tmp_path / "missing-ca.crt"))
    with pytest.raises(ConfigError, match=r"mqtt.tls_ca: cannot read .*missing-ca.crt"):
        FleetLink(agent, config, tmp_path / "state").start()
    (tmp_path / "garbage.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="mqtt: the TLS files cannot be used"):
        FleetLink(agent, dataclasses.replace(config, tls_ca=str(tmp_path / "garbage.crt")), tmp_path / "state").start()


def test_the_example_broker_configuration_runs_on_mosquitto(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(certs.ca.parent / name, tmp_path / name)
    write_password_file(tmp_path / "passwd", {"controller": "boss"})
    shutil.copy(REPO / "fleet" / "acl", tmp_path / "acl")
    port = free_port()
    example = (REPO / "fleet" / "mosquitto.conf").read_text()
    assert "listener 8883\n" in example and "/etc/mosquitto/edgeshift/" in example
    adapted = (example.replace("listener 8883\n", f"listener {port} 127.0.0.1\n")
               .replace("/etc/mosquitto/edgeshift/", f"{tmp_path}/").replace("/var/lib/mosquitto/", f"{tmp_path}/")
               + f"user {getpass.getuser()}\n")
    with Broker(adapted, tmp_path / "broker", port) as broker:
        client = Client(port, ["edgeshift/default/controller/status"], username="controller", password="boss",
                        tls=certs.client_tls())
        client.close()
        assert broker.running


def test_a_password_file_written_without_mosquitto_passwd_is_accepted(tmp_path):
    passwords = write_password_file(tmp_path / "passwd", {"pi-1": "pa:ss wörd"}, tool=None)
    assert passwords.read_text().startswith("pi-1:$7$101$")
    port = free_port()
    config = plain_config(port, tmp_path).replace("allow_anonymous true",
                                                  f"allow_anonymous false\npassword_file {passwords}")
    with Broker(config, tmp_path / "broker", port):
        Client(port, ["x"], username="pi-1", password="pa:ss wörd").close()
