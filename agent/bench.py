"""On-device latency of every variant, measured side by side, and its store in the state directory."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.backends import Session
from agent.backends.providers import short_name
from agent.kv_cache import CachedLmSession, decode_step
from agent.stats import LatencySummary, percentile

if TYPE_CHECKING:
    from agent.runtime import Runtime


def bench_sessions(sessions: dict[str, Session], sample: list[np.ndarray], runs: int = 50, warmup: int = 5
                   ) -> dict[str, LatencySummary]:
    """Latency per variant at the sample's batch; one run of each per round, so noise hits all alike.
    A causal LM with a key-value cache is timed on a decode step after the sample, what its generations
    are made of."""
    calls = {vid: (decode_step(session, sample[0]) if isinstance(session, CachedLmSession)
                   else (lambda session=session: session.run(sample))) for vid, session in sessions.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {vid: [] for vid in sessions}
    order = list(sessions)
    for round_index in range(runs):
        shift = round_index % len(order)
        for vid in order[shift:] + order[:shift]:
            started = time.perf_counter()
            calls[vid]()
            times[vid].append((time.perf_counter() - started) * 1000)
    summaries = {}
    for vid, values in times.items():
        values.sort()
        summaries[vid] = LatencySummary(len(values), percentile(values, 50), percentile(values, 95), percentile(values, 99))
    return summaries


def bench_variants(runtime: Runtime, variant_ids: list[str], sample: list[np.ndarray], runs: int = 50,
                   warmup: int = 5) -> dict[str, LatencySummary]:
    """Open each variant in a session of its own (not the serving ones), measure them side by side, close them."""
    sessions: dict[str, Session] = {}
    try:
        for vid in variant_ids:
            sessions[vid] = runtime.open_session(vid)
        return bench_sessions(sessions, sample, runs=runs, warmup=warmup)
    finally:
        for session in sessions.values():
            session.close()


def store_path(state_dir: Path, runtime: Runtime) -> Path:
    """Where the latencies measured with this runtime's setup live: the portfolio, the backend, the
    providers serving its variants and the thread count. `edgeshift-agent bench` stores there and the
    agent looks there, each with the runtime it measures with, so both find the same file."""
    used = set(runtime.providers.values())
    providers = "+".join(short_name(p).lower() for p in runtime.backend.providers if p is not None and p in used)
    key = [runtime.portfolio.digest[:16], runtime.backend.name, *([providers] if providers else []),
           f"t{runtime.threads or 0}"]
    return state_dir / "bench" / ("-".join(key) + ".json")


def load_bench(path: Path, providers: dict[str, str | None]) -> dict[str, LatencySummary] | None:
    """The stored latencies of the variants that were measured on the provider serving them now."""
    try:
        data = json.loads(path.read_text())
        measured_on = data.get("providers", {})
        return {vid: LatencySummary(**values) for vid, values in data["variants"].items()
                if vid in providers and measured_on.get(vid) == providers[vid]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or unreadable: measure again


def save_bench(path: Path, results: dict[str, LatencySummary], runtime: Runtime) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"measured": time.time(), "backend": runtime.backend.name, "threads": runtime.threads,
               "providers": {vid: runtime.providers.get(vid) for vid in results},
               "variants": {vid: s.to_dict() for vid, s in results.items()}}
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=2))
    os.replace(partial, path)


def latency_table(results: dict[str, LatencySummary], providers: dict[str, str | None]) -> str:
    lines = [f"{'variant':<28} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'runs':>6}  provider"]
    for vid, s in results.items():
        lines.append(f"{vid:<28} {s.p50:>8.3f} {s.p95:>8.3f} {s.p99:>8.3f} {s.count:>6}  {providers.get(vid) or '-'}")
    return "\n".join(lines)
