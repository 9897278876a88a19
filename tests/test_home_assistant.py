"""Home Assistant MQTT discovery against a real mosquitto: what Home Assistant would read (config
payloads, templates rendered on the agent's real telemetry and status, availability), re-publish
on Home Assistant's birth, a pin through the select's command topic, and removal when disabled."""
from __future__ import annotations

import datetime
import json
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from agent.config import MqttConfig
from agent.fleet.home_assistant import STATE_FILE
from agent.fleet.link import FleetLink
from conftest import SMALL_PORTFOLIO_VARIANTS
from mqtt_broker import mosquitto_available

jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto")

FLEET = "ha"
WAIT_S = 30.0
COMPONENTS = {"sensor": 5, "binary_sensor": 1, "select": 1, "button": 1}


def wait_until(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def render(template: str, **variables) -> str:
    """Roughly what Home Assistant does: a sandboxed Jinja environment, `value_json` for JSON payloads."""
    env = jinja2_sandbox.ImmutableSandboxedEnvironment()
    env.globals["now"] = lambda: datetime.datetime.now(datetime.timezone.utc)
    return env.from_string(template).render(**variables)


class HomeAssistantClient:
    """Subscribes like Home Assistant: discovery under homeassistant/#, and the agent's topics."""

    def __init__(self, port: int, device_id: str):
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ha-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        topics = ["homeassistant/#", f"edgeshift/{FLEET}/{device_id}/#"]
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S)

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def configs(self, node: str) -> dict[str, bytes]:
        """The latest payload per discovery config topic of this node."""
        with self._lock:
            return {topic: payload for topic, payload, _ in self.messages
                    if topic.startswith("homeassistant/") and topic.endswith("/config") and f"/{node}/" in topic}

    def last(self, topic: str):
        with self._lock:
            found = [payload for t, payload, _ in self.messages if t == topic]
        return json.loads(found[-1]) if found else None

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_link(agent, broker, state_dir, device_id: str, enabled: bool) -> FleetLink:
    config = MqttConfig(port=broker.port, fleet=FLEET, device_id=device_id, telemetry_interval_s=60.0,
                        home_assistant=enabled)
    link = FleetLink(agent, config, state_dir)
    link.start()
    wait_until(lambda: link.connected, "the link to connect")
    return link


def test_discovery_as_home_assistant_reads_it(agent, broker, tmp_path):
    device_id = f"pi-{uuid.uuid4().hex[:6]}"
    prefix = f"edgeshift/{FLEET}/{device_id}/"
    ha = HomeAssistantClient(broker.port, device_id)
    link = start_link(agent, broker, tmp_path / "state", device_id, enabled=True)
    try:
        configs = wait_until(lambda: (lambda c: c if len(c) == sum(COMPONENTS.values()) else None)(
            ha.configs(device_id)), "every discovery config")
        payloads = {topic: json.loads(raw) for topic, raw in configs.items()}  # valid JSON
        by_component = {}
        for topic, payload in payloads.items():
            root, component, node, key, last = topic.split("/")
            assert (root, node, last) == ("homeassistant", device_id, "config")
            by_component.setdefault(component, []).append(payload)
            assert payload["unique_id"] == f"edgeshift_{FLEET}_{device_id}_{key}"
            assert payload["name"]
            assert payload["device"]["identifiers"] == [f"edgeshift_{FLEET}_{device_id}"]
            assert payload["device"]["name"] == device_id and payload["device"]["model_id"] == "x86"
            assert payload["device"]["sw_version"] == link.agent_version
            assert payload["availability_topic"] == prefix + "status"
        assert {c: len(p) for c, p in by_component.items()} == COMPONENTS
        assert len({p["unique_id"] for p in payloads.values()}) == len(payloads)

        # Retained: a Home Assistant that connects later reads them all.
        late = HomeAssistantClient(broker.port, device_id)
        try:
            wait_until(lambda: len(late.configs(device_id)) == len(configs), "the retained configs")
        finally:
            late.close()

        # Availability: the retained birth renders to payload_available.
        status = wait_until(lambda: ha.last(prefix + "status"), "the birth")
        some = next(iter(payloads.values()))
        assert render(some["availability_template"], value_json=status) == some["payload_available"] == "online"

        # The state topics carry what the templates read: render them on a real telemetry sample.
        agent.infer(agent.portfolio.samples().inputs[0][:1])
        link.publish_telemetry()
        telemetry = wait_until(lambda: ha.last(prefix + "telemetry"), "telemetry")
        values = {}
        for component, entries in by_component.items():
            for payload in entries:
                if "state_topic" in payload:
                    assert payload["state_topic"] == prefix + "telemetry"
                    values[payload["name"]] = render(payload["value_template"], value_json=telemetry)
        assert values["Active variant"] == agent.active
        assert float(values["p95 latency"]) == telemetry["latency"][agent.active]["p95"] > 0
        assert float(values["CPU"]) == telemetry["resources"]["cpu_percent"]
        assert float(values["Requests"]) == telemetry["throughput_rps"]
        temperature = telemetry["resources"]["temperature_c"]
        assert values["Temperature"] == ("None" if temperature is None else str(temperature))
        assert values["Throttled"] in ("ON", "OFF", "None")  # "None": unknown (no throttling sensor here)
        assert values["Pinned variant"] == "None"  # not pinned: the select shows no option

        # A pin through the select's command topic pins the variant; the select's state follows.
        select = by_component["select"][0]
        assert select["options"] == [v for v in SMALL_PORTFOLIO_VARIANTS if v in agent.status()["variants"]]
        target = next(v for v in select["options"] if v != agent.active)
        ha.clear()
        ha.publish(select["command_topic"], render(select["command_template"], value=target).encode())
        wait_until(lambda: agent.policy.settings.pin == target and agent.active == target, "the pin")
        result = wait_until(lambda: ha.last(prefix + "cmd/pin/result"), "the pin result")
        assert result["ok"], result
        sample = wait_until(lambda: (lambda t: t if t and t.get("pin") == target else None)(
            ha.last(prefix + "telemetry")), "telemetry showing the pin")
        assert render(select["value_template"], value_json=sample) == target
        # The unpin button: a second command with a fresh id.
        button = by_component["button"][0]
        ha.publish(button["command_topic"], render(button["command_template"], value="PRESS").encode())
        wait_until(lambda: agent.policy.settings.pin is None, "the unpin")

        # Home Assistant's birth: every config is published again.
        ha.clear()
        ha.publish("homeassistant/status", b"online")
        wait_until(lambda: len(ha.configs(device_id)) == len(configs), "the configs again")
        wait_until(lambda: ha.last(prefix + "telemetry"), "a telemetry sample for the fresh sensors")
        ha.clear()
        ha.publish("homeassistant/status", b"offline")
        time.sleep(0.5)
        assert ha.configs(device_id) == {}  # only `online` asks for them
    finally:
        link.stop()
        agent.pin(None)

    # Stopped: the status says offline, which the availability template renders as not available.
    offline = wait_until(lambda: (lambda s: s if s and s["state"] == "offline" else None)(
        ha.last(prefix + "status")), "the offline status")
    assert render(some["availability_template"], value_json=offline) == some["payload_not_available"]

    # Started again with discovery disabled: every config topic gets an empty retained payload.
    recorded = json.loads((tmp_path / "state" / STATE_FILE).read_text())["topics"]
    assert sorted(recorded) == sorted(configs)
    ha.clear()
    link = start_link(agent, broker, tmp_path / "state", device_id, enabled=False)
    try:
        wait_until(lambda: set(t for t, p in ha.configs(device_id).items() if p == b"") == set(configs),
                   "empty payloads on every config topic")
        wait_until(lambda: not (tmp_path / "state" / STATE_FILE).exists(), "the record to go")
        late = HomeAssistantClient(broker.port, device_id)
        try:
            time.sleep(0.5)
            assert late.configs(device_id) == {}  # nothing retained is left
        finally:
            late.close()
    finally:
        link.stop()
        ha.close()


def test_disabled_and_never_enabled_publishes_nothing(agent, broker, tmp_path):
    device_id = f"pi-{uuid.uuid4().hex[:6]}"
    ha = HomeAssistantClient(broker.port, device_id)
    link = start_link(agent, broker, tmp_path / "state", device_id, enabled=False)
    try:
        assert link.home_assistant is None
        time.sleep(0.5)
        assert ha.configs(device_id) == {}
    finally:
        link.stop()
        ha.close()
