"""Board sensors in sysfs: thermal zones, the Pi's get_throttled node, Jetson GPU load and
INA3221 power rails.

Every reader takes `root`, the directory the device's absolute paths are joined under: "/" on
the device, a fake tree in tests, so both run the same code. A missing, unreadable or garbage
sensor reads as None (or is left out), never as an exception.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable
from pathlib import Path

from agent.monitor.throttling import Throttling, parse_throttled

GENERIC_THERMAL_ZONES = "/sys/class/thermal/thermal_zone*/temp"
# Zones whose readings are not temperatures: the Jetson PMIC-Die zone always reads 100 °C.
IGNORED_ZONE_TYPES = frozenset({"pmic-die"})
# Gated or absent units read far outside this (Orin's CV zones read -256 °C).
PLAUSIBLE_C = (-40.0, 150.0)


def expand(root: str | Path, patterns: Iterable[str]) -> list[Path]:
    """The paths that exist under root for these absolute paths or globs, in pattern order."""
    base = glob.escape(str(root))
    found: dict[str, None] = {}
    for pattern in patterns:
        for match in sorted(glob.glob(os.path.join(base, pattern.lstrip("/")))):
            found.setdefault(match)
    return [Path(p) for p in found]


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_number(path: Path) -> float | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def plausible_celsius(value: float | None) -> float | None:
    if value is None or not PLAUSIBLE_C[0] <= value <= PLAUSIBLE_C[1]:
        return None
    return value


def hottest_zone(root: str | Path, patterns: Iterable[str]) -> float | None:
    """°C of the hottest readable zone; the temp files hold millidegrees."""
    temperatures = []
    for path in expand(root, patterns):
        zone_type = read_text(path.with_name("type"))
        if zone_type is not None and zone_type.lower() in IGNORED_ZONE_TYPES:
            continue
        millidegrees = read_number(path)
        celsius = plausible_celsius(None if millidegrees is None else millidegrees / 1000.0)
        if celsius is not None:
            temperatures.append(celsius)
    return max(temperatures, default=None)


def read_throttled(root: str | Path, paths: Iterable[str]) -> Throttling | None:
    """The first get_throttled node that exists; None if there is none or it is unreadable."""
    found = expand(root, paths)
    if not found:
        return None
    text = read_text(found[0])
    return None if text is None else parse_throttled(text)


def read_gpu_load(root: str | Path, paths: Iterable[str]) -> float | None:
    """GPU load in percent from the first `load` node that exists (it counts in per-mille)."""
    found = expand(root, paths)
    if not found:
        return None
    per_mille = read_number(found[0])
    if per_mille is None or not 0 <= per_mille <= 1000:
        return None
    return per_mille / 10.0


def read_power_rails(root: str | Path, device_globs: Iterable[str]) -> dict[str, float]:
    """mW per rail from INA3221 devices, iio (JetPack 4) or hwmon (JetPack 5/6) layout."""
    rails: dict[str, float] = {}
    for device in expand(root, device_globs):
        rails.update(_iio_rails(device) or _hwmon_rails(device))
    return rails


def _iio_rails(device: Path) -> dict[str, float]:
    # ina3221x: rail_name_N, in_voltageN_input (mV), in_currentN_input (mA), N = 0..2
    rails = {}
    for name_file in sorted(device.glob("rail_name_*")):
        channel = name_file.name[len("rail_name_"):]  # the glob guarantees the prefix
        name = read_text(name_file)
        power = _milliwatts(device / f"in_voltage{channel}_input", device / f"in_current{channel}_input")
        if name and power is not None:
            rails[name] = power
    return rails


def _hwmon_rails(device: Path) -> dict[str, float]:
    # ina3221 hwmon: in[123]_label, in[123]_input (mV), curr[123]_input (mA); in4-7 and curr4
    # are shunt voltages and sums, not rails.
    rails = {}
    for channel in (1, 2, 3):
        name = read_text(device / f"in{channel}_label") or f"in{channel}"
        power = _milliwatts(device / f"in{channel}_input", device / f"curr{channel}_input")
        if power is not None:
            rails[name] = power
    return rails


def _milliwatts(millivolts_file: Path, milliamps_file: Path) -> float | None:
    millivolts = read_number(millivolts_file)
    milliamps = read_number(milliamps_file)
    if millivolts is None or milliamps is None:
        return None
    return millivolts * milliamps / 1000.0
