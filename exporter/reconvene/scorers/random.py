"""Random pruning: the baseline every scorer must beat. Seeded, so a portfolio rebuilds identically."""
from __future__ import annotations

import torch
import torch.nn as nn

from exporter.reconvene.scorers.base import Batch, Scorer


class Random(Scorer):
    name = "random"
    needs_data = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch | None
               ) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return {name: torch.rand(w.shape, generator=generator) for name, w in weights.items()}
