"""Does recovery make composite variants usable? Perplexity of a composite variant before and after
the masked fine-tune, against the unstructured-only variant at the same sparsity (SmolLM2-135M).

The issue's bar: at a 0.1 structured ratio and 50% unstructured sparsity, the recovered composite
variant within 25% of the unstructured-only variant's perplexity.

    python bench/mosaic_recovery.py                          # 0.1 + 50%, 100 and 300 steps
    python bench/mosaic_recovery.py --steps 50 --windows 8   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.mosaic import WIKITEXT, smollm2_gguf  # noqa: E402
from exporter.mosaic.corpus import read_corpus, token_windows  # noqa: E402
from exporter.mosaic.evaluate import parameter_count, perplexity  # noqa: E402
from exporter.mosaic.load import load_causal_lm  # noqa: E402
from exporter.mosaic.recovery import RecoveryConfig, recover  # noqa: E402
from exporter.mosaic.structure import remove_dead_structure, shrink_layer  # noqa: E402
from exporter.mosaic.unstructured import UnstructuredConfig, prune_unstructured  # noqa: E402


def main() -> None:
    args = _arguments()
    model, tokenizer = load_causal_lm(args.model or smollm2_gguf())
    calib = token_windows(tokenizer, read_corpus(args.data / "valid.txt"), args.context, args.windows, seed=0)
    held_out = token_windows(tokenizer, read_corpus(args.data / "test.txt"), args.context, args.windows, seed=None)
    config = UnstructuredConfig(args.sparsity, "projection", pruner=args.pruner)
    print(f"{parameter_count(model):,} params; {args.windows}x{args.context} tokens of valid.txt to calibrate and "
          f"recover on, {args.windows}x{args.context} of test.txt to score; {torch.get_num_threads()} threads")
    print(f"dense perplexity {perplexity(model, held_out):.2f}", flush=True)

    unstructured = copy.deepcopy(model)
    prune_unstructured(unstructured, calib, config)
    reference = perplexity(unstructured, held_out)
    print(f"unstructured only, {args.sparsity:.0%}: perplexity {reference:.2f}", flush=True)
    del unstructured

    composite = copy.deepcopy(model)
    prune_unstructured(composite, calib, config,
                       on_layer=lambda stats: shrink_layer(stats.layer, stats.input_sq_norms, args.ratio))
    remove_dead_structure(composite)
    before = perplexity(composite, held_out)
    print(f"composite {args.ratio:g} + {args.sparsity:.0%}: {parameter_count(composite):,} params, perplexity "
          f"{before:.2f} ({before / reference:.2f}x unstructured) before recovery", flush=True)
    print(f"{'steps':>6} {'lr':>8} {'seconds':>8} {'calib loss':>16} {'perplexity':>10} {'vs unstructured':>16}")
    for steps in [int(s) for s in args.steps.split(",")]:
        trial = copy.deepcopy(composite)
        started = time.perf_counter()
        report = recover(trial, calib, RecoveryConfig(steps=steps, lr=args.lr, batch_windows=args.batch))
        seconds = time.perf_counter() - started
        after = perplexity(trial, held_out)
        print(f"{steps:>6} {args.lr:>8.0e} {seconds:>8.0f} {report.loss_before:>7.3f} -> {report.loss_after:<6.3f} "
              f"{after:>10.2f} {after / reference:>15.2f}x", flush=True)
        del trial


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--data", type=Path, default=WIKITEXT, help="folder with valid.txt and test.txt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--ratio", type=float, default=0.1, help="share of heads and neurons removed first")
    parser.add_argument("--pruner", default="wanda")
    parser.add_argument("--steps", default="100,300", help="recovery step counts to try, each from the same start")
    parser.add_argument("--lr", type=float, default=RecoveryConfig.lr)
    parser.add_argument("--batch", type=int, default=RecoveryConfig.batch_windows, help="windows per step")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    return parser.parse_args()


if __name__ == "__main__":
    main()
