"""From a model and its data to a verified portfolio directory (DNNShifter: IMP, then the structured step)."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from agent.portfolio import Manifest
from exporter.data import Dataset, load_dataset
from exporter.errors import ExportError
from exporter.models import build_model, classifier_of, load_checkpoint
from exporter.pruning.imp import ImpConfig, Level, run_imp
from exporter.pruning.structured import remove_dead_channels
from exporter.train import TrainConfig, predict, seeded
from exporter.writer import BuiltVariant, check_output_dir, describe, export_classification, staged_output

EXACT_ATOL = 1e-4      # structured vs sparse parent, max abs difference on logits


@dataclass
class PortfolioSpec:
    out: Path
    model: str
    width: float = 1.0
    data: str = "digits"
    checkpoint: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    imp: ImpConfig = field(default_factory=ImpConfig)
    levels: list[int] | None = None   # levels kept as variants; default: every third, and the last
    tflite: bool = True
    run_dir: Path | None = None
    name: str | None = None
    force: bool = False
    progress: bool = True

    def kept_levels(self) -> list[int]:
        if self.levels is not None:
            return sorted(set(self.levels))
        return sorted(set(range(0, self.imp.levels + 1, 3)) | {self.imp.levels})


def build_portfolio(spec: PortfolioSpec, log=print) -> Manifest:
    """Train (or load), prune, shrink, export and verify; write the portfolio at spec.out."""
    check_output_dir(spec.out, spec.force)
    data = load_dataset(spec.data, seed=spec.train.seed)
    build = lambda: seeded(spec.train.seed, lambda: build_model(spec.model, data.num_classes, spec.width,
                                                                 data.input_shape[0]))
    pretrained = _load_pretrained(build, spec.checkpoint)
    fingerprint = {"model": spec.model, "width": spec.width, "data": spec.data,
                   "checkpoint": str(spec.checkpoint) if spec.checkpoint else None}

    started = time.perf_counter()
    levels = run_imp(build, data, spec.train, spec.imp, set(spec.kept_levels()), spec.run_dir, fingerprint,
                     pretrained=pretrained, progress=spec.progress)
    log(f"IMP: {len(levels)} levels kept in {time.perf_counter() - started:.1f} s")

    name = spec.name or f"{spec.model.split(':')[-1]}-{data.name}"
    with staged_output(spec.out, spec.force) as staging:
        built = _variants(build, levels, data, log)
        info = {"method": "dnnshifter", "model": spec.model, "width": str(spec.width),
                "train": json.dumps(spec.train.to_dict()), "imp": json.dumps(asdict(spec.imp))}
        return export_classification(staging, name, data, built, spec.tflite, info, log)


def _variants(build, levels: dict[int, Level], data: Dataset, log) -> list[BuiltVariant]:
    """The dense model, each kept sparse level, and each level's structured (physically smaller) twin."""
    example = data.test_x[:1]
    probe = torch.randn(64, *data.input_shape, generator=torch.Generator().manual_seed(1))
    variants = []
    for level in sorted(levels):
        sparse = build()
        sparse.load_state_dict(levels[level].state)
        sparse.eval()
        metrics = {"accuracy": levels[level].accuracy, "dataset": data.name, "n": len(data.test_y)}
        if level == 0:
            variants.append(BuiltVariant(describe(sparse, "dense", "dense", None, 1.0, example, metrics, {}), sparse))
            continue
        sparse_id = f"imp-l{level:02d}-sparse"
        details = {"imp_level": level}
        variants.append(BuiltVariant(describe(sparse, sparse_id, "imp-sparse", "dense", levels[level].density,
                                               example, metrics, details), sparse))
        structured = copy.deepcopy(sparse)  # the step works in place; the sparse parent is a variant too
        result = remove_dead_channels(structured, example, keep_outputs_of=classifier_of(structured))
        diff = max(_max_diff(sparse, result.model, probe), _max_diff(sparse, result.model, data.test_x))
        if diff > EXACT_ATOL:
            raise ExportError(f"structured step of level {level} changed the outputs by {diff:.2e} "
                              f"(limit {EXACT_ATOL}); this is a bug, please report it with the model name")
        structured_details = {**details, "structured_ms": round(result.seconds * 1000, 1),
                              "max_abs_diff_vs_parent": diff, "channels_removed": result.removed}
        variants.append(BuiltVariant(describe(result.model, f"imp-l{level:02d}-structured", "imp-structured",
                                               sparse_id, levels[level].density, example, metrics,
                                               structured_details), result.model))
        log(f"level {level}: density {levels[level].density:.3f}, accuracy {levels[level].accuracy:.3f}, "
            f"structured step {result.seconds * 1000:.0f} ms, exact to {diff:.1e}")
    return variants


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((predict(a, x) - predict(b, x)).abs().max())


def _load_pretrained(build, checkpoint: Path | None) -> dict | None:
    if checkpoint is None:
        return None
    model = build()
    load_checkpoint(model, checkpoint)  # raises a clear ExportError if it does not fit
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    rewind = saved.get("rewind") if isinstance(saved, dict) and "model" in saved else None
    return {"model": model.state_dict(), "rewind": rewind}
