"""The agent's configuration file (TOML): strict, so a typo is an error rather than a silent default."""
from __future__ import annotations

import socket
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.fleet.topics import check_id, check_level

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, the key and what is expected."""


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:8080"     # "" disables the HTTP front
    max_body_mb: float = 16.0


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "default"
    device_id: str = field(default_factory=socket.gethostname)
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    protocol: int = 5
    keepalive_s: int = 30
    telemetry_interval_s: float = 10.0
    home_assistant: bool = False          # publish Home Assistant MQTT discovery (agent/fleet/home_assistant.py)
    home_assistant_prefix: str = "homeassistant"  # Home Assistant's discovery prefix


@dataclass(frozen=True)
class PolicyConfig:
    latency_slo_ms: float | None = None   # default: the device profile's
    memory_budget_mb: float | None = None  # default: the device profile's
    cooldown_s: float = 30.0
    headroom: float = 0.7
    pin: str | None = None
    interval_s: float = 1.0               # how often the policy looks


@dataclass(frozen=True)
class AgentConfig:
    device: str                           # profile name from devices/, or a path to a profile file
    portfolio: Path
    state_dir: Path
    backend: str | None = None            # default: the device profile's
    providers: list[str] | None = None    # onnxruntime execution providers, best first; default: the profile's
    threads: int | None = None            # default: the device profile's
    preload: str = "all"                  # all | neighbours | lazy
    public_key: Path | None = None        # ed25519 public key (PEM): manifests must be signed with its private key
    max_batch: int = 64
    http: HttpConfig = field(default_factory=HttpConfig)
    mqtt: MqttConfig | None = None        # section absent: no fleet link
    policy: PolicyConfig = field(default_factory=PolicyConfig)


_SECTIONS = {"http": HttpConfig, "mqtt": MqttConfig, "policy": PolicyConfig}


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_config(data, str(path))


def parse_config(data: dict, source: str = "agent.toml") -> AgentConfig:
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    values = _typed(AgentConfig, top, source, "")
    for name, section in _SECTIONS.items():
        if name in data:
            if not isinstance(data[name], dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            values[name] = section(**_typed(section, data[name], source, f"{name}."))
    config = AgentConfig(**values)
    if config.preload not in ("all", "neighbours", "lazy"):
        raise ConfigError(f"{source}: preload must be all, neighbours or lazy, got {config.preload!r}")
    if config.mqtt is not None and config.mqtt.protocol not in (3, 5):
        raise ConfigError(f"{source}: mqtt.protocol must be 5 or 3 (3.1.1), got {config.mqtt.protocol}")
    if config.mqtt is not None:
        for key in ("fleet", "device_id"):
            try:
                check_id(getattr(config.mqtt, key), key.replace("_", " "))
            except ValueError as error:
                raise ConfigError(f"{source}: mqtt.{key}: {error}") from None
        try:
            check_level(config.mqtt.home_assistant_prefix, "the discovery prefix")
        except ValueError as error:
            raise ConfigError(f"{source}: mqtt.home_assistant_prefix: {error}") from None
    if config.http.listen:
        parse_listen(config.http.listen, source)
    return config


def parse_listen(listen: str, source: str = "agent.toml") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{source}: http.listen must look like 127.0.0.1:8080, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _typed(cls, data: dict, source: str, prefix: str) -> dict[str, Any]:
    """Check keys and types against a dataclass; returns the converted values."""
    known = {f.name: f for f in fields(cls) if f.name not in _SECTIONS}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(prefix + k for k in known)})")
    values = {}
    for name, value in data.items():
        values[name] = _convert(value, str(known[name].type), f"{source}: {prefix}{name}")
    missing = [f.name for f in fields(cls) if f.name in known and f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{source}: '{prefix}{missing[0]}' is required")
    return values


def _convert(value: Any, annotation: str, where: str) -> Any:
    optional = "None" in annotation
    kind = annotation.replace(" | None", "")
    if kind == "Path":
        if isinstance(value, str) and value:
            return Path(value)
        raise ConfigError(f"{where} must be a path (a non-empty string), got {value!r}")
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{where} must not be negative, got {value}")
        return float(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{where} must not be negative, got {value}")
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "list[str]" and isinstance(value, list) and all(isinstance(item, str) and item for item in value):
        return list(value)
    expected = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false",
                "list[str]": "a list of names"}.get(kind, kind)
    raise ConfigError(f"{where} must be {expected}{' (or absent)' if optional else ''}, got {value!r}")
