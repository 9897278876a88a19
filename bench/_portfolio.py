"""Portfolios and agents for the agent benchmarks: built once under build/bench-portfolios/, then reused.

A directory is reused when `Portfolio.open` accepts it (every file present, checksums matching);
otherwise it is rebuilt with the exporter. The exporter (torch) is imported only to build.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from agent.portfolio import Portfolio, PortfolioError

ROOT = Path(__file__).resolve().parents[1]
BENCH_PORTFOLIOS = ROOT / "build" / "bench-portfolios"
MAKE_DEMO_PORTFOLIO = ROOT / "build" / "portfolio"  # what `make demo` builds with the same defaults

# A one-variant portfolio of an ~11M-parameter CIFAR-style ResNet-18 (bench/models.py), ONNX only.
RESNET18_ARGS = ["--model", "bench.models:resnet18", "--width", "1", "--method", "dnnshifter", "--imp-levels", "0",
                 "--epochs", "1", "--quantize", "none", "--no-tflite"]


def default_portfolio() -> Path:
    """The exporter's default portfolio (VGG-16 on digits, Reconvene + int8): `make demo`'s if it verifies, else ours."""
    if _verifies(MAKE_DEMO_PORTFOLIO):
        return MAKE_DEMO_PORTFOLIO
    return ensure_portfolio("default", [], "the exporter's defaults, ~2 min on 2 cores")


def resnet18_portfolio() -> Path:
    return ensure_portfolio("resnet18", RESNET18_ARGS, "ResNet-18, 1 epoch, ~2 min on 2 cores")


def ensure_portfolio(name: str, exporter_args: list[str], what: str) -> Path:
    """build/bench-portfolios/<name>, built with `edgeshift-export portfolio <exporter_args>` unless it verifies."""
    out = BENCH_PORTFOLIOS / name
    if _verifies(out):
        return out
    from exporter.cli import main  # torch: only when building

    print(f"building {out.relative_to(ROOT)} ({what})", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = ["portfolio", "--out", str(out), "--quiet", *exporter_args] + (["--force"] if out.exists() else [])
    with contextlib.redirect_stdout(sys.stderr):  # keep the benchmark's own output to its table
        code = main(argv)
    if code != 0:
        raise SystemExit(f"building {out} failed (exit {code})")
    Portfolio.open(out)
    return out


def start_agent(path: Path, preload: str, threads: int, bench_runs: int = 3):
    """A started Agent serving `path` with onnxruntime on the x86 profile; latency SLO loose so it never steers."""
    from agent.policy import PolicySettings
    from agent.profiles import load_profile
    from agent.service import Agent

    agent = Agent(Portfolio.open(path), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=threads, preload=preload, bench_runs=bench_runs)
    agent.start()
    return agent


def _verifies(path: Path) -> bool:
    if not (path / "manifest.json").is_file():
        return False
    try:
        Portfolio.open(path)
    except PortfolioError as error:
        print(f"{path} does not verify ({error}); not using it", file=sys.stderr)
        return False
    return True
