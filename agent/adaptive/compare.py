"""The adaptive agent against every fixed choice: each variant pinned, then the free policy, same schedule.

The SLO comes from this machine: a multiple of the most accurate variant's bench p95. Runs go one
after another in one process, so they share the machine's noise but not its moment. So the
comparison runs in rounds, each serving the free policy and every variant pinned once, in an order
that reverses every round (the free policy first, then last), and scores each mode over all its
rounds' requests together: a moment of noise lands on every mode alike, and each mode's per-round
effective accuracies show how far one run can be trusted.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.adaptive.pressure import Phase
from agent.adaptive.score import RunScore, score
from agent.adaptive.serve import ServedRun, serve_schedule
from agent.policy import Candidate, PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import DeviceProfile
from agent.service import Agent

ADAPTIVE = "adaptive (free policy)"
DENSE_BUSY = 0.4  # the default rate keeps the dense variant this busy at rest
MAX_DEFAULT_RATE_HZ = 200.0  # and stays below this: beyond it Python's own per-request cost dominates


@dataclass
class Comparison:
    slo_ms: float
    rate_hz: float
    candidates: list[Candidate]          # most accurate first, with this machine's bench latencies
    rounds: list[dict[str, ServedRun]]   # per round, mode (ADAPTIVE or a pinned variant id) -> run, in running order
    pinned: dict[str, RunScore]          # variant id -> its pinned runs' requests scored together
    adaptive: RunScore                   # the free policy's runs scored together
    headline: list[RunScore]             # pinned dense, fastest, best in hindsight, adaptive

    def by_round(self, mode: str) -> list[RunScore]:
        """The mode's row in each round, in round order."""
        return [score(f"{mode}, round {number}", run[mode].requests, self.slo_ms, len(run[mode].switches))
                for number, run in enumerate(self.rounds, start=1)]

    @property
    def best_pinned(self) -> str:
        """The variant whose pinned runs answered the most requests right and in time (chosen in hindsight)."""
        return max(self.pinned, key=lambda vid: self.pinned[vid].effective_accuracy or 0.0)


def compare(portfolio_dir: Path, profile: DeviceProfile, schedule: list[Phase], rate_hz: float | None = None,
            slo_factor: float = 3.0, slo_ms: float | None = None, cooldown_s: float = 5.0, bench_runs: int = 50,
            rounds: int = 2, progress: Callable[[str], None] = lambda line: None) -> Comparison:
    if rounds < 1:
        raise ValueError(f"rounds must be 1 or more, got {rounds}")
    portfolio = Portfolio.open(portfolio_dir)
    x, y = portfolio.evaluation_data()
    with tempfile.TemporaryDirectory(prefix="edgeshift-adaptive-") as scratch:
        sensors_root, state_dir = Path(scratch) / "sysfs", Path(scratch) / "state"
        candidates = measure(portfolio, profile, state_dir, bench_runs)
        best = candidates[0]
        slo = slo_ms if slo_ms is not None else slo_factor * best.bench_p95_ms
        progress(f"SLO {slo:.2f} ms" + ("" if slo_ms is not None else
                                         f" = {slo_factor:g} x the bench p95 of {best.id} on this machine"))
        if rate_hz is None:
            rate_hz = default_rate(portfolio, candidates)
            progress(f"{rate_hz:.0f} requests/s: dense busy at most {DENSE_BUSY:.0%} of the time at rest")
        served: list[dict[str, ServedRun]] = []
        total = rounds * (len(candidates) + 1)
        for number in range(rounds):
            served.append({})
            for mode in running_order([c.id for c in candidates], number):
                pin = None if mode == ADAPTIVE else mode
                progress(f"run {number * (len(candidates) + 1) + len(served[-1]) + 1}/{total} (round {number + 1}): "
                         f"{'pinned to ' + pin if pin else ADAPTIVE}")
                settings = PolicySettings(latency_slo_ms=slo, cooldown_s=cooldown_s, pin=pin)
                served[-1][mode] = serve_schedule(portfolio, profile, settings, schedule, x, y, rate_hz, sensors_root,
                                                  state_dir, bench_runs)
    pinned = {c.id: pooled(f"pinned {c.id}", served, c.id, slo) for c in candidates}
    adaptive = pooled(ADAPTIVE, served, ADAPTIVE, slo)
    return Comparison(slo, rate_hz, candidates, served, pinned, adaptive,
                      headline_rows(portfolio, candidates, pinned, adaptive))


def running_order(variant_ids: list[str], round_index: int) -> list[str]:
    """The free policy, then every variant pinned; reversed every other round, so no mode always runs first."""
    order = [ADAPTIVE, *variant_ids]
    return order if round_index % 2 == 0 else order[::-1]


def pooled(name: str, rounds: list[dict[str, ServedRun]], mode: str, slo_ms: float) -> RunScore:
    """Every round's requests of one mode scored as one run; switches summed."""
    return score(name, [r for run in rounds for r in run[mode].requests], slo_ms,
                 sum(len(run[mode].switches) for run in rounds))


def default_rate(portfolio: Portfolio, candidates: list[Candidate]) -> float:
    """A rate the dense variant serves comfortably at rest and not under contention: the case for switching."""
    dense = next(c for c in candidates if c.id == dense_variant(portfolio, candidates))
    return min(DENSE_BUSY * 1000.0 / (dense.bench_p50_ms or dense.bench_p95_ms), MAX_DEFAULT_RATE_HZ)


def measure(portfolio: Portfolio, profile: DeviceProfile, state_dir: Path, bench_runs: int) -> list[Candidate]:
    """Bench every variant once into state_dir (the runs reuse it); the policy's candidates, most accurate first."""
    agent = Agent(portfolio, profile, PolicySettings(latency_slo_ms=1e9), preload="lazy", bench_runs=bench_runs,
                  state_dir=state_dir)
    agent.start()
    try:
        return list(agent.policy.candidates)
    finally:
        agent.close()


def headline_rows(portfolio: Portfolio, candidates: list[Candidate], pinned: dict[str, RunScore],
                  adaptive: RunScore) -> list[RunScore]:
    dense = dense_variant(portfolio, candidates)
    fastest = min(candidates, key=lambda c: c.bench_p50_ms or c.bench_p95_ms).id  # the median: tails are noise
    hindsight = max(pinned, key=lambda vid: pinned[vid].effective_accuracy or 0.0)
    return [_renamed(pinned[dense], f"pinned dense ({dense})"), _renamed(pinned[fastest], f"pinned fastest ({fastest})"),
            _renamed(pinned[hindsight], f"pinned best in hindsight ({hindsight})"), adaptive]


def dense_variant(portfolio: Portfolio, candidates: list[Candidate]) -> str:
    """The unpruned variant, else the most accurate one."""
    ids = {c.id for c in candidates}
    return next((v.id for v in portfolio.manifest.variants if v.method == "dense" and v.id in ids), candidates[0].id)


def _renamed(row: RunScore, mode: str) -> RunScore:
    return replace(row, mode=mode)
