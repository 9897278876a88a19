"""Switch latency of the agent under load, against the naive way: restarting a process with the new model.

Client threads call Agent.infer (batch 1) in a loop while the main thread switches the agent
through the default portfolio's variants, with every variant resident (preload "all") and with
each new variant loaded on the switch (preload "lazy"). Per switch it measures the time of
agent.switch() (the atomic swap, loading included when lazy) and the time from the switch request
to the first answer from the new variant (to a request sent after the switch was requested). Every
request is counted: sent, answered, failed (any exception), dropped (sent but never answered).
A row with no clients shows what the load adds.

Baseline: stop serving, start a fresh Python process that imports onnxruntime, loads the new
variant's ONNX file (same session options) and answers one request. Each restart is timed from the
request until that answer; stopping the old process is not counted (in the baseline's favour). The
requests that would have arrived meanwhile, at the clients' measured rate, are dropped. The child
reports when its imports, session load and first run ended, which splits the restart into parts.

    python bench/agent_switch.py        # 500 resident + 200 lazy switches, 30 restarts: ~15 s on 2 cores
                                        # (+ ~2 min once to build the default portfolio)
    python bench/agent_switch.py --switches 50 --lazy-switches 20 --restarts 5     # a quick look
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.portfolio import Portfolio  # noqa: E402
from bench._portfolio import ROOT, default_portfolio, start_agent  # noqa: E402

# The naive switch: a new process that loads the model with the agent's session options and answers once.
RESTART_SCRIPT = """
import time
started = time.perf_counter()
import sys
import numpy as np
import onnxruntime as ort
imported = time.perf_counter()
path, threads, shape = sys.argv[1], int(sys.argv[2]), [int(d) for d in sys.argv[3].split(",")]
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.log_severity_level = 3
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
options.add_session_config_entry("session.inter_op.allow_spinning", "0")
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
loaded = time.perf_counter()
session.run(None, {session.get_inputs()[0].name: np.zeros([1, *shape], np.float32)})
print("answered", started, imported, loaded, time.perf_counter(), flush=True)
"""
FIRST_ANSWER_TIMEOUT_S = 10.0


class ClientLoad:
    """Threads calling agent.infer continuously; counts every request; notes the first answer from an awaited variant."""

    def __init__(self, agent, x: np.ndarray, clients: int):
        self.agent, self.x = agent, x
        self.stop = threading.Event()
        self.counts = [{"sent": 0, "answered": 0, "failed": 0} for _ in range(clients)]
        self.errors: list[str] = []
        self._awaited: str | None = None
        self._since = 0.0
        self._first_at = 0.0
        self._first = threading.Event()
        self._await_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in self.counts]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> dict[str, int]:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        total = {key: sum(c[key] for c in self.counts) for key in ("sent", "answered", "failed")}
        total["dropped"] = total["sent"] - total["answered"] - total["failed"]
        return total

    def answered(self) -> int:
        return sum(c["answered"] for c in self.counts)

    def await_variant(self, variant_id: str) -> float:
        """Start waiting for `variant_id`'s first answer; returns the moment from which requests count."""
        with self._await_lock:
            self._first.clear()
            self._awaited = variant_id
            self._since = time.perf_counter()
            return self._since

    def first_answer_at(self) -> float | None:
        return self._first_at if self._first.wait(FIRST_ANSWER_TIMEOUT_S) else None

    def _client(self, counts: dict[str, int]) -> None:
        while not self.stop.is_set():
            sent_at = time.perf_counter()
            counts["sent"] += 1
            try:
                result = self.agent.infer(self.x)
            except Exception as error:  # any failure is what this benchmark counts
                counts["failed"] += 1
                self.errors.append(repr(error))
                continue
            counts["answered"] += 1
            if result.variant == self._awaited:  # cheap test first; the lock makes it exact
                self._note_first(result.variant, sent_at)

    def _note_first(self, variant_id: str, sent_at: float) -> None:
        answered_at = time.perf_counter()
        with self._await_lock:
            if variant_id == self._awaited and sent_at >= self._since and not self._first.is_set():
                self._first_at = answered_at
                self._first.set()


def measure_switches(agent, switches: int, load: ClientLoad | None) -> dict:
    """Switch `switches` times through the variants in a cycle; switch and first-answer times in ms."""
    variants = agent.status()["variants"]
    switch_ms, first_ms, unanswered = [], [], 0
    for _ in range(switches):
        target = variants[(variants.index(agent.active) + 1) % len(variants)]
        started = load.await_variant(target) if load else time.perf_counter()
        agent.switch(target, "bench")
        switch_ms.append((time.perf_counter() - started) * 1000)
        if load:
            first = load.first_answer_at()
            if first is None:
                unanswered += 1
            else:
                first_ms.append((first - started) * 1000)
    return {"switch_ms": switch_ms, "first_ms": first_ms, "unanswered": unanswered}


def time_session_loads(runtime) -> list[float]:
    """Times every session the runtime opens from now on (where a lazy switch spends its time)."""
    loads: list[float] = []
    open_session = runtime.open_session

    def timed(variant_id: str):
        started = time.perf_counter()
        session = open_session(variant_id)
        loads.append((time.perf_counter() - started) * 1000)
        return session

    runtime.open_session = timed
    return loads


def run_mode(path: Path, preload: str, switches: int, clients: int, threads: int, warmup_s: float) -> dict:
    agent = start_agent(path, preload, threads)
    try:
        x = agent.portfolio.samples().inputs[0][:1]
        measure_switches(agent, 10, None)  # warm the swap path
        load_ms = time_session_loads(agent.runtime)
        load = ClientLoad(agent, x, clients) if clients else None
        if load:
            load.start()
            time.sleep(warmup_s)
        answered_before, started = (load.answered() if load else 0), time.perf_counter()
        result = measure_switches(agent, switches, load)
        elapsed = time.perf_counter() - started
        result["load_ms"] = load_ms
        if load:
            result["rate"] = (load.answered() - answered_before) / elapsed
            result["requests"] = load.finish()
            result["errors"] = load.errors[:3]
    finally:
        agent.close()
    return result


def measure_restarts(portfolio: Portfolio, restarts: int, threads: int) -> tuple[list[float], dict[str, list[float]]]:
    """Milliseconds from the switch request until a freshly started process has answered with the new variant,
    and where they went (the child's perf_counter is the same monotonic clock on Linux)."""
    variants = [v.id for v in portfolio.manifest.variants]
    shape = ",".join(str(d) for d in portfolio.manifest.inputs[0].shape[1:])
    times, parts = [], {"interpreter start": [], "imports": [], "session load": [], "first run": []}
    for i in range(restarts + 1):  # the first one warms the page cache and is not counted
        model = portfolio.file_path(variants[i % len(variants)], "onnx")
        requested = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", RESTART_SCRIPT, str(model), str(threads), shape],
                                   stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = process.stdout.readline()
        answered = time.perf_counter()
        process.wait()
        word, *marks = line.split() or [""]
        if word != "answered" or process.returncode != 0:
            raise SystemExit(f"the restart baseline failed on {model} (exit {process.returncode})")
        if i:
            times.append((answered - requested) * 1000)
            points = [requested, *map(float, marks)]
            for part, begin, end in zip(parts.values(), points, points[1:]):
                part.append((end - begin) * 1000)
    return times, parts


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    args = _arguments()
    path = args.portfolio or default_portfolio()
    modes = [("resident", "all", args.switches, args.clients), ("lazy", "lazy", args.lazy_switches, args.clients),
             ("resident", "all", args.switches, 0), ("lazy", "lazy", args.lazy_switches, 0)]
    results = {(name, clients): run_mode(path, preload, n, clients, args.threads, args.warmup)
               for name, preload, n, clients in modes}
    portfolio = Portfolio.open(path)
    restart_ms, restart_parts = measure_restarts(portfolio, args.restarts, args.threads)

    loaded = results[("resident", args.clients)]
    rate = loaded["rate"]
    print(f"portfolio {portfolio.manifest.name} at {path} ({len(portfolio.manifest.variants)} variants), "
          f"onnxruntime {args.threads} thread(s) per session, batch 1; {args.clients} clients served "
          f"{rate:,.0f} requests/s while switching")
    print(f"{'mode':<9} {'clients':>7} {'switches':>8} {'switch p50':>11} {'switch p99':>11} {'1st answer p50':>15} "
          f"{'p99':>9} {'sent':>8} {'answered':>8} {'failed':>6} {'dropped':>7}")
    for (name, clients), r in results.items():
        if clients:
            q = r["requests"]
            tail = (f"{fmt_ms(pct(r['first_ms'], 50)):>15} {fmt_ms(pct(r['first_ms'], 99)):>9} {q['sent']:>8} "
                    f"{q['answered']:>8} {q['failed']:>6} {q['dropped']:>7}")
        else:
            tail = f"{'-':>15} {'-':>9} {'-':>8} {'-':>8} {'-':>6} {'-':>7}"
        print(f"{name:<9} {clients:>7} {len(r['switch_ms']):>8} {fmt_ms(pct(r['switch_ms'], 50)):>11} "
              f"{fmt_ms(pct(r['switch_ms'], 99)):>11} {tail}")
    dropped_per_restart = rate * np.mean(restart_ms) / 1000
    print(f"{'restart':<9} {'-':>7} {len(restart_ms):>8} {fmt_ms(pct(restart_ms, 50)):>11} "
          f"{fmt_ms(pct(restart_ms, 99)):>11} {fmt_ms(pct(restart_ms, 50)):>15} {fmt_ms(pct(restart_ms, 99)):>9} "
          f"{'':>8} {'':>8} {'':>6} {dropped_per_restart:>7.0f}  (est. per restart at {rate:,.0f}/s)")

    print("restart p50 by part: " + ", ".join(f"{part} {fmt_ms(pct(ms, 50))}" for part, ms in restart_parts.items()))
    lazy = results[("lazy", args.clients)]
    if lazy["load_ms"]:
        print(f"lazy, {args.clients} clients: the onnxruntime session load takes p50 {fmt_ms(pct(lazy['load_ms'], 50))} "
              f"of the switch's p50 {fmt_ms(pct(lazy['switch_ms'], 50))}")
    for (name, clients), r in results.items():
        if clients:
            print(f"baseline/edgeshift, {name}, {clients} clients: switch p50 {ratio(restart_ms, r['switch_ms'], 50)}, "
                  f"p99 {ratio(restart_ms, r['switch_ms'], 99)}; to first answer p50 "
                  f"{ratio(restart_ms, r['first_ms'], 50)}, p99 {ratio(restart_ms, r['first_ms'], 99)}")
    total = {k: sum(results[(n, args.clients)]["requests"][k] for n in ("resident", "lazy")) for k in ("failed", "dropped")}
    print(f"requests failed or dropped while switching: {total['failed'] + total['dropped']} "
          f"(restarting instead: ~{dropped_per_restart * (args.switches + args.lazy_switches):,.0f} dropped "
          f"over the same {args.switches + args.lazy_switches} switches)")
    for (name, clients), r in results.items():
        if r["unanswered"]:
            print(f"  {name}: {r['unanswered']} switches saw no answer from the new variant within {FIRST_ANSWER_TIMEOUT_S} s")
        for error in r.get("errors", []):
            print(f"  {name} error: {error}")


def fmt_ms(ms: float) -> str:
    return f"{ms * 1000:.0f} us" if ms < 1 else f"{ms:.1f} ms"


def ratio(baseline: list[float], ours: list[float], q: float) -> str:
    return f"{pct(baseline, q) / pct(ours, q):,.0f}x"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portfolio", type=Path, help="portfolio directory (default: the exporter's default portfolio)")
    parser.add_argument("--switches", type=int, default=500, help="switches with every variant resident")
    parser.add_argument("--lazy-switches", type=int, default=200, help="switches loading the new variant")
    parser.add_argument("--restarts", type=int, default=30, help="process restarts timed for the baseline")
    parser.add_argument("--clients", type=int, default=4, help="client threads calling Agent.infer")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the first timed switch")
    return parser.parse_args()


if __name__ == "__main__":
    main()
