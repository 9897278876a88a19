"""Resource monitoring on the device: psutil, sysfs and vcgencmd; never torch."""

from agent.monitor.resources import ResourceMonitor, Snapshot, thermal_state
from agent.monitor.throttling import Throttling, parse_throttled

__all__ = ["ResourceMonitor", "Snapshot", "Throttling", "parse_throttled", "thermal_state"]
