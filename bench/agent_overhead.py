"""Python-API overhead of Agent.infer over a bare onnxruntime session.run, on a ResNet-18-size variant.

The agent and a bare onnxruntime InferenceSession (the agent's session options: same intra-op
threads, one inter-op thread, sequential, all graph optimizations, no spinning) run the same ONNX
file on the same batch-1 input in interleaved rounds: each round times one call of each, the order
alternating from round to round, so machine noise hits both alike. The variant is the dense model
of a one-variant portfolio of a CIFAR-style ResNet-18 (bench/models.py, ~11M params, 1 epoch on digits).

    python bench/agent_overhead.py              # 300 rounds: ~10 s on 2 cores (+ ~2 min once to build the portfolio)
    python bench/agent_overhead.py --rounds 30  # a quick look
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._portfolio import resnet18_portfolio, start_agent  # noqa: E402


def bare_session(path: Path, threads: int):
    """An onnxruntime session configured exactly as the agent's (agent/backends/onnx.py)."""
    import onnxruntime as ort

    from agent.backends.onnx import OnnxRuntimeBackend

    options = OnnxRuntimeBackend().session_options(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_ms(runners: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each round times every runner once; the order alternates from round to round."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    args = _arguments()
    path = args.portfolio or resnet18_portfolio()
    agent = start_agent(path, "all", args.threads)
    try:
        variant = agent.manifest.variant(agent.active)
        x = agent.portfolio.samples().inputs[0][:1]
        session = bare_session(agent.portfolio.file_path(variant.id, "onnx"), agent.threads)
        input_name = session.get_inputs()[0].name
        np.testing.assert_allclose(agent.infer(x).outputs[0], session.run(None, {input_name: x})[0], atol=1e-5)
        times = interleaved_ms({"Agent.infer": lambda: agent.infer(x),
                                "session.run": lambda: session.run(None, {input_name: x})},
                               args.rounds, args.warmup)
    finally:
        agent.close()

    print(f"{agent.name}: variant {variant.id}, {variant.params:,} params, {variant.macs / 1e6:,.0f} MMACs; "
          f"onnxruntime {agent.threads} thread(s), batch 1, {args.rounds} interleaved rounds")
    print(f"{'':<12} {'p50 ms':>8} {'mean ms':>8} {'p95 ms':>8}")
    for name, ms in times.items():
        print(f"{name:<12} {np.percentile(ms, 50):>8.3f} {np.mean(ms):>8.3f} {np.percentile(ms, 95):>8.3f}")
    ours, bare = np.array(times["Agent.infer"]), np.array(times["session.run"])
    for stat, f in (("p50", np.median), ("mean", np.mean)):
        print(f"Agent.infer overhead over session.run, {stat}: {(f(ours) / f(bare) - 1) * 100:+.2f}% "
              f"({(f(ours) - f(bare)) * 1000:+.0f} us per request; target < 3%)")
    print(f"same round, paired: median of (agent - bare) {np.median(ours - bare) * 1000:+.0f} us")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portfolio", type=Path, help="portfolio directory (default: the ResNet-18 one, built once)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls of each before the rounds")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (both sides)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
