"""The Raspberry Pi firmware's throttling word, from sysfs or `vcgencmd get_throttled`.

Bits 0-3 say what is happening now (under-voltage, ARM frequency capped, throttled, soft
temperature limit); bits 16-19 say the same since boot.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

VCGENCMD_TIMEOUT_S = 1.0


@dataclass
class Throttling:
    under_voltage: bool
    freq_capped: bool
    throttled: bool
    soft_temp_limit: bool
    under_voltage_since_boot: bool
    freq_capped_since_boot: bool
    throttled_since_boot: bool
    soft_temp_limit_since_boot: bool
    raw: int

    @property
    def active(self) -> bool:
        return self.under_voltage or self.freq_capped or self.throttled or self.soft_temp_limit

    @classmethod
    def from_raw(cls, raw: int) -> Throttling:
        def bit(n: int) -> bool:
            return bool(raw >> n & 1)

        return cls(
            under_voltage=bit(0),
            freq_capped=bit(1),
            throttled=bit(2),
            soft_temp_limit=bit(3),
            under_voltage_since_boot=bit(16),
            freq_capped_since_boot=bit(17),
            throttled_since_boot=bit(18),
            soft_temp_limit_since_boot=bit(19),
            raw=raw,
        )


def parse_throttled(text: str) -> Throttling | None:
    """`throttled=0x50005` (vcgencmd), `0x50005`, or `50005` (the sysfs node); None if garbage.

    Text without a prefix is hexadecimal: the kernel writes the node with "%x", so "50005"
    there means 0x50005, not fifty thousand and five.
    """
    value = text.strip()
    if value.startswith("throttled="):
        value = value[len("throttled="):]
    if value[:2].lower() == "0x":
        value = value[2:]
    try:
        raw = int(value, 16)
    except ValueError:
        return None
    if not 0 <= raw <= 0xFFFFFFFF:
        return None
    return Throttling.from_raw(raw)


def vcgencmd_throttled(executable: str = "vcgencmd") -> Throttling | None:
    """Runs `vcgencmd get_throttled`: a subprocess, so callers should not do it on every sample."""
    try:
        result = subprocess.run(
            [executable, "get_throttled"],
            capture_output=True, text=True, timeout=VCGENCMD_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return parse_throttled(result.stdout)
