"""Home Assistant MQTT discovery for the agent (`[mqtt] home_assistant = true`, off by default).

One retained config per entity on `<prefix>/<component>/<node>/<key>/config` (the per-component
discovery that every Home Assistant version reads), all sharing one `device` block, so Home
Assistant shows one device per agent. The entities read the topics the agent publishes anyway,
so nothing new is sent for them:

- sensors on `telemetry`: active variant, p95 latency of the active variant (ms), temperature
  (°C), CPU (%), requests/s; a `binary_sensor` for throttling;
- a `select` whose options are the portfolio's variant ids and whose command topic is the fleet
  command `cmd/pin` (the same path `edgeshift-fleet pin` takes; its state is telemetry's `pin`),
  and a `button` on `cmd/unpin`;
- availability from the retained `status` (birth `online`, Last Will and goodbye `offline`).

The configs are published on every connect and again when Home Assistant announces itself on
`<prefix>/status` (payload `online`), and when the portfolio's variants change. The topics
published are recorded in the state directory (`home-assistant.json`, written before
publishing), so that an agent started later with discovery disabled, or with another prefix, or
with fewer entities, clears exactly those (empty retained payloads) and nothing else: clearing
"always, when disabled" would write into a namespace the operator never enabled (and the ACL
may refuse), and could not know a prefix used before.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.fleet.link import FleetLink
    from agent.service import Event

log = logging.getLogger("edgeshift.fleet.home_assistant")

STATE_FILE = "home-assistant.json"
CLEAR_TIMEOUT_S = 5.0
ONLINE = "online"
# Command ids must be unique (a repeated id is answered with the first result, not run again).
PIN_TEMPLATE = '{"id": "ha-pin-{{ now().timestamp() }}", "args": {"variant": "{{ value }}"}}'
UNPIN_TEMPLATE = '{"id": "ha-unpin-{{ now().timestamp() }}", "args": {}}'
P95_TEMPLATE = "{% set l = value_json.latency.get(value_json.active) or {} %}{{ l.get('p95') }}"
THROTTLED_TEMPLATE = ("{% set t = value_json.resources.throttling %}"
                      "{{ 'None' if t is none else ('ON' if t.active else 'OFF') }}")


def node_id(device_id: str) -> str:
    """The device id as Home Assistant's discovery topics allow a node id: [a-zA-Z0-9_-]."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", device_id)


class HomeAssistant:
    """Discovery for one FleetLink. Its methods that publish run on the link's job worker."""

    def __init__(self, link: FleetLink, state_dir: Path):
        self.link = link
        self.enabled = link.config.home_assistant
        self.prefix = link.config.home_assistant_prefix
        self.state_path = Path(state_dir) / STATE_FILE
        self.node = node_id(link.config.device_id)
        self._options: list[str] = []
        if self.enabled and self.node != link.config.device_id:
            log.warning("device id %r is published to Home Assistant as node %r; the example ACL's "
                        "homeassistant/+/%%u/+/config pattern will not match it", link.config.device_id, self.node)

    @classmethod
    def for_link(cls, link: FleetLink, state_dir: Path) -> HomeAssistant | None:
        """None when discovery is off and nothing published before needs clearing."""
        if not link.config.home_assistant and not (Path(state_dir) / STATE_FILE).exists():
            return None
        return cls(link, state_dir)

    @property
    def status_topic(self) -> str | None:
        """Where Home Assistant announces itself (subscribed only while enabled)."""
        return f"{self.prefix}/status" if self.enabled else None

    # -------------------------------------------------------------- hooks (the link calls these)

    def on_connect(self) -> None:
        if self.enabled:
            self.publish()
        else:
            self.clear()

    def on_status(self, payload: bytes) -> None:
        if self.enabled and payload.strip() == ONLINE.encode():
            log.info("Home Assistant is online: publishing discovery again")
            self.publish()
            self.link.publish_telemetry()  # telemetry is not retained: give its sensors a value now

    def on_event(self, event: Event) -> None:
        """Agent listener: a pin or switch shows at once; new variants renew the select's options."""
        if self.enabled and self.link.connected:  # the work goes to the job worker: never block the emitter
            self.link.run_job(self._publish_if_variants_changed)
            if event.type in ("policy", "switch"):
                self.link.run_job(self.link.publish_telemetry)

    def _publish_if_variants_changed(self) -> None:
        if self.link.connected and self._variants() != self._options:
            self.publish()

    # -------------------------------------------------------------- publishing and clearing

    def configs(self) -> dict[str, dict[str, Any]]:
        """Discovery topic -> config payload, for every entity."""
        link, topics = self.link, self.link.topics
        c = link.config
        profile = link.agent.profile
        base = f"edgeshift_{c.fleet}_{c.device_id}"
        common: dict[str, Any] = {
            "device": {"identifiers": [base], "name": c.device_id, "manufacturer": "edgeshift",
                       "model": profile.description or profile.name, "model_id": profile.name,
                       "sw_version": link.agent_version},
            "origin": {"name": "edgeshift", "sw_version": link.agent_version},
            "availability_topic": topics.status, "availability_template": "{{ value_json.state }}",
            "payload_available": "online", "payload_not_available": "offline",
        }
        telemetry = {"state_topic": topics.telemetry}
        measurement = {"state_class": "measurement", **telemetry}
        entities: dict[tuple[str, str], dict[str, Any]] = {
            ("sensor", "active_variant"): {"name": "Active variant", "icon": "mdi:swap-horizontal",
                                           "value_template": "{{ value_json.active }}", **telemetry},
            ("sensor", "p95_latency"): {"name": "p95 latency", "unit_of_measurement": "ms",
                                        "device_class": "duration", "suggested_display_precision": 1,
                                        "value_template": P95_TEMPLATE, **measurement},
            ("sensor", "temperature"): {"name": "Temperature", "unit_of_measurement": "°C",
                                        "device_class": "temperature",
                                        "value_template": "{{ value_json.resources.temperature_c }}", **measurement},
            ("sensor", "cpu"): {"name": "CPU", "unit_of_measurement": "%", "icon": "mdi:cpu-64-bit",
                                "value_template": "{{ value_json.resources.cpu_percent }}", **measurement},
            ("sensor", "requests_per_s"): {"name": "Requests", "unit_of_measurement": "req/s",
                                           "icon": "mdi:speedometer",
                                           "value_template": "{{ value_json.throughput_rps }}", **measurement},
            ("binary_sensor", "throttled"): {"name": "Throttled", "device_class": "problem",
                                             "entity_category": "diagnostic", "payload_on": "ON",
                                             "payload_off": "OFF", "value_template": THROTTLED_TEMPLATE,
                                             **telemetry},
            ("select", "pin"): {"name": "Pinned variant", "icon": "mdi:pin", "options": self._variants(),
                                "command_topic": topics.command("pin"), "command_template": PIN_TEMPLATE,
                                "value_template": "{{ value_json.pin }}", **telemetry},
            ("button", "unpin"): {"name": "Unpin", "icon": "mdi:pin-off", "command_topic": topics.command("unpin"),
                                  "command_template": UNPIN_TEMPLATE},
        }
        return {f"{self.prefix}/{component}/{self.node}/{key}/config": {"unique_id": f"{base}_{key}", **entity,
                                                                        **common}
                for (component, key), entity in entities.items()}

    def publish(self) -> None:
        """Clear what was published before and is no longer wanted, record, then publish every config."""
        configs = self.configs()
        previous = self._recorded()
        left = [topic for topic in previous if topic not in configs]
        failed = [topic for topic in left if topic not in self._clear(left)]
        self._record(sorted(configs) + failed)  # before publishing: a crash in between still leaves a record
        client = self.link.client
        for topic, payload in configs.items():
            client.publish(topic, json.dumps(payload, separators=(",", ":")).encode(), qos=1, retain=True)
        self._options = configs[f"{self.prefix}/select/{self.node}/pin/config"]["options"]
        log.info("Home Assistant discovery published under %s/+/%s/", self.prefix, self.node)

    def clear(self) -> None:
        """Discovery is off: remove whatever an earlier start published (empty retained payloads)."""
        recorded = self._recorded()
        cleared = self._clear(recorded)
        left = [topic for topic in recorded if topic not in cleared]
        if left:
            self._record(left)
            log.warning("could not clear %d Home Assistant discovery topics; trying again on the next connect",
                        len(left))
        else:
            self.state_path.unlink(missing_ok=True)
            log.info("Home Assistant discovery removed (%d topics)", len(recorded))

    def _clear(self, topics: list[str]) -> set[str]:
        """The topics whose empty retained payload the broker acknowledged."""
        sent = [(topic, self.link.client.publish(topic, b"", qos=1, retain=True)) for topic in topics]
        done = set()
        for topic, info in sent:
            try:
                info.wait_for_publish(CLEAR_TIMEOUT_S)
            except (RuntimeError, ValueError):
                continue
            if info.is_published():
                done.add(topic)
        return done

    # -------------------------------------------------------------- the record in the state directory

    def _recorded(self) -> list[str]:
        try:
            topics = json.loads(self.state_path.read_text())["topics"]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s is unreadable (%s): nothing published before will be cleared", self.state_path, error)
            return []
        return [t for t in topics if isinstance(t, str) and t] if isinstance(topics, list) else []

    def _record(self, topics: list[str]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_path.with_suffix(".partial")
        partial.write_text(json.dumps({"topics": topics}, indent=1))
        os.replace(partial, self.state_path)

    def _variants(self) -> list[str]:
        """The portfolio's variant ids in manifest order; once serving, those the policy may choose."""
        agent = self.link.agent
        ids = [v.id for v in agent.portfolio.manifest.variants]
        serving = set(agent.status()["variants"])
        return [vid for vid in ids if vid in serving] if serving else ids


__all__ = ["HomeAssistant", "node_id"]
