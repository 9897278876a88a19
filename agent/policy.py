"""Which variant should serve now: the most accurate one that fits, with hysteresis and a reason.

A variant fits when its expected p95 latency meets the SLO (tightened when the board is warm or
throttling), its memory fits the budget and what the system has free. Expected latency is the
on-device benchmark scaled by how much slower the active variant runs now than on that bench,
so CPU contention and throttling move every estimate alike. A violation steps down at once; a
step up waits for the cooldown and needs headroom. A pin overrides everything.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from agent.stats import LatencySummary

# Thermal states (agent.monitor.thermal_state) and how much they tighten the SLO.
_SLO_FACTOR = {"unknown": 1.0, "ok": 1.0, "warm": 0.75, "throttle": 0.5}


@dataclass(frozen=True)
class Candidate:
    id: str
    quality: float                  # higher is better: accuracy, or minus perplexity
    bench_p95_ms: float | None      # measured on this device at rest
    memory_mb: float                # estimated resident size


@dataclass(frozen=True)
class PolicySettings:
    latency_slo_ms: float
    memory_budget_mb: float | None = None
    cooldown_s: float = 30.0        # a step up waits this long after any switch
    headroom: float = 0.7           # and needs expected p95 <= headroom * SLO
    min_samples: int = 20           # live requests before live latency counts as evidence
    pin: str | None = None


@dataclass(frozen=True)
class Observation:
    now: float                      # monotonic seconds
    active: str
    live: LatencySummary            # the active variant's latency since it became active
    thermal: str = "unknown"        # ok | warm | throttle | critical | unknown
    temperature_c: float | None = None
    mem_available_mb: float | None = None


@dataclass(frozen=True)
class Decision:
    variant: str
    reason: str
    kind: str                       # hold | step-down | step-up | pin | thermal | memory
    changed: bool


class Policy:
    def __init__(self, candidates: list[Candidate], settings: PolicySettings):
        if not candidates:
            raise ValueError("a policy needs at least one healthy variant")
        # Most accurate first; among equals, the faster (a structured twin beats its sparse parent).
        self.candidates = sorted(candidates, key=lambda c: (-c.quality, _latency_key(c)))
        self._by_id = {c.id: c for c in self.candidates}
        self.settings = settings
        self._last_switch = float("-inf")
        if settings.pin is not None:
            self._known(settings.pin)

    def pin(self, variant_id: str | None) -> None:
        if variant_id is not None:
            self._known(variant_id)
        self.settings = replace(self.settings, pin=variant_id)

    def update(self, **changes) -> None:
        """Change settings (e.g. latency_slo_ms) at run time; unknown names raise TypeError."""
        if changes.get("pin") is not None:
            self._known(changes["pin"])
        self.settings = replace(self.settings, **changes)

    def note_switch(self, now: float) -> None:
        self._last_switch = now

    def decide(self, obs: Observation) -> Decision:
        s = self.settings
        if s.pin is not None:
            return self._to(obs, s.pin, "pin", f"pinned to {s.pin} by the operator")

        fitting_memory = [c for c in self.candidates if self._memory_fits(c, obs)]
        if not fitting_memory:
            smallest = min(self.candidates, key=lambda c: c.memory_mb)
            return self._to(obs, smallest.id, "memory", f"no variant fits in memory; {smallest.id} is the smallest "
                                                        f"({smallest.memory_mb:.0f} MB)")
        if obs.thermal == "critical":
            fastest = min(fitting_memory, key=_latency_key)
            return self._to(obs, fastest.id, "thermal", f"critical temperature{_temp(obs)}: fastest variant {fastest.id}")

        slo = s.latency_slo_ms * _SLO_FACTOR.get(obs.thermal, 1.0)
        slo_text = f"SLO {slo:.1f} ms" + (f" ({obs.thermal}{_temp(obs)})" if slo < s.latency_slo_ms else "")
        slowdown = self._slowdown(obs)
        expected = {c.id: c.bench_p95_ms * slowdown for c in fitting_memory if c.bench_p95_ms is not None}
        target = next((c for c in fitting_memory if c.id in expected and expected[c.id] <= slo), None)
        if target is None:
            target = min(fitting_memory, key=_latency_key)
        active = self._by_id.get(obs.active)

        if active is None or active not in fitting_memory:
            return self._to(obs, target.id, "memory", f"{obs.active} does not fit in memory; {target.id} does")
        violated = obs.live.count >= s.min_samples and obs.live.p95 is not None and obs.live.p95 > slo
        too_slow = active.id in expected and expected[active.id] > slo
        if violated or (too_slow and obs.thermal in ("warm", "throttle")):
            if target.id != active.id and _latency_key(target) < _latency_key(active):
                measured = f"p95 {obs.live.p95:.1f} ms" if violated else f"expected p95 {expected[active.id]:.1f} ms"
                return self._to(obs, target.id, "step-down", f"{measured} > {slo_text}: {target.id} expected at "
                                                             f"{expected.get(target.id, float('nan')):.1f} ms")
        if target.quality > active.quality and target.id in expected:
            waited = obs.now - self._last_switch
            if waited >= s.cooldown_s and expected[target.id] <= s.headroom * slo:
                return self._to(obs, target.id, "step-up", f"headroom: {target.id} expected at "
                                                           f"{expected[target.id]:.1f} ms <= {s.headroom:.0%} of {slo_text}")
        live = f"p95 {obs.live.p95:.1f} ms" if obs.live.p95 is not None else "no traffic"
        return Decision(active.id, f"holding {active.id}: {live}, {slo_text}", "hold", False)

    def _slowdown(self, obs: Observation) -> float:
        """How much slower the active variant runs now than on its bench (1.0 without live evidence)."""
        active = self._by_id.get(obs.active)
        if (active is None or active.bench_p95_ms is None or obs.live.p95 is None
                or obs.live.count < self.settings.min_samples):
            return 1.0
        return max(obs.live.p95 / active.bench_p95_ms, 0.5)

    def _memory_fits(self, c: Candidate, obs: Observation) -> bool:
        budget = self.settings.memory_budget_mb
        if budget is not None and c.memory_mb > budget:
            return False
        return obs.mem_available_mb is None or c.id == obs.active or c.memory_mb < obs.mem_available_mb

    def _to(self, obs: Observation, variant_id: str, kind: str, reason: str) -> Decision:
        changed = variant_id != obs.active
        return Decision(variant_id, reason if changed or kind != "pin" else f"{reason} (active)", kind, changed)

    def _known(self, variant_id: str) -> None:
        if variant_id not in self._by_id:
            raise KeyError(f"unknown variant '{variant_id}'; healthy variants: {', '.join(self._by_id)}")


def _latency_key(c: Candidate) -> float:
    return c.bench_p95_ms if c.bench_p95_ms is not None else float("inf")


def _temp(obs: Observation) -> str:
    return f" {obs.temperature_c:.1f} °C" if obs.temperature_c is not None else ""
