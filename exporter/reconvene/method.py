"""Reconvene's variants: per density, the scorer's unstructured mask and Reconvene's smaller model.

Both come from the dense model's own initialization and train with its budget, so they compare
like for like: the structured one is what Reconvene makes of the unstructured one. The
unstructured twin is as large and as slow as dense in onnxruntime (zeros are stored), so it
can be left out (`with_unstructured=False`) where only deployable variants are wanted.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from exporter.device import resolve_device
from exporter.methods import Context
from exporter.pruning.masks import Masks
from exporter.reconvene.reconvene import ReconveneConfig, reconvene
from exporter.run_dir import RunDir
from exporter.train import TrainConfig, train
from exporter.writer import BuiltVariant, describe

DEFAULT_DENSITIES = (1 / 16, 1 / 64, 1 / 256)


@dataclass
class Reconvene:
    config: ReconveneConfig = field(default_factory=ReconveneConfig)
    densities: tuple[float, ...] = DEFAULT_DENSITIES
    calibration_size: int = 64      # images in the batch SNIP and GraSP score on
    with_unstructured: bool = True
    run_dir: RunDir | None = None   # opened with reconvene_settings: trained variants kept, trainings resumed
    name: str = "reconvene"

    def variants(self, context: Context) -> Iterator[BuiltVariant]:
        self.config.validate()
        data = context.data
        initial = context.build()
        batch = (data.train_x[:self.calibration_size], data.train_y[:self.calibration_size])
        scorer = self.config.scorer
        device = resolve_device(context.train.device)
        for density in sorted(self.densities, reverse=True):
            result = reconvene(initial, density, self.config, batch, device)
            context.log(f"density {density:.4f}: Reconvene generated the structured model in "
                        f"{result.seconds['total']:.2f} s (scoring {result.seconds['scoring']:.2f} s)")
            tag = f"pai-{scorer}-{density_tag(density)}"
            parent = None
            if self.with_unstructured:
                details = {"scorer": scorer, "target_density": density,
                           "generation_s": {"scoring": round(result.seconds["scoring"], 3)}}
                parent = f"{tag}-unstructured"
                yield _trained(context.build(), result.unstructured, context, parent, "pai-unstructured", None,
                               density, details, self.run_dir)
            yield _trained(result.shrunk.model, result.shrunk.masks, context, f"{tag}-structured", "pai-structured",
                           parent, density, result.details(density, scorer), self.run_dir)


def density_tag(density: float) -> str:
    """'x16' for 1/16, else 'd0.3': short, and valid in a variant id."""
    ratio = 1 / density
    return f"x{round(ratio)}" if abs(ratio - round(ratio)) < 1e-6 else f"d{density:g}"


def reconvene_settings(fingerprint: dict, train_config: TrainConfig, config: ReconveneConfig,
                       calibration_size: int) -> dict:
    """What decides each variant's architecture and weights: the run directory's key for them."""
    return {**fingerprint, "reconvene": asdict(config), "calibration_size": calibration_size,
            "train": train_config.settings()}


def _trained(model: nn.Module, masks: Masks | None, context: Context, variant_id: str, method: str,
             parent: str | None, density: float, details: dict, run_dir: RunDir | None) -> BuiltVariant:
    """`model` (Reconvene's architecture, recomputed deterministically on every run) trained, or its
    weights from the run directory when an earlier run trained it."""
    started = time.perf_counter()
    data = context.data
    kept = run_dir.load(variant_id) if run_dir is not None else None
    if kept is not None and not _fits(model, kept["model"]):
        context.log(f"{variant_id}: the kept weights do not fit the architecture scored now; training again")
        kept = None
    if kept is not None:
        model.load_state_dict(kept["model"])
        accuracy = kept["accuracy"]
        context.log(f"{variant_id}: accuracy {accuracy:.4f}, reused from {run_dir.path}")
    else:
        resume = run_dir.in_progress(variant_id) if run_dir is not None else None
        accuracy = train(model, data, context.train, masks=masks, description=variant_id, progress=context.progress,
                         resume=resume).accuracy
        if run_dir is not None:
            run_dir.finish(variant_id, {"model": model.state_dict(), "accuracy": accuracy})
        context.log(f"{variant_id}: accuracy {accuracy:.4f} after {context.train.epochs} epochs "
                    f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    metrics = {"accuracy": accuracy, "dataset": data.name, "n": len(data.test_y)}
    return BuiltVariant(describe(model, variant_id, method, parent, density, data.test_x[:1], metrics, details), model)


def _fits(model: nn.Module, state: dict) -> bool:
    """Whether `state` has exactly `model`'s tensors and shapes (scoring on another device may choose otherwise)."""
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[name].shape == state[name].shape for name in own)
