"""Unstructured masks: which weights survive, global magnitude pruning, and their enforcement."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from exporter.pruning.liveness import trace, zero_output_channels


@dataclass
class Masks:
    """Boolean masks by parameter name (True = kept).

    `ranked` covers the conv/linear weights that magnitude pruning ranks; `derived` covers the
    BN gamma/beta behind emptied filters, zeroed as a consequence, never ranked.
    """
    ranked: dict[str, torch.Tensor]
    derived: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def density(self) -> float:
        kept = sum(int(m.sum()) for m in self.ranked.values())
        return kept / sum(m.numel() for m in self.ranked.values())

    def all(self) -> dict[str, torch.Tensor]:
        return {**self.ranked, **self.derived}

    def state_dict(self) -> dict:
        return {"ranked": self.ranked, "derived": self.derived}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Masks":
        return cls(ranked=state["ranked"], derived=state.get("derived", {}))


def prunable_weights(model: nn.Module, classifier: nn.Module | None, include_classifier: bool) -> dict[str, nn.Parameter]:
    """Conv and linear weights, which magnitude pruning ranks. BN and biases are never ranked."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and (include_classifier or module is not classifier)
    }


def full_masks(weights: dict[str, nn.Parameter]) -> Masks:
    return Masks(ranked={name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()})


def global_magnitude_prune(weights: dict[str, nn.Parameter], masks: Masks, fraction: float) -> Masks:
    """New ranked masks that drop exactly `fraction` of the surviving weights, smallest magnitudes first, across all layers."""
    if not 0 < fraction < 1:
        raise ValueError(f"prune fraction must be in (0, 1), got {fraction}")
    surviving = sum(int(m.sum()) for m in masks.ranked.values())
    scores = {name: w.detach().abs() for name, w in weights.items()}
    return keep_top_scores(scores, surviving - int(round(fraction * surviving)), among=masks)


def keep_top_scores(scores: dict[str, torch.Tensor], keep: int, among: Masks | None = None) -> Masks:
    """Masks keeping exactly the `keep` highest-scoring entries across all tensors (of those `among` keeps).

    The global ranking shared by IMP's magnitude criterion and every pruning-at-init scorer.
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten() for n in names])
    low, high = torch.aminmax(flat)
    if not (torch.isfinite(low) and torch.isfinite(high)):  # nan propagates into both
        raise ValueError("pruning scores are not all finite (nan or inf); the scorer overflowed")
    if among is None:
        kept, index, values = torch.ones_like(flat, dtype=torch.bool), None, flat
    else:
        kept = torch.cat([among.ranked[n].flatten() for n in names])
        index = torch.nonzero(kept).flatten()
        values = flat[index]
    if not 0 <= keep <= values.numel():
        raise ValueError(f"cannot keep {keep} of {values.numel()} weights")
    # Select whichever side is smaller: top-k over millions of scores costs with k.
    drop = values.numel() - keep
    if keep < drop:
        chosen = torch.topk(values, keep, sorted=False).indices
        kept = torch.zeros_like(kept)
        kept[chosen if index is None else index[chosen]] = True
    elif drop > 0:
        dropped = torch.topk(values, drop, largest=False, sorted=False).indices
        kept[dropped if index is None else index[dropped]] = False

    ranked, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        ranked[n] = kept[offset:offset + size].view(scores[n].shape).clone()  # own storage: masks get saved
        offset += size
    return Masks(ranked=ranked)


def with_batchnorm_of_empty_filters(model: nn.Module, masks: Masks, example_input: torch.Tensor) -> Masks:
    """Add masks for the BN gamma/beta of every channel whose input is provably zero under `masks`.

    An emptied filter followed by BN still emits ReLU(beta - gamma*mean/std); zeroing gamma and
    beta makes the channel exactly zero, so the structured step can remove it without changing
    one output. IMP retrains with these masks enforced, so accuracy is measured with them.
    """
    probe = copy.deepcopy(model).eval()  # tracing a training-mode model would move its BN statistics
    apply_masks(probe, Masks(ranked=masks.ranked))
    dg = trace(probe, example_input)
    return Masks(ranked=masks.ranked, derived=batchnorm_masks_of_empty_filters(probe, dg))


def batchnorm_masks_of_empty_filters(masked_model: nn.Module, dg: tp.DependencyGraph) -> dict[str, torch.Tensor]:
    """BN gamma/beta masks for the channels of an already-masked model that are provably zero."""
    zero = zero_output_channels(dg, bn_as_masked=True)
    derived = {}
    for name, module in masked_model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module in zero:
            derived[f"{name}.weight"] = ~zero[module]
            derived[f"{name}.bias"] = ~zero[module]
    return derived


def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every masked-out parameter entry in place."""
    all_masks = masks.all()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in all_masks:
                p.mul_(all_masks[name])
