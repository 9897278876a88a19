"""Reconvene against unstructured PaI: same initialization, same masks, same training budget.

Part 1, generation time: Reconvene (scoring + sensitivity + shrinking, before training) on the
full-width model for every scorer and density, with the parameter ratio it gives.
Part 2, after training: for every scorer and density, the pai-unstructured model and its
pai-structured twin trained alike: accuracy of each, parameter ratio (unstructured's total /
structured's total) and onnxruntime batch-1 latency ratio (both measured interleaved in one run).

    python bench/reconvene.py                                   # VGG-16 on digits (long on 2 cores)
    python bench/reconvene.py --train-width 0.25 --epochs 2 --scorers synflow,snip --densities 8,64   # quick
    python bench/reconvene.py --data path/to/cifar-10-batches-py                                  # CIFAR-10
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporter.data import load_dataset  # noqa: E402
from exporter.export import export_onnx  # noqa: E402
from exporter.latency import interleaved_latency_ms  # noqa: E402
from exporter.models import build_model  # noqa: E402
from exporter.reconvene.reconvene import ReconveneConfig, reconvene  # noqa: E402
from exporter.reconvene.scorers import SCORERS  # noqa: E402
from exporter.train import TrainConfig, seeded, train  # noqa: E402


def main() -> None:
    args = _arguments()
    data = load_dataset(args.data, seed=args.seed)
    scorers = args.scorers.split(",")
    densities = [1 / int(r) for r in args.densities.split(",")]
    batch = (data.train_x[:args.calibration_size], data.train_y[:args.calibration_size])
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test images {list(data.input_shape)}; "
          f"{torch.get_num_threads()} torch threads")
    if not args.skip_generation:
        _generation(args, data, scorers, densities, batch)
    if not args.skip_training:
        _after_training(args, data, scorers, densities, batch)


def _generation(args, data, scorers, densities, batch) -> None:
    model = seeded(args.seed, lambda: build_model(args.model, data.num_classes, 1.0, data.input_shape[0]))
    total = sum(p.numel() for p in model.parameters())
    print(f"\n1. generation time, {args.model} full width ({total:,} params), share {args.share}, "
          f"SynFlow {args.synflow_rounds} rounds")
    print(f"{'scorer':>9} {'density':>8} {'scoring s':>9} {'sensit. s':>9} {'shrink s':>9} {'total s':>8} {'smaller x':>9}")
    for scorer in scorers:
        for density in densities:
            config = ReconveneConfig(scorer=scorer, structured_share=args.share, synflow_rounds=args.synflow_rounds)
            result = reconvene(model, density, config, batch)
            s = result.seconds
            ratio = total / sum(p.numel() for p in result.shrunk.model.parameters())
            print(f"{scorer:>9} {f'1/{round(1 / density)}':>8} {s['scoring']:>9.2f} {s['sensitivity']:>9.2f} "
                  f"{s['shrinking']:>9.2f} {s['total']:>8.2f} {ratio:>9.2f}", flush=True)


def _after_training(args, data, scorers, densities, batch) -> None:
    initial = seeded(args.seed, lambda: build_model(args.model, data.num_classes, args.train_width, data.input_shape[0]))
    budget = TrainConfig(epochs=args.epochs, seed=args.seed)
    dense = copy.deepcopy(initial)
    dense_accuracy = train(dense, data, budget, progress=False).accuracy
    print(f"\n2. after {args.epochs} epochs each, {args.model} width {args.train_width} "
          f"({sum(p.numel() for p in initial.parameters()):,} params; dense accuracy {dense_accuracy:.3f})")
    print(f"{'scorer':>9} {'density':>8} {'acc unstr':>9} {'acc str':>8} {'smaller x':>9} {'faster x':>8} {'gen s':>6}")
    sample = data.test_x[:1].numpy()
    with tempfile.TemporaryDirectory() as scratch:
        for scorer in scorers:
            for density in densities:
                config = ReconveneConfig(scorer=scorer, structured_share=args.share, synflow_rounds=args.synflow_rounds)
                result = reconvene(initial, density, config, batch)
                unstructured = copy.deepcopy(initial)
                acc_u = train(unstructured, data, budget, masks=result.unstructured, progress=False).accuracy
                structured = result.shrunk.model
                acc_s = train(structured, data, budget, masks=result.shrunk.masks, progress=False).accuracy
                paths = {kind: Path(scratch) / f"{scorer}-{density}-{kind}.onnx" for kind in ("u", "s")}
                export_onnx(unstructured.eval(), data.test_x[:4], paths["u"])
                export_onnx(structured.eval(), data.test_x[:4], paths["s"])
                latency = interleaved_latency_ms(paths, sample, rounds=args.rounds, threads=args.threads)
                smaller = sum(p.numel() for p in unstructured.parameters()) / sum(p.numel() for p in structured.parameters())
                faster = latency["u"]["p50"] / latency["s"]["p50"]
                print(f"{scorer:>9} {f'1/{round(1 / density)}':>8} {acc_u:>9.3f} {acc_s:>8.3f} {smaller:>9.2f} "
                      f"{faster:>8.2f} {result.seconds['total']:>6.2f}", flush=True)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--data", default="digits", help="'digits' or a CIFAR-10 python directory")
    parser.add_argument("--scorers", default=",".join(SCORERS))
    parser.add_argument("--densities", default="8,16,32,64", help="inverse densities: 8 means 1/8")
    parser.add_argument("--share", type=float, default=ReconveneConfig.structured_share)
    parser.add_argument("--synflow-rounds", type=int, default=ReconveneConfig.synflow_rounds)
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--train-width", type=float, default=0.25, help="width of the models trained in part 2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved latency rounds")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    main()
