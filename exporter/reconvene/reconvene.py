"""Reconvene: from a freshly initialized model to a smaller one pruned at initialization, in seconds.

1. An unstructured PaI scorer masks the model at the requested density.
2. The sensitivity evaluator ranks the conv filter groups by what going structured would cost.
3. The least sensitive share of them goes structured; the rectifier shrinks and reinitializes.
Generation time (all three) is measured; training comes after, once, in the caller.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from exporter.device import CPU, to_device
from exporter.errors import ExportError
from exporter.models import classifier_of
from exporter.reconvene.scorers import Batch, Scored, get_scorer
from exporter.reconvene.sensitivity import conv_filter_groups, rank_layers
from exporter.reconvene.shrink import Shrunk, shrink
from exporter.pruning.liveness import trace
from exporter.pruning.masks import Masks, prunable_weights


@dataclass
class ReconveneConfig:
    scorer: str = "synflow"
    structured_share: float = 0.5   # share of the ranked conv groups converted to structured
    synflow_rounds: int = 10        # the paper uses 100; 10 keeps VGG-16 generation under 5 s on 2 cores
    seed: int = 0

    def validate(self) -> None:
        get_scorer(self.scorer)  # raises a clear error for an unknown name
        if not 0 <= self.structured_share <= 1:
            raise ExportError(f"structured share must be in [0, 1], got {self.structured_share}")
        if self.synflow_rounds < 1:
            raise ExportError(f"SynFlow needs at least one round, got {self.synflow_rounds}")


@dataclass
class Reconvened:
    unstructured: Masks     # the scorer's masks for the original model (the pai-unstructured variant)
    shrunk: Shrunk          # the smaller model, its masks and the per-layer decisions (pai-structured)
    seconds: dict[str, float]  # scoring, sensitivity, shrinking, total

    def details(self, density: float, scorer: str) -> dict:
        return {"scorer": scorer, "target_density": density,
                "generation_s": {k: round(v, 3) for k, v in self.seconds.items()},
                "layers": [d.to_dict() for d in self.shrunk.decisions]}


def reconvene(model: nn.Module, density: float, config: ReconveneConfig, batch: Batch,
              device: torch.device = CPU) -> Reconvened:
    """Prune `model` (freshly initialized, left unchanged) at `density` the Reconvene way, scoring on `device`."""
    if not 0 < density <= 1:
        raise ExportError(f"density must be in (0, 1], got {density}")
    config.validate()
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ExportError(f"{type(model).__name__} has no conv layers; Reconvene prunes conv filters at initialization")
    check_calibration_batch(model, batch)

    started = time.perf_counter()
    scoring_copy = copy.deepcopy(model).to(device)
    weights = prunable_weights(scoring_copy, classifier_of(scoring_copy), include_classifier=False)
    scorer = get_scorer(config.scorer, **_scorer_options(config, batch))
    on_device = (to_device(batch[0], device), to_device(batch[1], device))
    scored = _on_cpu(scorer.prune(scoring_copy, weights, density, on_device if scorer.needs_data else None))
    scored_at = time.perf_counter()

    smaller = copy.deepcopy(model).eval()
    dg = trace(smaller, batch[0][:1])  # traced once, used by all steps
    ranked = rank_layers(conv_filter_groups(smaller, dg, classifier_of(smaller)), scored.masks, scored.scores)
    convert = ranked[:round(config.structured_share * len(ranked))]
    ranked_at = time.perf_counter()

    shrunk = shrink(model, smaller, dg, scored.masks, convert, ranked)
    done = time.perf_counter()
    seconds = {"scoring": scored_at - started, "sensitivity": ranked_at - scored_at, "shrinking": done - ranked_at,
               "total": done - started}
    return Reconvened(unstructured=scored.masks, shrunk=shrunk, seconds=seconds)


def _on_cpu(scored: Scored) -> Scored:
    """The scorer's masks and scores on the CPU: the sensitivity evaluator's few per-layer sums gain nothing
    from a device, and the rectifier works on the CPU model."""
    return Scored(Masks(ranked={name: m.to(CPU) for name, m in scored.masks.ranked.items()}),
                  {name: score.to(CPU) for name, score in scored.scores.items()})


def _scorer_options(config: ReconveneConfig, batch: Batch) -> dict:
    if config.scorer == "synflow":
        return {"rounds": config.synflow_rounds, "input_shape": tuple(batch[0].shape[1:])}  # the shape, no data
    if config.scorer == "random":
        return {"seed": config.seed}
    return {}


def check_calibration_batch(model: nn.Module, batch: Batch) -> None:
    inputs, labels = batch
    if inputs.dim() != 4 or labels.dim() != 1 or len(inputs) != len(labels) or len(inputs) == 0:
        raise ExportError(f"calibration batch must be images [N, C, H, W] with N labels, got inputs "
                          f"{list(inputs.shape)} and labels {list(labels.shape)}")
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(inputs[:1])
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ExportError(f"calibration batch of shape {list(inputs.shape)} does not fit the model ({reason}); "
                          "give data with the model's input shape") from None
    finally:
        model.train(training)
