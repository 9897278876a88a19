"""A board's temperature and throttling word in a fake sysfs tree, for a ResourceMonitor with `root=`.

A benchmark cannot heat the machine on cue, so it writes what the board's sensors would read; the
agent's monitor reads them through the same code paths as on the device.
"""
from __future__ import annotations

import os
from pathlib import Path

from agent.monitor.sysfs import GENERIC_THERMAL_ZONES
from agent.profiles import DeviceProfile

# get_throttled while throttling: ARM frequency capped, throttled, soft temperature limit, now and since boot.
THROTTLED_WORD = 0xE000E


class FakeThermalSensors:
    """Writes the profile's first thermal zone (or the generic zone 0) and its get_throttled node under root."""

    def __init__(self, profile: DeviceProfile, root: Path):
        self.profile = profile
        self.root = Path(root)
        zone = profile.thermal_zones[0] if profile.thermal_zones else GENERIC_THERMAL_ZONES.replace("*", "0")
        self.zone = self._under_root(zone)
        node = next((p for p in profile.throttled_paths if "*" not in p), None)
        self.throttled_node = self._under_root(node) if node else None
        self.cool()

    def cool(self) -> None:
        self.set(self.profile.thermal.warm_c - 20.0)

    def warm(self) -> None:
        self.set(self.profile.thermal.warm_c + 1.0)

    def throttle(self) -> None:
        self.set(self.profile.thermal.throttle_c + 1.0, throttled=True)

    def set(self, temperature_c: float, throttled: bool = False) -> None:
        _write(self.zone, f"{round(temperature_c * 1000)}\n")  # millidegrees, as the kernel writes them
        if self.throttled_node is not None:
            _write(self.throttled_node, f"{THROTTLED_WORD if throttled else 0:x}\n")  # "%x", no 0x

    def _under_root(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


def _write(path: Path, text: str) -> None:
    """Replace the file whole, so the monitor never reads half a value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
