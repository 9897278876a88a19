"""The scripted pressure schedule: calm, CPU contention on every core, calm, then a board warming up and throttling.

This machine cannot be heated or down-clocked on cue, so the thermal phases write the sensors a
board would show (FakeThermalSensors) and, once it throttles, take about half of every core
with busy workers, which is what a capped clock does to the model: it runs about 2x slower.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from agent.adaptive.thermal import FakeThermalSensors
from agent.workload import CpuStress

KINDS = ("calm", "cpu", "warm", "throttle")


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str          # calm | cpu | warm | throttle
    seconds: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"phase kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.seconds < 0:
            raise ValueError(f"phase {self.name} lasts {self.seconds} s; give 0 or more")


def standard_schedule(calm_s: float = 5.0, cpu_s: float = 10.0, recover_s: float = 8.0, warm_s: float = 5.0,
                      throttle_s: float = 8.0) -> list[Phase]:
    return [Phase("calm", "calm", calm_s), Phase("cpu", "cpu", cpu_s), Phase("recover", "calm", recover_s),
            Phase("warm", "warm", warm_s), Phase("throttle", "throttle", throttle_s)]


def play(schedule: list[Phase], sensors: FakeThermalSensors | None, on_phase: Callable[[Phase], None],
         while_waiting: Callable[[], None] = lambda: None, watch_every_s: float = 10.0) -> None:
    """Apply each phase for its duration; `on_phase` hears each one start, `while_waiting` runs every watch_every_s.

    Without sensors (an agent reading the real board) only calm and cpu phases can be played."""
    if sensors is None and any(phase.kind in ("warm", "throttle") for phase in schedule):
        raise ValueError("thermal phases need fake sensors for the agent's monitor to read")
    sensors = sensors or _NoSensors()
    try:
        for phase in schedule:
            with ExitStack() as effects:
                if phase.kind == "calm":
                    sensors.cool()
                elif phase.kind == "warm":
                    sensors.warm()
                elif phase.kind == "throttle":
                    sensors.throttle()
                if phase.kind in ("cpu", "throttle"):
                    effects.enter_context(CpuStress(duration_s=phase.seconds + 5))  # stopped at the phase's end
                on_phase(phase)
                _sleep_watching(phase.seconds, while_waiting, watch_every_s)
    finally:
        sensors.cool()


def _sleep_watching(seconds: float, watch: Callable[[], None], every_s: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(every_s, left))
        if deadline - time.monotonic() > 1:
            watch()


class _NoSensors:
    def cool(self) -> None:
        pass
