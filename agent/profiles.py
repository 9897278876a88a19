"""Device profiles: one TOML per board (devices/*.toml), typed and strictly validated.

A profile says which backend, execution providers and how many threads to use, where the
board's sensors live in sysfs, at which temperatures it throttles, and the default memory budget
and latency SLO.
Unknown keys and wrong types are errors that name the file and the key, e.g.
"devices/x.toml: thermal.warm_c must be a number, got 'hot'".
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

BACKENDS = ("onnxruntime", "tflite")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
ENV_DEVICES = "EDGESHIFT_DEVICES"
REPO_DEVICES = Path(__file__).resolve().parents[1] / "devices"
SYSTEM_DEVICES = (Path("/etc/edgeshift/devices"), Path("/usr/share/edgeshift/devices"))


class ProfileError(ValueError):
    """A profile that cannot be found or used; the message names the file and the key."""


@dataclass
class ThermalLimits:
    warm_c: float  # the agent starts stepping down here, before the board does
    throttle_c: float  # the board's firmware/kernel starts throttling clocks
    critical_c: float  # the hard limit: heavy throttling or shutdown


@dataclass
class DeviceProfile:
    name: str  # the file's stem: devices/rpi5.toml is "rpi5"
    description: str
    backend: str  # "onnxruntime" | "tflite"
    threads: int
    thermal: ThermalLimits
    memory_budget_mb: float
    latency_slo_ms: float
    # Absolute sysfs paths as on the device; globs allowed. Every readable zone counts and
    # the hottest wins; for the other lists the first path that exists wins.
    thermal_zones: list[str] = field(default_factory=list)
    throttled_paths: list[str] = field(default_factory=list)  # Raspberry Pi get_throttled
    gpu_load_paths: list[str] = field(default_factory=list)  # Jetson, per-mille
    power_rail_globs: list[str] = field(default_factory=list)  # INA3221 device folders
    vcgencmd: bool = False  # `vcgencmd get_throttled` as a fallback on this board
    # onnxruntime execution providers to serve with, best first, where installed; the CPU is always last
    providers: list[str] = field(default_factory=lambda: list(DEFAULT_PROVIDERS))
    path: Path | None = None  # the file it was loaded from


def default_search_dirs() -> list[Path]:
    """$EDGESHIFT_DEVICES (os.pathsep-separated), the repository's devices/, the installed copy, the system's."""
    env = os.environ.get(ENV_DEVICES, "")
    dirs = [Path(d) for d in env.split(os.pathsep) if d]
    installed = Path(sys.prefix) / "share" / "edgeshift" / "devices"  # pyproject's data-files
    return [*dirs, REPO_DEVICES, installed, *SYSTEM_DEVICES]


def known_profiles(search_dirs: list[Path] | None = None) -> list[str]:
    names: set[str] = set()
    for directory in _search_path(search_dirs):
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.toml") if p.is_file())
    return sorted(names)


def load_profile(name_or_path: str | Path, search_dirs: list[Path] | None = None) -> DeviceProfile:
    """A path to a .toml file, or a profile name looked up in search_dirs then the defaults."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
        return _load_file(path)
    dirs = _search_path(search_dirs)
    for directory in dirs:
        candidate = directory / f"{text}.toml"
        if candidate.is_file():
            return _load_file(candidate)
    known = ", ".join(known_profiles(search_dirs)) or "none"
    looked = ", ".join(str(d) for d in dirs)
    raise ProfileError(f"unknown device profile {text!r}; known: {known} (looked in: {looked})")


def _search_path(search_dirs: list[Path] | None) -> list[Path]:
    return [Path(d) for d in (search_dirs or [])] + default_search_dirs()


def _load_file(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProfileError(f"{path}: cannot read: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: invalid TOML: {e}") from e
    return _parse(data, path)


_TOP_KEYS = {"description", "backend", "providers", "threads", "memory_budget_mb", "latency_slo_ms",
             "thermal", "sensors"}
_THERMAL_KEYS = {"warm_c", "throttle_c", "critical_c"}
_SENSOR_LISTS = ("thermal_zones", "throttled_paths", "gpu_load_paths", "power_rail_globs")
_SENSOR_KEYS = {*_SENSOR_LISTS, "vcgencmd"}


def _parse(data: dict[str, Any], path: Path) -> DeviceProfile:
    def fail(message: str) -> ProfileError:
        return ProfileError(f"{path}: {message}")

    def check_keys(table: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise fail(f"unknown key {prefix}{key!r} (allowed: {', '.join(sorted(allowed))})")

    def required(table: dict[str, Any], key: str, prefix: str) -> Any:
        if key not in table:
            raise fail(f"{prefix}{key} is missing")
        return table[key]

    def number(value: Any, key: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"{key} must be a number, got {value!r}")
        if positive and value <= 0:
            raise fail(f"{key} must be > 0, got {value!r}")
        return float(value)

    def table(value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise fail(f"{key} must be a table, got {value!r}")
        return value

    check_keys(data, _TOP_KEYS, "")

    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail(f"description must be a string, got {description!r}")

    backend = required(data, "backend", "")
    if backend not in BACKENDS:
        raise fail(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    providers = data.get("providers", list(DEFAULT_PROVIDERS))
    if not isinstance(providers, list) or not all(isinstance(p, str) and p for p in providers):
        raise fail(f"providers must be a list of onnxruntime provider names, got {providers!r}")

    threads = required(data, "threads", "")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise fail(f"threads must be an integer >= 1, got {threads!r}")

    thermal_table = table(required(data, "thermal", ""), "thermal")
    check_keys(thermal_table, _THERMAL_KEYS, "thermal.")
    warm, throttle, critical = (
        number(required(thermal_table, key, "thermal."), f"thermal.{key}")
        for key in ("warm_c", "throttle_c", "critical_c")
    )
    if not warm < throttle < critical:
        raise fail(f"thermal limits must rise: warm_c ({warm}) < throttle_c ({throttle}) "
                   f"< critical_c ({critical})")

    sensors = table(data.get("sensors", {}), "sensors")
    check_keys(sensors, _SENSOR_KEYS, "sensors.")
    lists: dict[str, list[str]] = {}
    for key in _SENSOR_LISTS:
        value = sensors.get(key, [])
        if not isinstance(value, list):
            raise fail(f"sensors.{key} must be a list of paths, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.startswith("/"):
                raise fail(f"sensors.{key}[{i}] must be an absolute path, got {item!r}")
        lists[key] = list(value)
    vcgencmd = sensors.get("vcgencmd", False)
    if not isinstance(vcgencmd, bool):
        raise fail(f"sensors.vcgencmd must be true or false, got {vcgencmd!r}")

    return DeviceProfile(
        name=path.stem,
        description=description,
        backend=backend,
        threads=threads,
        thermal=ThermalLimits(warm_c=warm, throttle_c=throttle, critical_c=critical),
        memory_budget_mb=number(required(data, "memory_budget_mb", ""), "memory_budget_mb", True),
        latency_slo_ms=number(required(data, "latency_slo_ms", ""), "latency_slo_ms", True),
        vcgencmd=vcgencmd,
        providers=providers,
        path=path,
        **lists,
    )


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def serving_threads(requested: int | None, profile: DeviceProfile) -> int:
    """Inference threads: the requested count, else the profile's, at most the CPUs this process may use
    (a board's power mode can take cores offline). The agent serves, and `edgeshift-agent bench` measures,
    with this count, so stored benchmarks are found again."""
    return min(requested or profile.threads, usable_cpus())
