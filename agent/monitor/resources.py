"""ResourceMonitor: one cheap Snapshot of the device (CPU, memory, temperature, throttling,
GPU, power, battery) per call, for the policy, telemetry and /metrics.

psutil covers CPU, memory, load and battery; board sensors come from sysfs (see `sysfs`) under
a root directory, so tests run the same code on a fake tree.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Tuple

import psutil

from agent.monitor import sysfs
from agent.monitor.throttling import Throttling, vcgencmd_throttled
from agent.profiles import DeviceProfile, ThermalLimits

MB = 1024 * 1024
VCGENCMD_INTERVAL_S = 5.0  # a subprocess costs tens of ms on a Pi: reuse its answer this long
# psutil sensor groups that measure the CPU package, preferred over disks, wifi and ACPI zones.
CPU_SENSOR_GROUPS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal")

CpuTimes = Tuple[float, float]  # (busy, total) seconds; typing's Tuple: evaluated here (Python 3.8)


@dataclass
class Snapshot:
    time: float  # time.time()
    cpu_percent: float | None
    per_core_percent: list[float]
    load_avg: tuple[float, float, float] | None
    mem_available_mb: float | None
    mem_total_mb: float | None
    rss_mb: float | None
    temperature_c: float | None  # the hottest of the profile's zones, else psutil's
    throttling: Throttling | None
    gpu_load_percent: float | None
    power_mw: dict[str, float]  # rail name -> mW
    battery_percent: float | None
    on_battery: bool | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for telemetry and /metrics."""
        data = asdict(self)
        data["load_avg"] = None if self.load_avg is None else list(self.load_avg)
        if self.throttling is not None:
            data["throttling"]["active"] = self.throttling.active
        return data


def thermal_state(temperature_c: float | None, limits: ThermalLimits) -> str:
    """"unknown" | "ok" | "warm" | "throttle" | "critical"."""
    if temperature_c is None:
        return "unknown"
    if temperature_c >= limits.critical_c:
        return "critical"
    if temperature_c >= limits.throttle_c:
        return "throttle"
    if temperature_c >= limits.warm_c:
        return "warm"
    return "ok"


class ResourceMonitor:
    """Samples the device. `root` is where the profile's sysfs paths live ("/" on the device).

    psutil's temperature and battery lookups describe the machine this runs on, so they are
    used only when `host_sensors` is true, by default only when root is "/".
    """

    def __init__(self, profile: DeviceProfile | None = None, root: str | Path = "/",
                 pid: int | None = None, *, host_sensors: bool | None = None) -> None:
        self.profile = profile
        self.root = Path(root)
        self.host_sensors = self.root == Path("/") if host_sensors is None else host_sensors
        self._process = psutil.Process(pid)
        self._cpu_baseline = _cpu_times()
        # Until a clock tick has passed, the best figure is the average since boot.
        self._cpu_last = _usage([], self._cpu_baseline) or (0.0, [0.0] * len(self._cpu_baseline))
        use_vcgencmd = profile is not None and profile.vcgencmd and self.host_sensors
        self._vcgencmd = shutil.which("vcgencmd") if use_vcgencmd else None
        self._vcgencmd_at = -VCGENCMD_INTERVAL_S
        self._vcgencmd_last: Throttling | None = None

    def snapshot(self) -> Snapshot:
        """CPU use is measured since the previous snapshot (since construction for the first)."""
        cpu_percent, per_core = self._cpu_usage()
        memory = psutil.virtual_memory()
        battery_percent, on_battery = self._battery()
        profile = self.profile
        return Snapshot(
            time=time.time(),
            cpu_percent=cpu_percent,
            per_core_percent=per_core,
            load_avg=_load_avg(),
            mem_available_mb=memory.available / MB,
            mem_total_mb=memory.total / MB,
            rss_mb=self._rss_mb(),
            temperature_c=self._temperature(),
            throttling=self._throttling(),
            gpu_load_percent=sysfs.read_gpu_load(self.root, profile.gpu_load_paths) if profile else None,
            power_mw=sysfs.read_power_rails(self.root, profile.power_rail_globs) if profile else {},
            battery_percent=battery_percent,
            on_battery=on_battery,
        )

    def _cpu_usage(self) -> tuple[float, list[float]]:
        current = _cpu_times()
        # A core going on- or offline (Jetson power modes) changes the list: measure since boot.
        baseline = self._cpu_baseline if len(self._cpu_baseline) == len(current) else []
        usage = _usage(baseline, current)
        if usage is None:  # no clock tick since the last snapshot: repeat its figures
            return self._cpu_last
        self._cpu_baseline, self._cpu_last = current, usage
        return usage

    def _rss_mb(self) -> float | None:
        try:
            return self._process.memory_info().rss / MB
        except psutil.Error:
            return None

    def _temperature(self) -> float | None:
        zones = self.profile.thermal_zones if self.profile else []
        if zones and (hottest := sysfs.hottest_zone(self.root, zones)) is not None:
            return hottest
        if self.host_sensors and (hottest := _psutil_temperature()) is not None:
            return hottest
        return sysfs.hottest_zone(self.root, [sysfs.GENERIC_THERMAL_ZONES])

    def _throttling(self) -> Throttling | None:
        if self.profile is None:
            return None
        word = sysfs.read_throttled(self.root, self.profile.throttled_paths)
        if word is not None or self._vcgencmd is None:
            return word
        now = time.monotonic()
        if now - self._vcgencmd_at >= VCGENCMD_INTERVAL_S:
            self._vcgencmd_at = now
            self._vcgencmd_last = vcgencmd_throttled(self._vcgencmd)
        return self._vcgencmd_last

    def _battery(self) -> tuple[float | None, bool | None]:
        if not self.host_sensors:
            return None, None
        try:
            battery = psutil.sensors_battery()
        except (AttributeError, OSError, RuntimeError):
            return None, None
        if battery is None:
            return None, None
        plugged = battery.power_plugged
        return float(battery.percent), None if plugged is None else not plugged


def _cpu_times() -> list[CpuTimes]:
    """(busy, total) seconds per core, counted the way top counts them."""
    times = []
    for t in psutil.cpu_times(percpu=True):
        # Linux counts guest time inside user/nice too; iowait is idle.
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        idle = t.idle + getattr(t, "iowait", 0.0)
        times.append((total - idle, total))
    return times


def _usage(baseline: list[CpuTimes], current: list[CpuTimes]) -> tuple[float, list[float]] | None:
    """(total %, per-core %) between two samples; an empty baseline means since boot."""
    base = baseline or [(0.0, 0.0)] * len(current)
    total = _percent(_sum(base), _sum(current))
    if total is None:
        return None
    per_core = [_percent(b, c) or 0.0 for b, c in zip(base, current)]
    return total, per_core


def _sum(times: list[CpuTimes]) -> CpuTimes:
    return sum(b for b, _ in times), sum(t for _, t in times)


def _percent(before: CpuTimes, after: CpuTimes) -> float | None:
    elapsed = after[1] - before[1]
    if elapsed <= 0:
        return None
    return min(100.0, max(0.0, 100.0 * (after[0] - before[0]) / elapsed))


def _load_avg() -> tuple[float, float, float] | None:
    try:
        return psutil.getloadavg()
    except (AttributeError, OSError):
        return None


def _psutil_temperature() -> float | None:
    try:
        groups = psutil.sensors_temperatures()
    except (AttributeError, OSError, RuntimeError):
        return None
    usable = {name: entries for name, entries in groups.items()
              if name.lower() not in sysfs.IGNORED_ZONE_TYPES}
    cpu = {name: entries for name, entries in usable.items() if name.lower() in CPU_SENSOR_GROUPS}
    readings = [sysfs.plausible_celsius(e.current) for entries in (cpu or usable).values() for e in entries]
    return max((r for r in readings if r is not None), default=None)
