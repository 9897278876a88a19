"""Reconvene's sensitivity evaluator: how much PaI score a conv layer loses if its sparsity goes structured.

For each group of coupled conv filters (one conv in a plain network; every conv feeding the same
residual sum in a ResNet stage) the unstructured mask keeps some share d of the weights. The
structured alternative keeps whole filters, chosen by their summed scores, at the same density:
a layer whose outputs and inputs both shrink to a share r keeps r^2 of its weights, so it keeps
r = sqrt(d) of its filters. (ceil(d * filters) would hold the density only if the inputs did not
shrink; at d = 1/64 it leaves a 512-filter layer 8 filters, a bottleneck no training recovers.)
Sensitivity = 1 - (score the structured choice keeps) / (score the unstructured mask keeps), the
structured score counting the sqrt(d) share of each kept filter's inputs that survive: near 0
when a few filters already hold the layer's score, near 1 when it is spread over many.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from exporter.pruning.masks import Masks


@dataclass
class FilterGroup:
    root: str                    # the first conv of the group, by the model's module order
    convs: list[str]             # every conv whose output filters are coupled in this group
    filters: int
    density: float               # share of the group's conv weights the unstructured mask keeps
    keep: int                    # filters a structured version keeps, at the same density
    filter_scores: torch.Tensor  # summed score of each filter across the group's convs
    sensitivity: float

    def kept_filters(self) -> torch.Tensor:
        """Indices of the filters a structured version keeps, best first (ties by position)."""
        order = torch.sort(self.filter_scores, descending=True, stable=True).indices
        return order[:self.keep]


def conv_filter_groups(model: nn.Module, dg: tp.DependencyGraph, classifier: nn.Module | None
                       ) -> list[tuple[list[str], int]]:
    """Coupled conv output channels of `model` (traced as `dg`): [(conv names in module order, channel count)]."""
    names = {module: name for name, module in model.named_modules()}
    order = {name: index for index, name in enumerate(names.values())}
    ignored = [classifier] if classifier is not None else []
    groups = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d,)):
        width = len(group[0].idxs)
        convs = sorted({names[item.dep.target.module] for item in group.items
                        if dg.is_out_channel_pruning_fn(item.dep.handler)
                        and isinstance(item.dep.target.module, nn.Conv2d)
                        and len(item.idxs) == width and sorted(item.idxs) == list(range(width))},
                       key=order.get)
        if convs:
            groups.append((convs, width))
    return groups


def rank_layers(groups: list[tuple[list[str], int]], masks: Masks, scores: dict[str, torch.Tensor]
                ) -> list[FilterGroup]:
    """Every group with its sensitivity, least sensitive first (ties by model order: deterministic)."""
    ranked = [_evaluate(convs, width, masks, scores) for convs, width in groups
              if all(name + ".weight" in masks.ranked for name in convs)]
    return sorted(ranked, key=lambda g: g.sensitivity)  # sorted() is stable: ties keep model order


def _evaluate(convs: list[str], filters: int, masks: Masks, scores: dict[str, torch.Tensor]) -> FilterGroup:
    weights = [name + ".weight" for name in convs]
    floor = min(float(scores[w].min()) for w in weights)
    shifted = {w: scores[w].detach().double() - min(floor, 0.0) for w in weights}  # GraSP scores can be negative
    kept = sum(int(masks.ranked[w].sum()) for w in weights)
    total = sum(masks.ranked[w].numel() for w in weights)
    density = kept / total
    keep = max(1, min(filters, math.ceil(math.sqrt(density) * filters)))
    filter_scores = sum(shifted[w].flatten(1).sum(dim=1) for w in weights)
    unstructured = sum(float((shifted[w] * masks.ranked[w]).sum()) for w in weights)
    structured = math.sqrt(density) * float(torch.topk(filter_scores, keep).values.sum())
    sensitivity = 1.0 - structured / unstructured if unstructured > 0 else 0.0
    return FilterGroup(root=convs[0], convs=convs, filters=filters, density=density, keep=keep,
                       filter_scores=filter_scores, sensitivity=sensitivity)
