"""Resident memory (RSS) of the agent: with no model, with the default portfolio resident, and its drift over swaps.

Each scenario runs in a fresh Python process (this script with --scenario), so that none inherits
another's allocations; RSS is psutil's for that process, read after gc.collect().
- imports: bare Python (+ psutil), after importing numpy, after importing the agent (constructing nothing),
  after importing onnxruntime, which the agent imports when it opens its first session;
- resident: an Agent started with preload "all": every variant of the default portfolio loaded;
- drift: an Agent swapping through the variants, one batch-1 request after each swap; RSS after
  the warm-up swaps and then after the measured ones. With preload "all" the sessions stay loaded;
  with "lazy" every swap loads the new variant and unloads the old one. Target: drift < 10 MiB.

    python bench/agent_memory.py                        # 100 warm-up + 1000 measured swaps: ~10 s on 2 cores
    python bench/agent_memory.py --warmup-swaps 10 --swaps 100     # a quick look
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20


def rss_mib() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / MIB


# ---------------------------------------------------------------- scenarios (each in its own process)

def scenario_imports(args) -> dict:
    rss = {"python + psutil": rss_mib()}
    import numpy  # noqa: F401  (the agent's one heavy import)

    rss["+ numpy imported"] = rss_mib()
    import agent.service  # noqa: F401  (everything the agent needs before it loads a model)

    rss["+ agent imported, nothing constructed"] = rss_mib()
    import onnxruntime  # noqa: F401

    rss["+ onnxruntime imported"] = rss_mib()
    return {"rss": rss}


def scenario_resident(args) -> dict:
    from bench._portfolio import start_agent

    agent = start_agent(args.portfolio, "all", args.threads)
    resident = agent.status()["resident"]
    onnx_mib = sum(agent.manifest.variant(v).files["onnx"].bytes for v in resident) / MIB
    return {"rss": {f"default portfolio resident ({len(resident)} variants, {onnx_mib:.1f} MiB of ONNX)": rss_mib()}}


def scenario_drift(args) -> dict:
    from bench._portfolio import start_agent

    agent = start_agent(args.portfolio, args.preload, args.threads)
    variants = agent.status()["variants"]
    x = agent.portfolio.samples().inputs[0][:1]

    def swap(n: int) -> None:
        for _ in range(n):
            agent.switch(variants[(variants.index(agent.active) + 1) % len(variants)], "bench")
            agent.infer(x)

    swap(args.warmup_swaps)
    checkpoints = [rss_mib()]
    step = max(1, args.swaps // 4)
    for done in range(0, args.swaps, step):
        swap(min(step, args.swaps - done))
        checkpoints.append(rss_mib())
    agent.close()
    return {"checkpoints": checkpoints, "torch_imported": "torch" in sys.modules}


SCENARIOS = {"imports": scenario_imports, "resident": scenario_resident, "drift": scenario_drift}


# ---------------------------------------------------------------- the parent: one process per scenario

def in_fresh_process(scenario: str, args, *extra: str) -> dict:
    command = [sys.executable, __file__, "--scenario", scenario, "--portfolio", str(args.portfolio),
               "--threads", str(args.threads), "--swaps", str(args.swaps), "--warmup-swaps", str(args.warmup_swaps),
               *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"scenario {scenario} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = _arguments()
    if args.scenario:
        print(json.dumps(SCENARIOS[args.scenario](args)))
        return
    from bench._portfolio import default_portfolio

    args.portfolio = args.portfolio or default_portfolio()
    rss = {**in_fresh_process("imports", args)["rss"], **in_fresh_process("resident", args)["rss"]}
    drift = {preload: in_fresh_process("drift", args, "--preload", preload) for preload in ("all", "lazy")}

    print(f"portfolio {args.portfolio}; onnxruntime {args.threads} thread(s) per session; each row a fresh process")
    print(f"{'RSS':<62} {'MiB':>8}")
    for what, mib in rss.items():
        print(f"{what:<62} {mib:>8.1f}")
    print(f"\nRSS over swaps (one batch-1 request after each), MiB: after {args.warmup_swaps} warm-up swaps, "
          f"then every {max(1, args.swaps // 4)}")
    print(f"{'preload':<8} {'checkpoints':<48} {'drift over ' + str(args.swaps):>16}")
    for preload, result in drift.items():
        points = result["checkpoints"]
        print(f"{preload:<8} {' '.join(f'{p:.1f}' for p in points):<48} {points[-1] - points[0]:>+12.1f} MiB")
    worst = max(abs(r["checkpoints"][-1] - r["checkpoints"][0]) for r in drift.values())
    print(f"largest drift over {args.swaps} swaps: {worst:.1f} MiB (target < 10 MiB); "
          f"torch imported by the agent: {any(r['torch_imported'] for r in drift.values())}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portfolio", type=Path, help="portfolio directory (default: the exporter's default portfolio)")
    parser.add_argument("--swaps", type=int, default=1000, help="measured swaps per preload mode")
    parser.add_argument("--warmup-swaps", type=int, default=100, help="swaps before the first RSS reading")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    parser.add_argument("--preload", default="all", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
