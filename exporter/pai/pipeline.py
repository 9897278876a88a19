"""A Reconvene portfolio: the dense model, and per density a pai-unstructured and a pai-structured variant.

Both variants of a density come from the same initialization and the same scorer masks, and
train with the same budget, so they compare like for like: the structured one is what Reconvene
makes of the unstructured one.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn

from agent.portfolio import Manifest
from exporter.data import Dataset, load_dataset
from exporter.models import build_model
from exporter.pai.reconvene import ReconveneConfig, reconvene
from exporter.pruning.masks import Masks
from exporter.train import TrainConfig, seeded, train
from exporter.writer import BuiltVariant, check_output_dir, describe, export_classification, staged_output

DEFAULT_DENSITIES = (1 / 8, 1 / 16, 1 / 32, 1 / 64)


@dataclass
class PaiSpec:
    out: Path
    model: str
    width: float = 1.0
    data: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    reconvene: ReconveneConfig = field(default_factory=ReconveneConfig)
    densities: tuple[float, ...] = DEFAULT_DENSITIES
    calibration_size: int = 64      # images in the batch SNIP and GraSP score on
    tflite: bool = True
    name: str | None = None
    force: bool = False
    progress: bool = True


def build_pai_portfolio(spec: PaiSpec, log=print) -> Manifest:
    check_output_dir(spec.out, spec.force)
    spec.reconvene.validate()
    data = load_dataset(spec.data, seed=spec.train.seed)
    initial = seeded(spec.train.seed, lambda: build_model(spec.model, data.num_classes, spec.width,
                                                          data.input_shape[0]))
    batch = (data.train_x[:spec.calibration_size], data.train_y[:spec.calibration_size])
    built = [_trained(copy.deepcopy(initial), None, data, spec, "dense", "dense", None, 1.0, {}, log)]
    scorer = spec.reconvene.scorer
    for density in sorted(spec.densities, reverse=True):
        result = reconvene(initial, density, spec.reconvene, batch)
        log(f"density {density:.4f}: Reconvene generated the structured model in {result.seconds['total']:.2f} s "
            f"(scoring {result.seconds['scoring']:.2f} s)")
        tag = f"pai-{scorer}-{density_tag(density)}"
        unstructured_details = {"scorer": scorer, "target_density": density,
                                "generation_s": {"scoring": round(result.seconds["scoring"], 3)}}
        built.append(_trained(copy.deepcopy(initial), result.unstructured, data, spec, f"{tag}-unstructured",
                              "pai-unstructured", None, density, unstructured_details, log))
        built.append(_trained(result.shrunk.model, result.shrunk.masks, data, spec, f"{tag}-structured",
                              "pai-structured", f"{tag}-unstructured", density, result.details(density, scorer), log))

    name = spec.name or f"{spec.model.split(':')[-1]}-{data.name}-pai"
    info = {"method": "reconvene", "model": spec.model, "width": str(spec.width),
            "train": json.dumps(spec.train.to_dict()), "reconvene": json.dumps(asdict(spec.reconvene))}
    with staged_output(spec.out, spec.force) as staging:
        return export_classification(staging, name, data, built, spec.tflite, info, log)


def density_tag(density: float) -> str:
    """'x16' for 1/16, else 'd0.3': short, and valid in a variant id."""
    ratio = 1 / density
    return f"x{round(ratio)}" if abs(ratio - round(ratio)) < 1e-6 else f"d{density:g}"


def _trained(model: nn.Module, masks: Masks | None, data: Dataset, spec: PaiSpec, variant_id: str, method: str,
             parent: str | None, density: float, details: dict, log) -> BuiltVariant:
    started = time.perf_counter()
    result = train(model, data, spec.train, masks=masks, description=variant_id, progress=spec.progress)
    model.eval()
    log(f"{variant_id}: accuracy {result.accuracy:.4f} after {spec.train.epochs} epochs "
        f"({time.perf_counter() - started:.0f} s)")
    metrics = {"accuracy": result.accuracy, "dataset": data.name, "n": len(data.test_y)}
    variant = describe(model, variant_id, method, parent, density, data.test_x[:1], metrics, details)
    return BuiltVariant(variant, model)
