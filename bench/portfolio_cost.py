"""What a portfolio of N variants costs with DNNShifter, against training every variant from scratch.

(a) Once the sparse models exist, each structured variant costs one structured step
    (milliseconds, zero epochs); the alternative is training a model of that shape from scratch.
(b) The whole IMP run (dense training + every level's retraining + the structured steps) against
    training each of the N variants' architectures from scratch for the dense schedule.
Ratios of epochs and of wall time, measured in one run on this machine.

    python bench/portfolio_cost.py                  # ResNet-20 (width 0.5) on digits, 15 levels, ~6 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.data import load_dataset  # noqa: E402
from exporter.models import build_model, classifier_of  # noqa: E402
from exporter.dnnshifter.imp import ImpConfig, run_imp  # noqa: E402
from exporter.pruning.structured import remove_dead_channels  # noqa: E402
from exporter.train import TrainConfig, train  # noqa: E402


def main() -> None:
    args = _arguments()
    data = load_dataset("digits", seed=args.seed)
    dense_config = TrainConfig(epochs=args.epochs, seed=args.seed)
    imp = ImpConfig(levels=args.levels, fraction=0.2, rewind_iteration=args.rewind, level_epochs=args.level_epochs)
    keep = sorted(set(range(args.every, args.levels + 1, args.every)) | {args.levels})
    build = lambda: _seeded_model(args)

    levels = run_imp(build, data, dense_config, imp, set(range(args.levels + 1)), progress=not args.quiet)
    imp_seconds = sum(level.train_seconds for level in levels.values())
    imp_epochs = args.epochs + args.levels * args.level_epochs

    print(f"{args.model} (width {args.width}) on digits; dense {args.epochs} epochs, {args.levels} IMP levels x "
          f"{args.level_epochs} epochs; variants at levels {keep}")
    print(f"{'level':>5} {'density':>8} {'params':>8} {'step ms':>8} {'scratch s':>10} {'scratch acc':>11} "
          f"{'imp acc':>8} {'(a) wall x':>11}")
    step_seconds = scratch_seconds = 0.0
    for k in keep:
        sparse = build()
        sparse.load_state_dict(levels[k].state)
        result = remove_dead_channels(sparse, data.test_x[:1], keep_outputs_of=classifier_of(sparse))
        step_seconds += result.seconds

        scratch = _reinitialized(result.model, args.seed)
        started = time.perf_counter()
        scratch_result = train(scratch, data, dense_config, progress=False)
        elapsed = time.perf_counter() - started
        scratch_seconds += elapsed
        print(f"{k:>5} {levels[k].density:>8.4f} {sum(p.numel() for p in result.model.parameters()):>8,} "
              f"{result.seconds * 1000:>8.1f} {elapsed:>10.1f} {scratch_result.accuracy:>11.3f} "
              f"{levels[k].accuracy:>8.3f} {elapsed / result.seconds:>11.0f}")

    n = len(keep)
    portfolio_seconds = imp_seconds + step_seconds
    print(f"\n(a) per variant, once the sparse models exist: 0 epochs and {step_seconds / n * 1000:.0f} ms "
          f"against {args.epochs} epochs and {scratch_seconds / n:.1f} s from scratch: "
          f"{scratch_seconds / step_seconds:.0f}x less wall time")
    print(f"(b) whole portfolio of {n} variants: IMP {imp_epochs} epochs / {portfolio_seconds:.0f} s against "
          f"scratch {n * args.epochs} epochs / {scratch_seconds:.0f} s: {n * args.epochs / imp_epochs:.2f}x fewer "
          f"epochs, {scratch_seconds / portfolio_seconds:.2f}x less wall time")


def _seeded_model(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    return build_model(args.model, 10, args.width)


def _reinitialized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same (smaller) architecture with fresh weights: what training it from scratch starts from."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--levels", type=int, default=15)
    parser.add_argument("--level-epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=3, help="a variant every k levels (and the last)")
    parser.add_argument("--rewind", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    main()
