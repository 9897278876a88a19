"""GraSP (Wang et al., 2020): keep the weights whose removal would most reduce gradient flow.

The score is w * (H g), H the loss Hessian and g its gradient, computed as a Hessian-vector
product with the gradient held constant. GraSP removes the highest -w*(Hg); ranking by w*(Hg) and
keeping the top is the same thing. Logits are divided by a temperature (200, as in the paper).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from exporter.reconvene.scorers.base import Batch, Scorer, gradients

TEMPERATURE = 200.0


class GraSP(Scorer):
    name = "grasp"

    def scores(self, model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch | None
               ) -> dict[str, torch.Tensor]:
        params = list(weights.values())
        constant = [g.detach() for g in gradients(model, weights, batch, temperature=TEMPERATURE)]
        grads = gradients(model, weights, batch, create_graph=True, temperature=TEMPERATURE)
        hessian_times_g = torch.autograd.grad(sum((g * c).sum() for g, c in zip(grads, constant)), params)
        return {name: (w * hg).detach() for (name, w), hg in zip(weights.items(), hessian_times_g)}
