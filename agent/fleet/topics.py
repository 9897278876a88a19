"""MQTT topic names and payload envelopes of the fleet contract (DESIGN.md, "MQTT").

Every payload is a JSON object carrying `ts` (Unix seconds) and `schema` (what the object is and
which version of its fields), so a controller can route and upgrade messages without guessing.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

ROOT = "edgeshift"

STATUS_SCHEMA = "edgeshift.status/1"
TELEMETRY_SCHEMA = "edgeshift.telemetry/1"
EVENT_SCHEMA = "edgeshift.event/1"
RESULT_SCHEMA = "edgeshift.result/1"

_FORBIDDEN_IN_LEVEL = ("/", "+", "#", "\0")


def check_level(value: str, what: str) -> str:
    """A fleet or device id is one topic level: non-empty, no separators or wildcards."""
    if not isinstance(value, str) or not value or any(c in value for c in _FORBIDDEN_IN_LEVEL):
        raise ValueError(f"{what} must be one MQTT topic level (non-empty, without / + # or NUL), got {value!r}")
    return value


# Topic levels under edgeshift/<fleet>/ that the layout gives a meaning: `all/cmd/<name>` reaches
# every device and `controller/status` is the controller's. A device registered under one of these
# names would get the broker ACL's per-device rights (edgeshift/<fleet>/%u/#) on them and could
# command the whole fleet, so neither agent nor controller accepts them as a device id or fleet name.
RESERVED_IDS = ("all", "controller")


def check_id(value: str, what: str) -> str:
    """A fleet name or device id: one topic level (check_level) that is not a reserved name."""
    check_level(value, what)
    if value in RESERVED_IDS:
        raise ValueError(f"{what} {value!r} is reserved: edgeshift/<fleet>/{value}/ has a meaning in the topic "
                         f"layout (reserved: {', '.join(RESERVED_IDS)})")
    return value


@dataclass(frozen=True)
class Topics:
    """The topics one device uses: its own under `edgeshift/<fleet>/<device>/`, and the fleet's shared ones."""

    fleet: str
    device: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")
        check_id(self.device, "device id")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.fleet}/{self.device}/"

    @property
    def status(self) -> str:
        return self.prefix + "status"

    @property
    def telemetry(self) -> str:
        return self.prefix + "telemetry"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def commands(self) -> str:
        """Subscription filter for commands addressed to this device."""
        return self.prefix + "cmd/+"

    @property
    def broadcast_commands(self) -> str:
        """Subscription filter for commands addressed to every device of the fleet."""
        return f"{ROOT}/{self.fleet}/all/cmd/+"

    @property
    def controller_status(self) -> str:
        return f"{ROOT}/{self.fleet}/controller/status"

    def command(self, name: str) -> str:
        return self.prefix + f"cmd/{name}"

    def result(self, name: str) -> str:
        return self.prefix + f"cmd/{name}/result"

    def command_name(self, topic: str) -> str | None:
        """The command a topic carries (`.../cmd/<name>`, own or broadcast), or None if it is no command."""
        for base in (self.prefix + "cmd/", f"{ROOT}/{self.fleet}/all/cmd/"):
            if topic.startswith(base):
                name = topic[len(base):]
                return name if name and "/" not in name else None
        return None


def envelope(schema: str, fields: dict[str, Any], ts: float | None = None) -> dict[str, Any]:
    """The payload object: `ts` and `schema` first, then the fields."""
    return {"ts": time.time() if ts is None else ts, "schema": schema, **fields}


def encode(payload: dict[str, Any]) -> bytes:
    # default=str: event details are free-form, and one odd value must not cost the whole message.
    return json.dumps(payload, separators=(",", ":"), default=str).encode("utf-8")


def decode(payload: bytes) -> Any:
    """The JSON value of a payload; ValueError if it is not UTF-8 JSON."""
    return json.loads(payload.decode("utf-8"))
