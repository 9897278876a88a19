"""`edgeshift-agent demo DIR`: the agent as an on-device pipeline, reacting to CPU stress.

Replays the portfolio's sample inputs at a steady rate, then loads every core with busy
processes for a while, then lets go: each switch prints with its reason, and a per-variant
latency table closes the run. The SLO is set from this machine's own measurements (a multiple
of the most accurate variant's bench p95), so the story is the same on a Pi and on a laptop.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.service import Agent, Event
from agent.stats import percentile
from agent.workload import CpuStress, ReplaySource


def run_demo(portfolio_dir: Path, device: str = "x86", rate_hz: float = 200.0, calm_s: float = 15.0,
             stress_s: float = 30.0, after_s: float = 25.0, slo_factor: float = 2.0, cooldown_s: float = 8.0,
             print_fn=print) -> dict[str, list[float]]:
    portfolio = Portfolio.open(portfolio_dir)
    profile = load_profile(device)
    agent = Agent(portfolio, profile, PolicySettings(latency_slo_ms=1e9), preload="all", bench_runs=100)
    started = time.monotonic()
    clock = lambda: f"[{time.monotonic() - started:6.1f} s]"
    agent.listeners.append(lambda e: _print_event(e, clock, print_fn))
    agent.start()

    best = agent.policy.candidates[0]
    slo = slo_factor * best.bench_p95_ms
    agent.policy.update(latency_slo_ms=slo, cooldown_s=cooldown_s)
    print_fn(f"{clock()} {portfolio.manifest.name}: {len(agent.policy.candidates)} variants on {agent.backend.name}, "
             f"{agent.threads} threads; SLO {slo:.2f} ms = {slo_factor:g} x the bench p95 of {best.id}")
    print_fn(_bench_lines(agent))

    latencies: dict[str, list[float]] = defaultdict(list)

    def infer(x: np.ndarray) -> None:
        result = agent.infer(x)
        latencies[result.variant].append(result.latency_ms)

    replay = ReplaySource(portfolio.root / "samples.npz", infer, rate_hz=rate_hz)
    stop = threading.Event()
    steering = threading.Thread(target=_steer, args=(agent, stop), daemon=True)
    replay.start()
    steering.start()
    try:
        print_fn(f"{clock()} replaying samples at {rate_hz:g} Hz; calm for {calm_s:g} s")
        time.sleep(calm_s)
        with CpuStress(duration_s=stress_s):
            print_fn(f"{clock()} CPU stress on every core for {stress_s:g} s")
            time.sleep(stress_s)
        print_fn(f"{clock()} stress over; watching for {after_s:g} s (a step up waits {cooldown_s:g} s of calm)")
        time.sleep(after_s)
    finally:
        stop.set()
        replay.stop()
        steering.join(timeout=5)
        agent.close()
    print_fn(f"{clock()} {replay.sent} requests, {replay.failed} failed; "
             f"{sum(1 for e in agent.events if e.type == 'switch')} switches")
    print_fn(_latency_lines(latencies))
    return latencies


def _steer(agent: Agent, stop: threading.Event, interval_s: float = 0.5) -> None:
    while not stop.wait(interval_s):
        agent.step()


def _print_event(event: Event, clock, print_fn) -> None:
    if event.type == "switch":
        print_fn(f"{clock()} switch {event.details['from']} -> {event.details['to']} "
                 f"({event.details['switch_ms']:.2f} ms): {event.reason}")
    elif event.type in ("health", "error"):
        print_fn(f"{clock()} {event.type}: {event.reason}")


def _bench_lines(agent: Agent) -> str:
    lines = [f"{'variant (most accurate first)':<30} {'accuracy':>8} {'bench p95 ms':>12}"]
    for c in agent.policy.candidates:
        lines.append(f"{c.id:<30} {c.quality:>8.3f} {c.bench_p95_ms:>12.3f}")
    return "\n".join(lines)


def _latency_lines(latencies: dict[str, list[float]]) -> str:
    lines = [f"{'served by':<30} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]
    for vid, values in sorted(latencies.items(), key=lambda item: -len(item[1])):
        values = sorted(values)
        lines.append(f"{vid:<30} {len(values):>8} {percentile(values, 50):>8.3f} {percentile(values, 95):>8.3f} "
                     f"{percentile(values, 99):>8.3f}")
    return "\n".join(lines)
