"""Mosaic's unstructured projection pruning: outlier statistics, per-projection ratios, then pruning layer by layer.

Pass 1 runs the calibration windows through the unchanged model and measures each projection's
outlier share (Wanda scores above m times their mean). Pass 2 walks the layers again, in order,
pruning each projection at its own ratio on the activations that the already pruned layers produce.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from exporter.errors import ExportError
from exporter.mosaic.calibration import LayerStats, collect_stats, sequential_layers
from exporter.mosaic.load import decoder_layers, projections
from exporter.mosaic.ratios import (
    OutlierShares,
    allocate,
    check_granularity,
    check_lam,
    check_m,
    check_target,
    outlier_share,
    wanda_scores,
)
from exporter.mosaic.sparsegpt import prune_sparsegpt

PRUNERS = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class UnstructuredConfig:
    """sparsity: the share of projection weights to zero, model-wide (parameter-weighted).
    granularity: "global" (one ratio), "layer" (OWL), "projection" (Mosaic's paper: each projection its
    own outlier share) or "layer+type" (Mosaic's public code: the layer's share plus a per-type offset).
    m: outlier threshold, in multiples of the mean score. lam: how far a ratio may stray from sparsity.
    pruner: "wanda" (|W|·‖X‖, per output row) or "sparsegpt" (OBS updates)."""
    sparsity: float
    granularity: str = "layer"  # measured best of the four on SmolLM2 (README, "Exporter (Mosaic, LLMs)")
    m: float = 5.0
    lam: float = 0.08
    pruner: str = "wanda"

    def validate(self) -> None:
        check_target(self.sparsity)
        check_granularity(self.granularity)
        check_m(self.m)
        check_lam(self.lam)
        if self.pruner not in PRUNERS:
            raise ExportError(f"unknown pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")


@dataclass
class PruneReport:
    """What pruning did. `ratios` and `achieved` are [layer][projection name] sparsities (requested,
    and measured on the final weights); `overall` counts projection weights only."""
    ratios: list[dict[str, float]]
    outlier_shares: OutlierShares | None  # None for global granularity, which needs no pass 1
    achieved: list[dict[str, float]]
    overall: float
    pass1_seconds: float
    pass2_seconds: float


def prune_unstructured(
    model: nn.Module,
    windows: torch.Tensor,
    config: UnstructuredConfig,
    on_layer: Callable[[LayerStats], None] | None = None,
) -> PruneReport:
    """Prune every projection of `model` in place, calibrating on int64 input_ids `windows` [count, context].

    `on_layer(stats)` runs on each layer just before it is pruned: the composite path removes heads
    or neurons there. Statistics that no longer fit the resized projections are measured again on
    the same inputs. Ratios then apply to what remains of each projection.
    """
    config.validate()
    layers = decoder_layers(model)
    sizes = [{name: linear.weight.numel() for name, linear in projections(layer, i).items()} for i, layer in enumerate(layers)]

    started = time.perf_counter()
    if config.granularity == "global":
        shares, ratios = None, [dict.fromkeys(layer, config.sparsity) for layer in sizes]
    else:
        shares = measure_outlier_shares(model, windows, config.m)
        ratios = allocate(shares, sizes, config.sparsity, config.lam, config.granularity)
    pass1_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for stats in sequential_layers(model, windows, hessians=config.pruner == "sparsegpt"):
        if on_layer is not None:
            on_layer(stats)
        linears = projections(decoder_layers(model)[stats.index], stats.index)
        if not stats.matches(linears):  # on_layer resized the layer and did not slice every statistic
            stats.refresh()
        for name, linear in linears.items():
            ratio = ratios[stats.index][name]
            if config.pruner == "wanda":
                prune_wanda(linear, stats.input_sq_norms[name], ratio)
            else:
                prune_sparsegpt(linear, stats.hessians[name], ratio)
    pass2_seconds = time.perf_counter() - started

    achieved, overall = projection_sparsity(model)
    return PruneReport(ratios, shares, achieved, overall, pass1_seconds, pass2_seconds)


def measure_outlier_shares(model: nn.Module, windows: torch.Tensor, m: float) -> OutlierShares:
    """Pass 1: each layer's and each projection's share of Wanda scores above m times their mean.

    Wanda's scores whatever the pruner: Mosaic and OWL define outliers on them (README, "Mosaic")."""
    by_layer, by_projection = [], []
    for stats in collect_stats(model, windows):
        scores = {
            name: wanda_scores(linear.weight, stats.input_sq_norms[name])
            for name, linear in projections(stats.layer, stats.index).items()
        }
        by_layer.append(outlier_share(list(scores.values()), m))
        by_projection.append({name: outlier_share(s, m) for name, s in scores.items()})
    return OutlierShares(by_layer=by_layer, by_projection=by_projection)


@torch.no_grad()
def prune_wanda(linear: nn.Linear, input_sq_norms: torch.Tensor, sparsity: float) -> None:
    """Zero, in every output row, the round(sparsity * columns) weights with the lowest Wanda score."""
    scores = wanda_scores(linear.weight, input_sq_norms)
    count = round(sparsity * scores.shape[1])
    if count == 0:
        return
    lowest = torch.argsort(scores, dim=1, stable=True)[:, :count]
    pruned = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)
    linear.weight.masked_fill_(pruned, 0.0)


def projection_sparsity(model: nn.Module) -> tuple[list[dict[str, float]], float]:
    """The share of zero weights in each projection, and in all projections together."""
    per_layer, zeros, total = [], 0, 0
    for index, layer in enumerate(decoder_layers(model)):
        shares = {}
        for name, linear in projections(layer, index).items():
            layer_zeros = int((linear.weight == 0).sum())
            shares[name] = layer_zeros / max(linear.weight.numel(), 1)
            zeros, total = zeros + layer_zeros, total + linear.weight.numel()
        per_layer.append(shares)
    return per_layer, zeros / max(total, 1)
