"""Wanda scores, outlier shares and the sparsity each projection gets (global, OWL's per layer, Mosaic's per
projection, and the public Mosaic code's per layer plus per projection type).

The ratio rule is OWL's: with D the outlier shares, c = (D - min D) / (max D - min D) * 2λ and
sparsity = S - (c - mean c), so more outliers mean less pruning. Two changes make its promises exact:

- Ratios are centred on λ rather than on mean(c) and clipped to [S - λ, S + λ] (and to [0, 1]), so
  no ratio strays further than λ from the target S (OWL's code allows up to 2λ).
- One offset shared by every ratio is solved for (bisection) so that the PARAMETER-WEIGHTED mean
  sparsity is exactly S. Projections differ in size (k/v are small under grouped-query attention,
  the MLP is large), so a plain mean of ratios would miss the target the model is pruned to.

Projection granularity normalises D across ALL projections of the model at once (not within each
projection type), so a type that carries more outliers everywhere (say v_proj) is pruned less than
one that carries few: telling projections apart is the point of Mosaic. Each projection uses its
own outlier share, not its layer's: the paper's reading.

"layer+type" is the public Mosaic code's reading (`adjust_ratio`): a projection's ratio is its
layer's OWL spread plus an offset for its projection type. See `layer_and_type_spread`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exporter.errors import ExportError

GRANULARITIES = ("global", "layer", "projection", "layer+type")
_BISECTION_STEPS = 100


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: each weight's magnitude times the L2 norm of the input column it multiplies."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ExportError(
            f"input norms have shape {list(input_sq_norms.shape)} but the weight has {weight.shape[1]} input "
            "columns: measure the statistics again after resizing a layer (LayerStats.refresh)"
        )
    return weight.detach().abs() * torch.sqrt(input_sq_norms.to(weight.dtype)).unsqueeze(0)


def outlier_share(scores: torch.Tensor | Sequence[torch.Tensor], m: float) -> float:
    """The fraction of scores above m times their mean; several tensors count as one concatenation."""
    check_m(m)
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    count = sum(p.numel() for p in parts)
    if count == 0:
        return 0.0
    mean = sum(float(p.sum(dtype=torch.float64)) for p in parts) / count
    return sum(int((p > m * mean).sum()) for p in parts) / count


@dataclass
class OutlierShares:
    """Outlier shares of the whole model: one per layer (all its projections together, as OWL
    counts them) and one per projection of each layer."""
    by_layer: list[float]
    by_projection: list[dict[str, float]]


def allocate(
    shares: OutlierShares, sizes: list[dict[str, int]], target: float, lam: float, granularity: str
) -> list[dict[str, float]]:
    """The sparsity of every projection, [layer][projection name], from the outlier shares.

    `sizes` gives each projection's weight count, in the same layout. Every ratio lies within
    [target - lam, target + lam] ∩ [0, 1], and the size-weighted mean of all ratios is target.
    """
    check_target(target)
    check_lam(lam)
    check_granularity(granularity)
    if len(sizes) != len(shares.by_projection) or len(sizes) != len(shares.by_layer):
        raise ExportError(
            f"outlier shares cover {len(shares.by_layer)} layers but sizes cover {len(sizes)}: pass both for every layer"
        )
    if granularity == "global":
        return [{name: target for name in layer} for layer in sizes]
    if granularity == "layer":
        per_layer = balanced_ratios(shares.by_layer, [sum(layer.values()) for layer in sizes], target, lam)
        return [{name: ratio for name in layer} for ratio, layer in zip(per_layer, sizes)]
    keys = [(index, name) for index, layer in enumerate(sizes) for name in layer]
    flat_sizes = [sizes[i][name] for i, name in keys]
    if granularity == "projection":
        flat = balanced_ratios([shares.by_projection[i][name] for i, name in keys], flat_sizes, target, lam)
    else:
        spread = layer_and_type_spread(shares, lam)
        flat = fit_spread([spread[i][name] for i, name in keys], flat_sizes, target, lam)
    ratios: list[dict[str, float]] = [{} for _ in sizes]
    for (index, name), ratio in zip(keys, flat):
        ratios[index][name] = ratio
    return ratios


def balanced_ratios(shares: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """One sparsity per unit: more outliers, less sparsity; within target ± lam; size-weighted mean = target."""
    if len(shares) != len(sizes) or not shares:
        raise ExportError(f"need one size per outlier share, got {len(shares)} shares and {len(sizes)} sizes")
    return fit_spread(spread_of(shares, lam), sizes, target, lam)


def spread_of(shares: Sequence[float], lam: float) -> list[float]:
    """OWL's spread: shares mapped linearly onto [-lam, lam], the most outliers at +lam (pruned least)."""
    low, high = min(shares), max(shares)
    if high == low:
        return [0.0] * len(shares)
    return [(share - low) / (high - low) * 2 * lam - lam for share in shares]


def layer_and_type_spread(shares: OutlierShares, lam: float) -> list[dict[str, float]]:
    """The public Mosaic code's allocation, made to keep this module's promises: [layer][projection] spread.

    Each projection gets its layer's OWL spread (the layer's outlier share over all layers, in
    [-lam, lam]) plus its type's: the type's mean outlier share over the layers, mapped over the
    types onto [-lam, lam] (the type with the most outliers, pruned least, at +lam). `fit_spread`
    then clips every ratio to target ± lam and shifts them all so the parameter-weighted mean is
    the target.

    What the public code (`lib/prune_all.py::adjust_ratio`) does instead: it normalises each
    type's per-layer shares to c^p in [0, 2lam] and returns the layer's c minus mean(c^p), so the
    type offset is the mean of the type's NORMALISED profile: it measures how the type's shares
    are spread over the layers, not how many outliers the type has, and a type whose shares sit
    near its own maximum is pruned more. Its ratios may stray 2lam from the target and its mean
    sparsity drifts from it. Here the offset orders types by their outlier shares, as OWL orders
    layers, the ratios stay within lam, and the weighted mean is exact. The paper's reading, each
    projection its own share, is granularity "projection".
    """
    if len(shares.by_layer) != len(shares.by_projection) or not shares.by_layer:
        raise ExportError(
            f"outlier shares cover {len(shares.by_layer)} layers but {len(shares.by_projection)} have projection "
            "shares: measure both for every layer"
        )
    names = list(dict.fromkeys(name for layer in shares.by_projection for name in layer))
    type_mean = {
        name: sum(layer[name] for layer in shares.by_projection if name in layer)
        / sum(name in layer for layer in shares.by_projection)
        for name in names
    }
    by_type = dict(zip(names, spread_of([type_mean[name] for name in names], lam)))
    by_layer = spread_of(shares.by_layer, lam)
    return [{name: layer_spread + by_type[name] for name in layer} for layer_spread, layer in
            zip(by_layer, shares.by_projection)]


def fit_spread(spread: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """Ratios target + offset - spread, clipped to target ± lam (and [0, 1]), with the one offset
    that makes their size-weighted mean exactly target."""
    if len(spread) != len(sizes) or not spread:
        raise ExportError(f"need one size per unit, got {len(spread)} spreads and {len(sizes)} sizes")
    if lam == 0 or sum(sizes) <= 0 or max(spread) == min(spread):
        return [target] * len(spread)
    floor, ceiling = max(0.0, target - lam), min(1.0, target + lam)
    total = float(sum(sizes))

    def ratios_at(offset: float) -> list[float]:
        return [min(ceiling, max(floor, target + offset - s)) for s in spread]

    def weighted_mean(offset: float) -> float:
        return sum(size * r for size, r in zip(sizes, ratios_at(offset))) / total

    # At the low end every ratio clips to the floor (<= target), at the high end to the ceiling
    # (>= target), and the weighted mean is continuous and non-decreasing in the offset: bisection
    # finds the exact offset.
    reach = lam + max(abs(s) for s in spread)
    below, above = -reach, reach
    for _ in range(_BISECTION_STEPS):
        middle = (below + above) / 2
        if weighted_mean(middle) < target:
            below = middle
        else:
            above = middle
    return ratios_at((below + above) / 2)


def check_target(target: float) -> None:
    if not 0 <= target < 1:
        raise ExportError(f"sparsity must be in [0, 1), got {target}")


def check_lam(lam: float) -> None:
    if not lam >= 0:
        raise ExportError(f"lam must be >= 0, got {lam}: it is how far a ratio may stray from the target sparsity")


def check_m(m: float) -> None:
    if not m > 0:
        raise ExportError(f"m must be > 0, got {m}: a score is an outlier when it exceeds m times the mean score")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ExportError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
