"""Magnitude at initialization: the baseline that ranks by |w| before any training."""
from __future__ import annotations

import torch
import torch.nn as nn

from exporter.reconvene.scorers.base import Batch, Scorer


class Magnitude(Scorer):
    name = "magnitude"
    needs_data = False

    def scores(self, model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch | None
               ) -> dict[str, torch.Tensor]:
        return {name: w.detach().abs() for name, w in weights.items()}
