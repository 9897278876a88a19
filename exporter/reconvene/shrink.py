"""Reconvene's rectifier: make the chosen groups structured, remove what that empties, reinitialize.

The chosen groups keep their best filters whole (dense) and lose the rest; every other layer
keeps its unstructured mask. The emptied filters (and their BN) are then removed by the same
exact structured step DNNShifter uses, which also drops the next layers' inputs that read them.
Layers whose shape changed are reinitialized for their new fan-in and fan-out, and the
unstructured masks that survive are carried over to the smaller model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from exporter.models import classifier_of
from exporter.reconvene.sensitivity import FilterGroup
from exporter.pruning.masks import Masks, apply_masks, batchnorm_masks_of_empty_filters
from exporter.pruning.structured import remove_dead_channels


@dataclass
class LayerDecision:
    layer: str
    structured: bool
    sensitivity: float | None     # None: not a conv filter group the evaluator could rank
    density: float                # the unstructured mask's density for this layer before shrinking
    out_channels: tuple[int, int]  # before, after
    in_channels: tuple[int, int]
    reinitialized: bool

    def to_dict(self) -> dict:
        return {"layer": self.layer, "structured": self.structured, "sensitivity": self.sensitivity,
                "density": round(self.density, 6), "out_channels": list(self.out_channels),
                "in_channels": list(self.in_channels), "reinitialized": self.reinitialized}


@dataclass
class Shrunk:
    model: nn.Module
    masks: Masks                   # unstructured masks of the smaller model (structured layers: all kept)
    decisions: list[LayerDecision]


def shrink(model: nn.Module, copy_of_model: nn.Module, dg: tp.DependencyGraph, masks: Masks,
           convert: list[FilterGroup], ranked: list[FilterGroup]) -> Shrunk:
    """`copy_of_model` (traced as `dg`) made smaller: the groups in `convert` go structured.

    `model`, the original, is only read: unchanged layers take their initial weights from it.
    """
    ranked_masks = {name: mask.clone() for name, mask in masks.ranked.items()}
    for group in convert:
        kept = group.kept_filters()
        for conv in group.convs:
            mask = ranked_masks[conv + ".weight"]
            mask[:] = False
            mask[kept] = True

    # Shrink a copy whose weights are the masks themselves (1 kept, 0 pruned): its zeros are exactly
    # the masked entries, so the masks survive the channel removal exactly, whatever the weights were.
    smaller = copy_of_model.eval()
    with torch.no_grad():
        for name, mask in ranked_masks.items():
            smaller.get_parameter(name).copy_(mask)
    apply_masks(smaller, Masks(ranked_masks, derived=batchnorm_masks_of_empty_filters(smaller, dg)))
    before = _shapes(smaller)
    remove_dead_channels(smaller, None, keep_outputs_of=classifier_of(smaller), dg=dg)
    after = _shapes(smaller)
    new_masks = {name: smaller.get_parameter(name) != 0 for name in ranked_masks}

    changed = {name for name in after if after[name] != before[name]}
    originals = dict(model.named_modules())
    with torch.no_grad():
        for name, module in smaller.named_modules():
            if name in changed:
                module.reset_parameters()  # a fresh draw for the new fan-in and fan-out
            elif name in after:
                module.load_state_dict(originals[name].state_dict())  # unchanged layers keep their initial weights
    apply_masks(smaller, Masks(new_masks))

    sensitivity = {conv: g.sensitivity for g in ranked for conv in g.convs}
    structured = {conv for g in convert for conv in g.convs}
    decisions = [
        LayerDecision(layer=name, structured=name in structured, sensitivity=sensitivity.get(name),
                      density=float(masks.ranked[name + ".weight"].float().mean()),
                      out_channels=(before[name][0], after[name][0]), in_channels=(before[name][1], after[name][1]),
                      reinitialized=name in changed)
        for name, module in smaller.named_modules() if isinstance(module, nn.Conv2d) and name + ".weight" in masks.ranked
    ]
    return Shrunk(model=smaller, masks=Masks(new_masks), decisions=decisions)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """(out, in) channels of every conv and linear, (features,) of every norm layer, by module name."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = (module.out_channels, module.in_channels)
        elif isinstance(module, nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            shapes[name] = (module.num_features,)
    return shapes
