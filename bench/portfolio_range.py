"""How far a portfolio's variants spread in cost: every variant timed side by side against dense.

    python bench/portfolio_range.py                      # the portfolio `make demo` built
    python bench/portfolio_range.py path/to/portfolio --rounds 400 --threads 1

onnxruntime on the CPU, batch 1, the variants interleaved round by round so machine noise hits
them alike. Prints each variant's p50 and its speed-up over dense, each int8 twin against its
float parent, and the cheapest variant within 2 accuracy points of dense.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.portfolio import Portfolio  # noqa: E402
from exporter.latency import interleaved_latency_ms  # noqa: E402

ACCURACY_BUDGET = 0.02   # "within 2 accuracy points of dense"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("portfolio", type=Path, nargs="?", default=Path("build/portfolio"))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    portfolio = Portfolio.open(args.portfolio)
    variants = portfolio.manifest.variants
    sample = portfolio.samples().inputs[0][:1]
    paths = {v.id: portfolio.file_path(v.id, "onnx") for v in variants}
    measured = interleaved_latency_ms(paths, sample, warmup=20, rounds=args.rounds, threads=args.threads)
    dense = next(v for v in variants if v.method == "dense")
    dense_p50 = measured[dense.id]["p50"]
    by_id = {v.id: v for v in variants}

    print(f"{portfolio.manifest.name}: {len(variants)} variants, onnxruntime batch 1, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds")
    print(f"{'variant':<34} {'method':<24} {'accuracy':>8} {'p50 ms':>8} {'vs dense':>8}  int8 vs float")
    for v in sorted(variants, key=lambda v: measured[v.id]["p50"], reverse=True):
        p50 = measured[v.id]["p50"]
        twin_note = ""
        if v.method.endswith("+int8") and v.details.get("derived_from", v.parent) in by_id:
            parent = by_id[v.details.get("derived_from", v.parent)]
            twin_note = (f"{measured[parent.id]['p50'] / p50:.2f}x faster, "
                         f"{(v.metrics['accuracy'] - parent.metrics['accuracy']) * 100:+.1f} points vs {parent.id}")
        print(f"{v.id:<34} {v.method:<24} {v.metrics['accuracy']:>8.1%} {p50:>8.3f} {dense_p50 / p50:>7.2f}x  "
              f"{twin_note}")
    close = [v for v in variants if v.metrics["accuracy"] >= dense.metrics["accuracy"] - ACCURACY_BUDGET]
    cheapest = min(close, key=lambda v: measured[v.id]["p50"])
    print(f"cheapest within {ACCURACY_BUDGET * 100:.0f} accuracy points of dense: {cheapest.id} "
          f"({cheapest.metrics['accuracy']:.1%} vs {dense.metrics['accuracy']:.1%}), "
          f"{dense_p50 / measured[cheapest.id]['p50']:.2f}x faster than dense")


if __name__ == "__main__":
    main()
