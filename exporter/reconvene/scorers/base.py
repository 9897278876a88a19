"""The scorer interface: scores for one-shot ranking, masks at a density."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from exporter.pruning.masks import Masks, keep_top_scores

Batch = tuple[torch.Tensor, torch.Tensor]  # calibration inputs and their labels


@dataclass
class Scored:
    masks: Masks
    scores: dict[str, torch.Tensor]  # what the final ranking ranked by; higher = more worth keeping


class Scorer:
    name: ClassVar[str]
    needs_data: ClassVar[bool] = True

    def scores(self, model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch | None
               ) -> dict[str, torch.Tensor]:
        """One score per weight entry; higher means more worth keeping."""
        raise NotImplementedError

    def prune(self, model: nn.Module, weights: dict[str, nn.Parameter], density: float, batch: Batch | None
              ) -> Scored:
        """Global masks keeping exactly round(density * total) entries. `model` may be changed: pass a copy."""
        scores = self.scores(model, weights, batch)
        return Scored(keep_top_scores(scores, kept_count(weights, density)), scores)


def kept_count(weights: dict[str, nn.Parameter], density: float) -> int:
    total = sum(w.numel() for w in weights.values())
    return max(1, int(round(density * total)))


def gradients(model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch, create_graph: bool = False,
              temperature: float = 1.0) -> list[torch.Tensor]:
    """d(cross-entropy)/d(weight) on the calibration batch, in `weights` order."""
    inputs, labels = batch
    loss = nn.functional.cross_entropy(model(inputs) / temperature, labels)
    return list(torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph))
