"""SNIP (Lee et al., 2019): connection sensitivity |g * w| of the loss on one calibration batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from exporter.reconvene.scorers.base import Batch, Scorer, gradients


class SNIP(Scorer):
    name = "snip"

    def scores(self, model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch | None
               ) -> dict[str, torch.Tensor]:
        grads = gradients(model, weights, batch)
        return {name: (g * w).detach().abs() for (name, w), g in zip(weights.items(), grads)}
