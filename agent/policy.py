"""Which variant should serve now: the most accurate one that fits, with hysteresis and a reason.

A variant fits when its expected p95 latency meets the SLO (tightened when the board is warm or
throttling), its memory fits the budget and what the system has free. Live latencies are as the
clients saw them where callers stamp arrivals (Agent.infer's `arrived`): time waiting to be run
counts, since a client's SLO does. Expected latency is the
on-device benchmark scaled by how much slower the active variant runs now than on that bench,
so CPU contention and throttling move every estimate alike. A violation steps down at once; a
step up waits for the cooldown and needs headroom, and a step up that pressure undoes within a
cooldown doubles the next wait (up to 8x), so a policy does not flap on estimates that proved wrong.
While the board throttles there is no step up at all: a costlier variant draws more power on a board
already capping its clock, and an estimate scaled from a cheaper variant underrates what pressure
does to a costlier one (in one bench/adaptive.py run, pinned to Reconvene x64 int8 the throttling
phase answered 71% of requests in time, pinned to x256 int8, 2.5x fewer MACs, 92%). A variant whose
step up failed is not stepped up to again, for those 8 cooldowns, unless the active
variant runs measurably faster (relative to its cost) than when that step up was taken: contention
hurts a costlier variant more than its cost says (longer requests are preempted more), so an
estimate that proved wrong at one pressure is not trusted again at the same pressure. A pin
overrides everything.

Bench latencies are noisy: on a shared device the p95 tail orders variants of the same cost at
random. So a variant's cost is its bench median, and one variant is cheaper than another only
when its median is lower by more than a noise margin; within it they cost the same, and the
more accurate is preferred. Expected latency is a variant's median scaled by how the active
variant's live p95 compares to its own median. A step down goes only to a really cheaper variant;
when nothing is expected to fit, to the cheapest (the most accurate of those that cost the
least), never to another variant that costs the same as the active one.

Accuracy is measured too, on a finite test set: two variants whose accuracies differ by less than
their sampling error (`quality_z` standard errors of the difference) are equally accurate, and
the cheaper one serves. Without that rule a variant half a point "better" on 450 test images
serves at rest at several times the cost, and its tail costs more answers than its accuracy wins.

A window of seconds lags its span behind a change: when contention starts, its p95 crosses the
SLO only once a twentieth of the window is late. So the median of the last `trip_samples`
answers above the SLO is a violation too, and the steering loop runs a round as soon as an
answer comes back late (Agent.wait_for_round): the step down lands a few requests after the
pressure does. Stepping up keeps to the window: down fast, up slow.

Meeting the SLO is not the goal by itself: an answer counts when it is right and in time
(effective accuracy, Model-Switching, HotCloud '20). A step down goes only to a variant expected
to answer more requests right and in time than the active one does now: its accuracy times the
share of the active variant's answers that would have been in time had each been shorter by the
cost it saves (the cost difference at the live median's slowdown), against the active variant's
accuracy times its measured share. The saving is subtracted, not scaled: contention delays a
request by preempting it, and a cheaper variant waits out the same preemption (measured: under
busy loops on every core a variant 1.2-1.3x cheaper answered 0 to 6 points more requests in
time). So a much less accurate variant never serves just because it is cheaper.
When the most accurate variant fitting is distrusted (above), the next one fitting may serve.

Latency alone misses a queue: at a steady request rate, a variant busy serving most of the time
answers each request on time while the requests behind it wait. So a variant busy more than
`max_busy` of the time also steps down, to one whose median cost keeps the device below it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from agent.backends.providers import short_name
from agent.stats import LatencySummary, percentile

# Thermal states (agent.monitor.thermal_state) and how much they tighten the SLO.
_SLO_FACTOR = {"unknown": 1.0, "ok": 1.0, "warm": 0.75, "throttle": 0.5}
MAX_BACKOFF_DOUBLINGS = 3  # a failed step up waits at most 8 cooldowns before the next try


@dataclass(frozen=True)
class Candidate:
    id: str
    quality: float                  # higher is better: accuracy, or minus perplexity
    bench_p95_ms: float | None      # measured on this device at rest
    memory_mb: float                # estimated resident size
    bench_p50_ms: float | None = None  # the cost to compare: medians shrug off the noise tails carry
    provider: str | None = None     # the execution provider it runs on: its cost holds there only
    quality_error: float = 0.0      # standard error of quality (accuracy on n test samples); 0: exact

    @property
    def named(self) -> str:
        """The variant as reasons name its cost: "dense on CUDA"."""
        return f"{self.id} on {short_name(self.provider)}" if self.provider else self.id

    @property
    def cost_ms(self) -> float | None:
        return self.bench_p50_ms if self.bench_p50_ms is not None else self.bench_p95_ms


@dataclass(frozen=True)
class PolicySettings:
    latency_slo_ms: float
    memory_budget_mb: float | None = None
    cooldown_s: float = 30.0        # a step up waits this long after any switch
    headroom: float = 0.7           # and needs expected p95 <= headroom * SLO
    min_samples: int = 20           # live requests before live latency counts as evidence
    noise_margin: float = 0.2       # bench medians closer than this share cost the same
    max_busy: float = 0.8           # share of time the active variant may spend serving: beyond, a steady stream queues
    quality_z: float = 1.0          # qualities closer than this many standard errors of their difference are equal
    trip_samples: int = 8           # the last answers whose median above the SLO is a violation at once
    pin: str | None = None


@dataclass(frozen=True)
class Observation:
    now: float                      # monotonic seconds
    active: str
    live: LatencySummary            # the active variant's latency since it became active
    thermal: str = "unknown"        # ok | warm | throttle | critical | unknown
    temperature_c: float | None = None
    mem_available_mb: float | None = None
    busy: float | None = None       # share of recent time the active variant spent serving
    recent: LatencySummary | None = None  # the active variant's last trip_samples answers
    latencies: tuple[float, ...] = ()     # the active variant's answers in the window (ms): its share in time


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
        self._last_step_up = float("-inf")
        self._failed_step_ups = 0       # step ups undone by a step down within a cooldown, in a row
        self._step_up_slowdown: float | None = None   # the active variant's slowdown when the last step up was taken
        self._distrusted: dict[str, tuple[float, float]] = {}  # variant -> (slowdown its step up failed at, when)
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
            fastest = self._cheapest(fitting_memory)
            return self._to(obs, fastest.id, "thermal",
                            f"critical temperature{_temp(obs)}: fastest variant {fastest.named}")

        slo = s.latency_slo_ms * _SLO_FACTOR.get(obs.thermal, 1.0)
        slo_text = f"SLO {slo:.1f} ms" + (f" ({obs.thermal}{_temp(obs)})" if slo < s.latency_slo_ms else "")
        active = self._by_id.get(obs.active)
        expected = self._expected_p95(obs, active, fitting_memory)
        busy = self._expected_busy(obs, active, fitting_memory)
        target = self._best_fitting(fitting_memory, expected, slo, busy) or self._cheapest(fitting_memory)

        if active is None or active not in fitting_memory:
            return self._to(obs, target.id, "memory", f"{obs.active} does not fit in memory; {target.id} does")
        recent_median = self._recent_median(obs)
        tripped = recent_median is not None and recent_median > slo
        violated = tripped or (obs.live.count >= s.min_samples and obs.live.p95 is not None and obs.live.p95 > slo)
        too_slow = active.id in expected and expected[active.id] > slo
        overloaded = obs.live.count >= s.min_samples and obs.busy is not None and obs.busy > s.max_busy
        pressed = violated or overloaded or (too_slow and obs.thermal in ("warm", "throttle"))
        in_time = self._share_in_time(obs, slo)
        if pressed:
            cheaper = [c for c in fitting_memory if self._cheaper(c, active)]
            losing = [] if overloaded else [c for c in cheaper if not self._could_pay(c, active, obs, slo, in_time)]
            cheaper = [c for c in cheaper if c not in losing]
            down = self._best_fitting(cheaper, expected, slo, busy) or self._cheapest(cheaper)
            if down is not None:
                if tripped:
                    measured = f"the last {obs.recent.count} answers' median {obs.recent.p50:.1f} ms > {slo_text}"
                elif violated:
                    measured = f"p95 {obs.live.p95:.1f} ms > {slo_text}"
                elif overloaded:
                    measured = f"busy {obs.busy:.0%} of the time > {s.max_busy:.0%}, requests queue; {slo_text}"
                else:
                    measured = f"expected p95 {expected[active.id]:.1f} ms > {slo_text}"
                fits = "" if expected.get(down.id, float("inf")) <= slo else ", the cheapest; nothing fits"
                failed = obs.now - self._last_step_up <= s.cooldown_s
                self._failed_step_ups = self._failed_step_ups + 1 if failed else 0
                if failed and self._step_up_slowdown is not None:
                    self._distrusted[active.id] = (self._step_up_slowdown, obs.now)
                return self._to(obs, down.id, "step-down", f"{measured}: {down.named} expected at "
                                                           f"{expected.get(down.id, float('nan')):.1f} ms{fits}")
        if target is not active and self._as_good(active, target) and self._cheaper(target, active) and not pressed:
            return self._to(obs, target.id, "step-down", f"{target.named} is as accurate within noise "
                                                         f"({_quality_text(target)} vs {_quality_text(active)}) "
                                                         f"and cheaper")
        if not self._as_good(active, target) and target.id in expected:
            waited = obs.now - self._last_switch
            slowdown = self._slowdown(obs, active)

            def may_step_up_to(c: Candidate | None) -> bool:
                if c is None or self._as_good(active, c) or waited < self._step_up_wait():
                    return False
                room = busy.get(c.id) is None or busy[c.id] <= s.headroom * s.max_busy
                return expected.get(c.id, float("inf")) <= s.headroom * slo and room

            if obs.thermal == "throttle" and waited >= self._step_up_wait():
                return Decision(active.id, f"holding {active.id}: the board throttles{_temp(obs)}; no step up to "
                                           f"{target.named} until it stops", "hold", False)
            distrusted = [c for c in fitting_memory if self._still_distrusted(c, slowdown, obs.now)]
            trusted = [c for c in fitting_memory if all(self._cheaper(c, d) for d in distrusted)]  # nothing as costly
            up = self._best_fitting(trusted, expected, slo, busy)
            if may_step_up_to(up):
                self._last_step_up = obs.now
                self._step_up_slowdown = slowdown
                backoff = f" (after {self._step_up_wait():.0f} s: recent step ups failed)" if self._failed_step_ups else ""
                return self._to(obs, up.id, "step-up", f"headroom: {up.named} expected at {expected[up.id]:.1f} ms "
                                                       f"<= {s.headroom:.0%} of {slo_text}{backoff}")
            if target.id in self._distrusted and may_step_up_to(target):
                failed_at, when = self._distrusted[target.id]
                now_text = f"{slowdown:.1f}x" if slowdown is not None else "not measured yet"
                return Decision(active.id, f"holding {active.id}: a step up to {target.named} failed "
                                           f"{obs.now - when:.0f} s ago with {active.id} at {failed_at:.1f}x its "
                                           f"cost, now {now_text}", "hold", False)
        live = f"p95 {obs.live.p95:.1f} ms" if obs.live.p95 is not None else "no traffic"
        if pressed and losing:
            best = max(losing, key=lambda c: c.quality)
            return Decision(active.id, f"holding {active.id}: {live}, {slo_text}; {_quality_text(active)} accurate "
                                       f"with {in_time:.0%} of answers in time, more right in time than "
                                       f"{best.named} ({_quality_text(best)}) is expected to answer", "hold", False)
        if pressed:
            return Decision(active.id, f"holding {active.id}: {live}, {slo_text}, and no variant is cheaper beyond "
                                       f"noise", "hold", False)
        return Decision(active.id, f"holding {active.id}: {live}, {slo_text}", "hold", False)

    def _best_fitting(self, candidates: list[Candidate], expected: dict[str, float], slo: float,
                      busy: dict[str, float]) -> Candidate | None:
        """The cheapest of the most accurate (within noise) of these expected to meet the SLO and keep up
        (candidates are most accurate first)."""
        fitting = [c for c in candidates if c.id in expected and expected[c.id] <= slo
                   and busy.get(c.id, 0.0) <= self.settings.max_busy]
        if not fitting:
            return None
        return self._cheapest([c for c in fitting if self._as_good(c, fitting[0])])

    def _expected_p95(self, obs: Observation, active: Candidate | None, candidates: list[Candidate]
                      ) -> dict[str, float]:
        """Each variant's p95 now: its cost times the active one's live p95 over its cost; the bench p95 at rest."""
        slowdown = self._slowdown(obs, active) if active is not None else None
        if slowdown is None:
            return {c.id: c.bench_p95_ms for c in candidates if c.bench_p95_ms is not None}
        ratio = max(slowdown, 0.5)
        return {c.id: c.cost_ms * ratio for c in candidates if c.cost_ms is not None}

    @staticmethod
    def _expected_busy(obs: Observation, active: Candidate | None, candidates: list[Candidate]) -> dict[str, float]:
        """How busy each variant would keep the device at the current request rate: the active one's share
        scaled by cost (a median tracks the mean service time better than a tail does)."""
        if obs.busy is None or active is None or not active.cost_ms:
            return {}
        return {c.id: obs.busy * c.cost_ms / active.cost_ms for c in candidates if c.cost_ms is not None}

    def _slowdown(self, obs: Observation, active: Candidate) -> float | None:
        """How much slower than its bench median the active variant runs now: its live p95 over its cost, or
        its last answers' median over it when that is higher (the window has not caught up with a change)."""
        live = obs.live.p95 if obs.live.p95 is not None and obs.live.count >= self.settings.min_samples else None
        latest = max((ms for ms in (live, self._recent_median(obs)) if ms is not None), default=None)
        if latest is None or not active.cost_ms:
            return None
        return latest / active.cost_ms

    def _share_in_time(self, obs: Observation, limit_ms: float) -> float | None:
        """The active variant's share of answers within limit_ms in the window; None on too few answers."""
        if len(obs.latencies) < self.settings.min_samples:
            return None
        return sum(ms <= limit_ms for ms in obs.latencies) / len(obs.latencies)

    def _could_pay(self, c: Candidate, active: Candidate, obs: Observation, slo: float, in_time: float | None
                   ) -> bool:
        """Whether stepping down to c is expected to answer more requests right and in time (accuracies in [0, 1]):
        c would have met the SLO wherever the active variant, `in_time` of the time now, met it plus the cost c
        saves."""
        if in_time is None or not (0.0 <= c.quality <= 1.0 and 0.0 <= active.quality <= 1.0):
            return True
        if c.cost_ms is None or not active.cost_ms:
            return True
        slowdown = max(percentile(sorted(obs.latencies), 50) / active.cost_ms, 1.0)
        saved_ms = (active.cost_ms - c.cost_ms) * slowdown
        return (c.quality + c.quality_error) * self._share_in_time(obs, slo + saved_ms) > active.quality * in_time

    def _recent_median(self, obs: Observation) -> float | None:
        recent = obs.recent
        if recent is None or recent.p50 is None or recent.count < self.settings.trip_samples:
            return None
        return recent.p50

    def _still_distrusted(self, target: Candidate, slowdown: float | None, now: float) -> bool:
        """Whether a step up to target failed recently at this pressure or a lower one: it may go again
        after 8 cooldowns, or once the active variant runs faster beyond noise than when it failed."""
        if target.id not in self._distrusted:
            return False
        failed_at_slowdown, when = self._distrusted[target.id]
        expired = now - when >= self.settings.cooldown_s * 2 ** MAX_BACKOFF_DOUBLINGS
        eased = slowdown is not None and slowdown < (1 - self.settings.noise_margin) * failed_at_slowdown
        if expired or eased:
            del self._distrusted[target.id]
            return False
        return True

    def _cheapest(self, candidates: list[Candidate]) -> Candidate | None:
        """The most accurate of the variants nothing else is really cheaper than."""
        return next((c for c in candidates if not any(self._cheaper(other, c) for other in candidates)), None)

    def _step_up_wait(self) -> float:
        """The cooldown, doubled for each step up in a row that pressure undid at once: expected latencies
        scale a cheap variant's slowdown to a costlier one, which contention often hurts more (longer
        requests are preempted more), so a step up the estimate allows may not hold."""
        return self.settings.cooldown_s * 2 ** min(self._failed_step_ups, MAX_BACKOFF_DOUBLINGS)

    def _as_good(self, a: Candidate, b: Candidate) -> bool:
        """Whether a is at least as accurate as b within the sampling error of both measurements."""
        margin = self.settings.quality_z * math.hypot(a.quality_error, b.quality_error)
        return a.quality >= b.quality - margin

    def _cheaper(self, a: Candidate, b: Candidate) -> bool:
        """Whether a costs less than b beyond noise: its median is lower by more than the margin."""
        if a.cost_ms is None:
            return False
        return b.cost_ms is None or a.cost_ms < (1 - self.settings.noise_margin) * b.cost_ms

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
    return c.cost_ms if c.cost_ms is not None else float("inf")


def _quality_text(c: Candidate) -> str:
    if c.quality_error:
        return f"{c.quality:.3f} ± {c.quality_error:.3f}"
    return f"{c.quality:.3f}"


def _temp(obs: Observation) -> str:
    return f" {obs.temperature_c:.1f} °C" if obs.temperature_c is not None else ""
