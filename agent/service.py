"""The Agent: a verified portfolio served through one backend, steered by the policy, observable."""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from agent.backends import Backend, BackendError, get_backend
from agent.bench import bench_variants, load_bench, save_bench, store_path
from agent.generate import DEFAULT_MAX_NEW_TOKENS, Generation, generate
from agent.monitor import ResourceMonitor, Snapshot, thermal_state
from agent.policy import Candidate, Decision, Observation, Policy, PolicySettings
from agent.placement import place_variants
from agent.portfolio import Portfolio, PortfolioError
from agent.profiles import DeviceProfile, serving_threads
from agent.runtime import InferenceError, InferResult, Runtime, memory_estimate_mb
from agent.sampling import Sampler
from agent.stats import LatencySummary, summarize
from agent.tokenizer import TextCodec, optional_codec, prompt_ids

log = logging.getLogger("edgeshift.agent")

MIN_ROUND_GAP_S = 0.1  # late answers call rounds at most this often: a burst of them is one piece of evidence


@dataclass(frozen=True)
class Event:
    type: str                   # switch, policy, error, health, ...
    reason: str
    details: dict = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"ts": self.ts, "type": self.type, "reason": self.reason, **self.details}


@dataclass(frozen=True)
class _Serving:
    """Everything tied to one portfolio, prepared before it replaces the current one."""
    portfolio: Portfolio
    runtime: Runtime
    policy: Policy
    bench: dict[str, LatencySummary]
    unhealthy: dict[str, str]
    canary: list[np.ndarray]        # one health-check input at batch 1: for warm-up, watchdog and bench
    codec: TextCodec | None         # text in and out of a causal LM; None: token ids only


class Agent:
    """Load, verify and serve a portfolio; pick the best variant that fits right now.

    `infer` is thread-safe and never fails because of a swap; `step` runs one policy round
    (the daemon calls it every interval; tests call it directly with scripted monitors).
    """

    def __init__(self, portfolio: Portfolio, profile: DeviceProfile, policy: PolicySettings, *,
                 backend: str | Backend | None = None, threads: int | None = None, preload: str = "all",
                 state_dir: Path | None = None, monitor: ResourceMonitor | None = None, max_batch: int = 64,
                 bench_runs: int = 30, providers: list[str] | None = None):
        self.portfolio = portfolio
        self.manifest = portfolio.manifest
        self.name = self.manifest.name
        self.profile = profile
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend or profile.backend)
        self.backend.use_providers(providers or profile.providers, state_dir)
        self.threads = serving_threads(threads, profile)
        self.preload = preload
        self.state_dir = state_dir
        self.monitor = monitor or ResourceMonitor(profile)
        self.max_batch = max_batch
        self.bench_runs = bench_runs
        self.policy_settings = policy
        self.events: deque[Event] = deque(maxlen=512)
        self.listeners: list[Callable[[Event], None]] = []
        self.ready = False
        self.unhealthy: dict[str, str] = {}
        self.bench: dict[str, LatencySummary] = {}
        self.canary: list[np.ndarray] = []
        self.codec: TextCodec | None = None
        self.last_decision: Decision | None = None
        self.last_snapshot: Snapshot | None = None
        self.runtime: Runtime | None = None
        self.policy: Policy | None = None
        self._progress_at = time.monotonic()
        self._steering = threading.RLock()  # policy rounds, switches and portfolio swaps, one at a time
        self._round_due = threading.Event()  # set by a late answer (or a stop): the next round runs now

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        """Health-check every variant, measure the healthy ones, load the first active one."""
        with self._steering:
            self._adopt(self._prepare(self.portfolio))
        self.ready = True
        provider = self.runtime.providers.get(self.active)
        on = f" on {provider}" if provider else ""
        self._emit(Event("start", f"serving {self.active} with {self.backend.name}{on} ({self.threads} threads)",
                         {"active": self.active, "variants": self.runtime.variant_ids, "unhealthy": self.unhealthy}))

    def replace_portfolio(self, portfolio: Portfolio, reason: str) -> None:
        """Serve another portfolio (a deploy or a rollback); on any failure keep serving the current one."""
        previous = self.portfolio.manifest.name
        with self._steering:
            serving = self._prepare(portfolio)  # raises before anything changes
            old = self.runtime
            self._adopt(serving)
        old.close()  # retires its variants; requests in flight on them finish first
        self._emit(Event("deploy", reason, {"from": previous, "to": portfolio.manifest.name,
                                            "digest": portfolio.digest, "active": self.active}))

    def _prepare(self, portfolio: Portfolio) -> _Serving:
        samples = portfolio.samples()
        codec = optional_codec(portfolio.tokenizer_path)  # a broken tokenizer.json refuses the portfolio here
        probe = Runtime(portfolio, self.backend, self.threads, preload="lazy", max_batch=self.max_batch)
        placement = place_variants(probe, portfolio.manifest.variants, samples)
        for rejection in placement.fallbacks():
            self._emit(Event("provider", f"{rejection.variant} does not run on {rejection.provider} "
                                         f"({rejection.problem}): on to {rejection.next_provider}",
                             {"variant": rejection.variant, "provider": rejection.provider,
                              "next_provider": rejection.next_provider}))
        unhealthy = placement.unhealthy
        for vid, problem in unhealthy.items():
            self._emit(Event("health", f"{vid} will not serve: {problem}", {"variant": vid}))
        healthy = list(placement.providers)  # in the manifest's order
        if not healthy:
            raise PortfolioError(f"{portfolio.root}: no variant passed its health check "
                                 f"({'; '.join(f'{k}: {v}' for k, v in unhealthy.items())})")

        canary = [x[:1] for x in samples.inputs]
        bench = self._measure(portfolio, placement.providers, canary)
        candidates = [Candidate(vid, _quality(portfolio.manifest.variant(vid).metrics), bench[vid].p95,
                                memory_estimate_mb(portfolio.manifest.variant(vid), self.backend.file_format),
                                bench_p50_ms=bench[vid].p50, provider=placement.providers[vid],
                                quality_error=_quality_error(portfolio.manifest.variant(vid).metrics))
                      for vid in healthy]
        settings = self.policy.settings if self.policy is not None else self.policy_settings
        if settings.pin is not None and settings.pin not in healthy:
            self._emit(Event("policy", f"unpinned: {settings.pin} is not a healthy variant of {portfolio.manifest.name}",
                             {"pin": None}))
            settings = replace(settings, pin=None)
        policy = Policy(candidates, settings)
        order = [c.id for c in policy.candidates]  # most accurate first: neighbours are quality neighbours
        runtime = Runtime(portfolio, self.backend, self.threads, self.preload, self.max_batch, order,
                          providers=placement.providers)
        runtime.start(self._initial_variant(portfolio, policy, order))
        runtime.infer(canary)  # warm the first request's path
        return _Serving(portfolio, runtime, policy, bench, unhealthy, canary, codec)

    def _adopt(self, serving: _Serving) -> None:
        self.portfolio, self.manifest, self.name = serving.portfolio, serving.portfolio.manifest, serving.portfolio.manifest.name
        self.policy, self.bench, self.unhealthy = serving.policy, serving.bench, serving.unhealthy
        self.canary, self.codec = serving.canary, serving.codec
        self.runtime = serving.runtime  # the one reference requests read: the swap
        self._save_state()

    def _measure(self, portfolio: Portfolio, providers: dict[str, str | None], sample: list[np.ndarray]
                 ) -> dict[str, LatencySummary]:
        """Each placed variant's latency on its provider: as `edgeshift-agent bench` stored it for this
        setup, else measured now (and stored)."""
        variant_ids = list(providers)
        probe = Runtime(portfolio, self.backend, self.threads, preload="lazy", providers=providers)
        path = store_path(self.state_dir, probe) if self.state_dir else None
        stored = load_bench(path, providers) if path else None
        if stored and all(vid in stored for vid in variant_ids):
            log.info("latencies from %s", path)
            return {vid: stored[vid] for vid in variant_ids}
        results = bench_variants(probe, variant_ids, sample, runs=self.bench_runs)
        if path:
            save_bench(path, results, probe)
        return results

    def _initial_variant(self, portfolio: Portfolio, policy: Policy, order: list[str]) -> str:
        """The pin, else the last active variant (across restarts) if still healthy, else the policy's pick."""
        remembered = self._load_state(portfolio).get("active")
        if policy.settings.pin in order:
            return policy.settings.pin
        if remembered in order:
            return remembered
        default = portfolio.manifest.default_variant
        return policy.decide(Observation(time.monotonic(), default if default in order else order[0],
                                         LatencySummary(0, None, None, None))).variant

    # ------------------------------------------------------------------ serving

    def infer(self, batch: np.ndarray | list[np.ndarray], arrived: float | None = None) -> InferResult:
        """Answer one request. `arrived` (time.monotonic()) is when it reached the caller: the policy then
        judges the SLO on the time the request took as its client sees it, waits included."""
        result = self._runtime().infer(batch, arrived)
        self._progress_at = time.monotonic()
        if self.policy is not None and result.answered_ms > self.policy.settings.latency_slo_ms:
            self._round_due.set()
        return result

    def generate(self, prompt: str | list[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 on_step: Callable[[int, int], None] | None = None, *, sampler: Sampler | None = None,
                 stop: Sequence[str] = ()) -> Generation:
        """Generation on a causal-lm portfolio, answered by one variant from start to end.

        Greedy unless a `sampler` is given. A text prompt and `stop` strings need the portfolio's tokenizer;
        the answer then carries the new text too.
        """
        runtime = self._runtime()  # read once: a deploy meanwhile does not change this generation's portfolio
        portfolio, codec = runtime.portfolio, self.codec
        language_model = portfolio.manifest.language_model
        if language_model is None:
            raise InferenceError(f"generate needs a causal-lm portfolio; '{self.name}' is a "
                                 f"{portfolio.manifest.task} model: use infer")
        ids = prompt_ids(prompt, portfolio.tokenizer_path, codec)

        def step_done(step: int, token: int) -> None:
            self._progress_at = time.monotonic()
            if on_step is not None:
                on_step(step, token)

        return generate(runtime, ids, max_new_tokens, language_model.eos_token_id, language_model.context_length,
                        on_step=step_done, sampler=sampler, stop=stop, decode=None if codec is None else codec.decode)

    @property
    def active(self) -> str:
        return self._runtime().active

    def made_progress_within(self, seconds: float) -> bool:
        return time.monotonic() - self._progress_at <= seconds

    # ------------------------------------------------------------------ steering

    def request_round(self) -> None:
        """Wake the steering loop now (wait_for_round returns)."""
        self._round_due.set()

    def wait_for_round(self, interval_s: float, stop: threading.Event) -> bool:
        """Sleep until the next policy round is due: interval_s, or sooner once an answer came back later than
        the SLO, so a step down follows the pressure within a few requests. False once stop is set."""
        if stop.wait(MIN_ROUND_GAP_S):
            return False
        self._round_due.wait(max(interval_s - MIN_ROUND_GAP_S, 0.0))
        self._round_due.clear()
        return not stop.is_set()

    def step(self) -> Decision:
        """One policy round: read resources, decide, swap if needed, record why."""
        with self._steering:
            return self._step()

    def _step(self) -> Decision:
        runtime, policy = self._runtime(), self.policy
        snapshot = self.monitor.snapshot()
        self.last_snapshot = snapshot
        window = runtime.windows[runtime.active]
        latencies = window.latencies(since=runtime.activated_at)
        obs = Observation(time.monotonic(), runtime.active, summarize(latencies),
                          thermal_state(snapshot.temperature_c, self.profile.thermal), snapshot.temperature_c,
                          snapshot.mem_available_mb, busy=window.busy_share(since=runtime.activated_at),
                          recent=window.last(policy.settings.trip_samples, since=runtime.activated_at),
                          latencies=latencies)
        decision = policy.decide(obs)
        if decision.changed:
            self._switch(decision.variant, decision.reason, kind=decision.kind)
        self.last_decision = decision
        return decision

    def switch(self, variant_id: str, reason: str, kind: str = "manual") -> None:
        with self._steering:
            self._switch(variant_id, reason, kind)

    def _switch(self, variant_id: str, reason: str, kind: str) -> None:
        runtime = self._runtime()
        try:
            record = runtime.switch(variant_id, reason)
        except (BackendError, KeyError, OSError) as error:
            self._emit(Event("error", f"switch to {variant_id} failed: {error}; still serving {runtime.active}",
                             {"variant": variant_id}))
            raise
        self.policy.note_switch(time.monotonic())
        self._save_state()
        self._emit(Event("switch", reason, {"from": record.previous, "to": record.active, "kind": kind,
                                            "switch_ms": round(record.seconds * 1000, 3)}))

    def pin(self, variant_id: str | None, reason: str = "operator") -> None:
        self.policy.pin(variant_id)
        self._emit(Event("policy", f"{'pinned to ' + variant_id if variant_id else 'unpinned'} ({reason})",
                         {"pin": variant_id}))
        if variant_id is not None and variant_id != self.active:
            self.switch(variant_id, f"pinned by {reason}", kind="pin")

    def emit(self, event_type: str, reason: str, **details) -> None:
        """Record an event (listeners such as the fleet link publish it)."""
        self._emit(Event(event_type, reason, details))

    def status(self) -> dict:
        decision = self.last_decision
        return {"name": self.name, "ready": self.ready, "active": self.active if self.runtime else None,
                "reason": decision.reason if decision else None, "backend": self.backend.name,
                "providers": dict(self.runtime.providers) if self.runtime else {}, "threads": self.threads, "preload": self.preload, "resident": self.runtime.resident() if self.runtime else [],
                "variants": [c.id for c in self.policy.candidates] if self.policy else [],
                "unhealthy": self.unhealthy, "pin": self.policy.settings.pin if self.policy else None}

    def close(self) -> None:
        self.ready = False
        if self.runtime is not None:
            self.runtime.close()

    # ------------------------------------------------------------------ internals

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError("the agent has not been started")
        return self.runtime

    def _emit(self, event: Event) -> None:
        self.events.append(event)
        log.info("%s: %s", event.type, event.reason)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must never stop serving
                log.exception("event listener failed")

    def _state_file(self) -> Path | None:
        return self.state_dir / "agent-state.json" if self.state_dir else None

    def _load_state(self, portfolio: Portfolio) -> dict:
        path = self._state_file()
        try:
            state = json.loads(path.read_text()) if path else {}
        except (OSError, ValueError):
            return {}
        return state if state.get("portfolio") == portfolio.digest else {}

    def _save_state(self) -> None:
        path = self._state_file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"portfolio": self.portfolio.digest, "active": self.active}))
        os.replace(partial, path)


def _quality_error(metrics: dict) -> float:
    """The standard error of an accuracy measured on n test samples (0 when unknown: compared exactly).
    Laplace-smoothed, so a perfect score on a small set still carries its uncertainty."""
    accuracy, n = metrics.get("accuracy"), metrics.get("n")
    if not isinstance(accuracy, (int, float)) or not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return 0.0
    p = (accuracy * n + 1) / (n + 2)
    return math.sqrt(p * (1 - p) / n)


def _quality(metrics: dict) -> float:
    if "accuracy" in metrics:
        return float(metrics["accuracy"])
    if "perplexity" in metrics:
        return -float(metrics["perplexity"])
    return 0.0
