"""Reconvene's variants: per density, the scorer's unstructured mask and Reconvene's smaller model.

Both come from the dense model's own initialization and train with its budget, so they compare
like for like: the structured one is what Reconvene makes of the unstructured one. The
unstructured twin is as large and as slow as dense in onnxruntime (zeros are stored), so it
can be left out (`with_unstructured=False`) where only deployable variants are wanted.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.nn as nn

from exporter.device import resolve_device
from exporter.methods import Context
from exporter.pruning.masks import Masks
from exporter.reconvene.reconvene import ReconveneConfig, reconvene
from exporter.train import train
from exporter.writer import BuiltVariant, describe

DEFAULT_DENSITIES = (1 / 16, 1 / 64, 1 / 256)


@dataclass
class Reconvene:
    config: ReconveneConfig = field(default_factory=ReconveneConfig)
    densities: tuple[float, ...] = DEFAULT_DENSITIES
    calibration_size: int = 64      # images in the batch SNIP and GraSP score on
    with_unstructured: bool = True
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
                               density, details)
            yield _trained(result.shrunk.model, result.shrunk.masks, context, f"{tag}-structured", "pai-structured",
                           parent, density, result.details(density, scorer))


def density_tag(density: float) -> str:
    """'x16' for 1/16, else 'd0.3': short, and valid in a variant id."""
    ratio = 1 / density
    return f"x{round(ratio)}" if abs(ratio - round(ratio)) < 1e-6 else f"d{density:g}"


def _trained(model: nn.Module, masks: Masks | None, context: Context, variant_id: str, method: str,
             parent: str | None, density: float, details: dict) -> BuiltVariant:
    started = time.perf_counter()
    data = context.data
    result = train(model, data, context.train, masks=masks, description=variant_id, progress=context.progress)
    model.eval()
    context.log(f"{variant_id}: accuracy {result.accuracy:.4f} after {context.train.epochs} epochs "
                f"({time.perf_counter() - started:.0f} s)")
    metrics = {"accuracy": result.accuracy, "dataset": data.name, "n": len(data.test_y)}
    return BuiltVariant(describe(model, variant_id, method, parent, density, data.test_x[:1], metrics, details), model)
