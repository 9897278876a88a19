"""One run of the schedule: a started agent, the labelled replay, a steering thread, the pressure phases.

`drive` takes an agent someone else set up (the demo's, in a fleet); `serve_schedule` sets one up
for a benchmark run: pinned to a variant or free, its monitor reading the fake sensors' root.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.adaptive.pressure import Phase, play
from agent.adaptive.replay import LabelledReplay, Request
from agent.adaptive.thermal import FakeThermalSensors
from agent.monitor import ResourceMonitor, thermal_state
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import DeviceProfile
from agent.service import Agent, Event

STEP_INTERVAL_S = 0.5


@dataclass
class ServedRun:
    requests: list[Request]
    switches: list[Event]
    thermal_seen: dict[str, set[str]] = field(default_factory=dict)  # phase -> states the policy was given
    errors: list[str] = field(default_factory=list)


def drive(agent: Agent, schedule: list[Phase], sensors: FakeThermalSensors | None, x: np.ndarray, y: np.ndarray | None,
          rate_hz: float, on_phase: Callable[[Phase], None] = lambda phase: None,
          while_waiting: Callable[[], None] = lambda: None) -> ServedRun:
    """Replay x (labels y) at rate_hz through the schedule while the agent steers every half second."""
    switches: list[Event] = []
    listener = lambda event: switches.append(event) if event.type == "switch" else None  # noqa: E731
    agent.listeners.append(listener)
    replay = LabelledReplay(agent.infer, x, y, rate_hz)
    replay.phase = schedule[0].name if schedule else "calm"
    seen: dict[str, set[str]] = defaultdict(set)
    stop = threading.Event()

    def steer() -> None:
        while agent.wait_for_round(STEP_INTERVAL_S, stop):
            agent.step()
            if agent.last_snapshot is not None:
                seen[replay.phase].add(thermal_state(agent.last_snapshot.temperature_c, agent.profile.thermal))

    def enter(phase: Phase) -> None:
        replay.phase = phase.name
        on_phase(phase)

    steering = threading.Thread(target=steer, name="edgeshift-steering", daemon=True)
    replay.start()
    steering.start()
    try:
        play(schedule, sensors, enter, while_waiting)
    finally:
        stop.set()
        agent.request_round()
        replay.stop()
        steering.join(timeout=5)
        agent.listeners.remove(listener)
    return ServedRun(replay.requests, switches, dict(seen), replay.errors)


def serve_schedule(portfolio: Portfolio, profile: DeviceProfile, settings: PolicySettings, schedule: list[Phase],
                   x: np.ndarray, y: np.ndarray | None, rate_hz: float, sensors_root: Path, state_dir: Path,
                   bench_runs: int = 50) -> ServedRun:
    """A fresh agent (pinned when settings.pin) whose monitor reads sensors_root, driven through the schedule.

    Runs sharing a state_dir share one bench measurement, so every run's policy sees the same costs.
    """
    (state_dir / "agent-state.json").unlink(missing_ok=True)  # start where the policy says, not where the last run ended
    sensors = FakeThermalSensors(profile, sensors_root)
    monitor = ResourceMonitor(profile, root=sensors_root)
    agent = Agent(portfolio, profile, settings, monitor=monitor, preload="all", bench_runs=bench_runs,
                  state_dir=state_dir)
    agent.start()
    try:
        return drive(agent, schedule, sensors, x, y, rate_hz)
    finally:
        agent.close()
