"""DNNShifter's structured step on masks from a real IMP run: how much smaller and faster, how fast, how exact.

For each model and IMP level (density 0.8^L), prints the structured/sparse ONNX file-size ratio,
the sparse/structured onnxruntime latency ratio at batch 1 (both measured interleaved in one run),
the structured step's wall and CPU time (CPU time: what the step costs, whatever else the machine
runs), and the largest output difference between the two on the test set.

    python bench/structured.py                         # VGG-16 and ResNet-56, 25 levels (long: ~25 min on 2 cores)
    python bench/structured.py --models vgg16 --width 0.25 --levels 10 --level-epochs 1   # a quick look

IMP checkpoints go to --run-dir (default build/bench-imp), so a second run only re-measures.

    python bench/structured.py --families              # transformers families with planted dead filters (~15 s)

prints, per family, the planted dead filters, the channels the step removed (dead filters and the
channels their removal left unread) and their share of the planted ones, the coupling groups it
kept after its own check, the max |diff| against the sparse model and the step's wall time.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporter.data import load_dataset  # noqa: E402
from exporter.export import export_onnx  # noqa: E402
from exporter.latency import interleaved_latency_ms  # noqa: E402
from exporter.models import build_model, classifier_of  # noqa: E402
from exporter.dnnshifter.imp import ImpConfig, run_imp  # noqa: E402
from exporter.pruning.structured import remove_dead_channels  # noqa: E402
from exporter.train import TrainConfig, predict, seeded  # noqa: E402


def main() -> None:
    args = _arguments()
    if args.families:
        _bench_families()
        return
    data = load_dataset("digits", seed=args.seed)
    print(f"digits: {len(data.train_y)} train / {len(data.test_y)} test; dense {args.epochs} epochs, "
          f"{args.level_epochs} epochs per IMP level, 20% pruned per level, rewind to iteration {args.rewind}")
    for name in args.models.split(","):
        _bench_model(name, data, args)


def _bench_model(name: str, data, args) -> None:
    build = lambda: seeded(args.seed, lambda: build_model(name, data.num_classes, args.width))
    config = ImpConfig(levels=args.levels, fraction=0.2, rewind_iteration=args.rewind, level_epochs=args.level_epochs)
    keep = set(range(0, args.levels + 1, args.every)) | {args.levels}
    levels = run_imp(build, data, TrainConfig(epochs=args.epochs, seed=args.seed), config, keep,
                     run_dir=args.run_dir / f"{name}-w{args.width}", fingerprint={"model": name, "width": args.width},
                     progress=not args.quiet)
    sample = data.test_x[:1].numpy()
    print(f"\n{name} (width {args.width}), params {sum(p.numel() for p in build().parameters()):,}")
    print(f"{'level':>5} {'density':>8} {'acc':>6} {'params kept':>12} {'size x':>7} {'speed x':>8} "
          f"{'step ms':>8} {'cpu ms':>7} {'max|diff|':>10}")
    with tempfile.TemporaryDirectory() as scratch:
        for level in sorted(levels):
            sparse = build()
            sparse.load_state_dict(levels[level].state)
            sparse.eval()
            structured = copy.deepcopy(sparse)  # the step works in place; keep the parent to compare
            cpu_started = time.process_time()
            result = remove_dead_channels(structured, data.test_x[:1], keep_outputs_of=classifier_of(structured))
            cpu_ms = (time.process_time() - cpu_started) * 1000
            diff = float((predict(sparse, data.test_x) - predict(result.model, data.test_x)).abs().max())
            paths = {"sparse": Path(scratch) / f"{level}-sparse.onnx", "structured": Path(scratch) / f"{level}-structured.onnx"}
            export_onnx(sparse, data.test_x[:4], paths["sparse"])
            export_onnx(result.model, data.test_x[:4], paths["structured"])
            latency = interleaved_latency_ms(paths, sample, rounds=args.rounds, threads=args.threads)
            size_ratio = paths["sparse"].stat().st_size / paths["structured"].stat().st_size
            speedup = latency["sparse"]["p50"] / latency["structured"]["p50"]
            kept = sum(p.numel() for p in result.model.parameters()) / sum(p.numel() for p in sparse.parameters())
            print(f"{level:>5} {levels[level].density:>8.4f} {levels[level].accuracy:>6.3f} {kept:>12.3f} "
                  f"{size_ratio:>7.2f} {speedup:>8.2f} {result.seconds * 1000:>8.1f} {cpu_ms:>7.1f} {diff:>10.1e}",
                  flush=True)


def _bench_families() -> None:
    from bench.families import families, plant_dead_filters

    print(f"{'family':<14} {'planted':>8} {'removed':>8} {'share':>7} {'kept':>5} {'max |diff|':>11} {'step ms':>8}")
    for name, (build, _) in sorted(families().items()):
        sparse = build()
        planted = plant_dead_filters(sparse)
        x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        result = remove_dead_channels(copy.deepcopy(sparse), x[:1])
        diff = float((predict(sparse, x) - predict(result.model, x)).abs().max())
        removed = sum(result.removed.values())
        print(f"{name:<14} {planted:>8} {removed:>8} {removed / max(1, planted):>7.0%} {len(result.kept):>5} "
              f"{diff:>11.1e} {result.seconds * 1000:>8.0f}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg16,resnet56")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--levels", type=int, default=25)
    parser.add_argument("--every", type=int, default=1, help="measure every k-th level (and the last)")
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--level-epochs", type=int, default=2, help="retraining epochs per IMP level")
    parser.add_argument("--rewind", type=int, default=50, help="rewind iteration")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved latency rounds per level")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("build/bench-imp"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--families", action="store_true", help="the transformers families table instead")
    return parser.parse_args()


if __name__ == "__main__":
    main()
