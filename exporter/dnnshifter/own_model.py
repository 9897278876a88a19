"""DNNShifter's structured step as a tool of its own: a user's sparse model and its exact smaller twin.

The sparse model may come from anywhere (the user's own pruning, `torch.nn.utils.prune`, another
tool): the step removes what it can prove dead, checks the result answers like the sparse model,
and the writer exports and checks both. With labelled data the variants get accuracies and int8
twins; without, random inputs of the given shape serve as check and health-check inputs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from agent.portfolio import Manifest
from exporter.data import Dataset, load_dataset
from exporter.device import placed_on, resolve_device
from exporter.errors import ExportError
from exporter.imagefolder import looks_like_image_folder
from exporter.models import build_model, classifier_of, load_checkpoint
from exporter.pruning.structured import Untraceable, remove_dead_channels
from exporter.train import evaluate
from exporter.writer import BuiltVariant, WriteOptions, check_output_dir, describe, staged_output, write_portfolio

_UNLABELLED_COUNT = 64    # random inputs standing in for data when none is given


@dataclass
class StructureSpec:
    out: Path
    model: str                          # package.module:factory, or a zoo name
    checkpoint: Path
    input_shape: tuple[int, int, int]   # C, H, W
    num_classes: int
    data: str | None = None
    quantize: bool = True
    tflite: bool = True
    name: str | None = None
    force: bool = False
    seed: int = 0
    device: str = "cpu"                 # where accuracies are evaluated; the step and the export stay on the CPU


def build_structured_portfolio(spec: StructureSpec, log=print) -> Manifest:
    check_output_dir(spec.out, spec.force)
    data = _data(spec)
    model = build_model(spec.model, spec.num_classes, 1.0, spec.input_shape[0])
    load_checkpoint(model, spec.checkpoint)
    model.eval()
    example = data.test_x[:1]
    _check_runs(model, example, spec)
    labelled = spec.data is not None

    def metrics(m: nn.Module) -> dict:
        if not labelled:
            return {}
        with placed_on(m, resolve_device(spec.device)):
            return {"accuracy": evaluate(m, data.test_x, data.test_y), "dataset": data.name, "n": len(data.test_y)}

    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    density = nonzero / max(1, sum(p.numel() for p in model.parameters()))

    structured = copy.deepcopy(model)  # the step works in place; the sparse model is a variant too
    try:
        result = remove_dead_channels(structured, example, keep_outputs_of=_classifier(structured))
    except Untraceable as error:
        raise ExportError(f"the structured step cannot trace model {spec.model} ({error}); it traces forward "
                          "through autograd, so forward must keep its tensors in torch") from None
    details = {"structured_ms": round(result.seconds * 1000, 1), "checkpoint": str(spec.checkpoint),
               **result.kept_details()}
    if result.kept_warning():
        log(f"warning: {result.kept_warning()}")
    built = [BuiltVariant(describe(model, "sparse", "sparse", None, density, example, metrics(model),
                                   {} if result.removed else {**details, "structured_step": "removed nothing"}), model)]
    if result.removed:
        log(f"structured step: removed {sum(result.removed.values())} channels in {result.seconds * 1000:.0f} ms")
        built.append(BuiltVariant(describe(result.model, "structured", "structured", "sparse", density, example,
                                           metrics(result.model), {**details, "channels_removed": result.removed}),
                                  result.model))
    else:
        log("structured step: no channel is provably dead, so the portfolio holds the sparse model alone")

    name = spec.name or f"{spec.model.split(':')[-1]}-structured"
    options = WriteOptions(tflite=spec.tflite, quantize=spec.quantize and labelled, keep_dominated=True,
                           labelled=labelled)
    info = {"method": "dnnshifter-structure", "model": spec.model, "checkpoint": str(spec.checkpoint)}
    with staged_output(spec.out, spec.force) as staging:
        return write_portfolio(staging, name, data, built, options, info, log)


def _data(spec: StructureSpec) -> Dataset:
    if spec.data is None:
        generator = torch.Generator().manual_seed(spec.seed)
        x = torch.randn(_UNLABELLED_COUNT, *spec.input_shape, generator=generator)
        channels = spec.input_shape[0]
        return Dataset("random", x, torch.zeros(len(x), dtype=torch.int64), x, torch.zeros(len(x), dtype=torch.int64),
                       [str(label) for label in range(spec.num_classes)],
                       {"scale": 1.0, "mean": [0.0] * channels, "std": [1.0] * channels})
    height, width = spec.input_shape[1:]
    # An image folder is resized to the model's input; other formats have their own size, checked below.
    resize = height if height == width and looks_like_image_folder(Path(spec.data)) else None
    data = load_dataset(spec.data, seed=spec.seed, input_size=resize)
    if tuple(data.input_shape) != tuple(spec.input_shape):
        raise ExportError(f"--data {spec.data} holds inputs of shape {list(data.input_shape)}, but --input-shape "
                          f"says {list(spec.input_shape)}; give matching data or shape")
    if data.num_classes != spec.num_classes:
        raise ExportError(f"--data {spec.data} has {data.num_classes} classes, but --num-classes says "
                          f"{spec.num_classes}")
    return data


def _check_runs(model: nn.Module, example: torch.Tensor, spec: StructureSpec) -> None:
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as error:  # the user's model may raise anything on a wrong shape
        reason = " ".join(str(error).split())[:200]
        raise ExportError(f"model {spec.model} rejects inputs of shape {[1, *spec.input_shape]} ({reason}); "
                          "give the --input-shape it was trained on") from None
    if not isinstance(out, torch.Tensor) or out.shape != (1, spec.num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(f"model {spec.model} returns {shape} for one input, not [1, {spec.num_classes}] logits; "
                          "check --num-classes")


def _classifier(model: nn.Module) -> nn.Module | None:
    """The final linear layer, whose outputs stay; None when there is none (the check still guards the outputs)."""
    try:
        return classifier_of(model)
    except ExportError:
        return None
