"""SynFlow (Tanaka et al., 2020): iterative synaptic flow pruning, data-free.

Each round makes every parameter non-negative, feeds an all-ones input, and scores each weight
by |w * dR/dw| with R the sum of the outputs; the density falls exponentially over the rounds to
the target. Batch norm runs in eval mode, so the network is the linear map the method assumes.
Products of |w| over many layers can overflow float32 (deep ResNets): then it reruns in float64.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from exporter.device import device_of
from exporter.reconvene.scorers.base import Batch, Scored, Scorer, kept_count
from exporter.pruning.masks import keep_top_scores


class SynFlow(Scorer):
    name = "synflow"
    needs_data = False

    def __init__(self, rounds: int = 100, input_shape: tuple[int, ...] | None = None):
        self.rounds = rounds
        self.input_shape = input_shape  # one example's shape; taken from the batch when None

    def scores(self, model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch | None
               ) -> dict[str, torch.Tensor]:
        """One round's scores: single-shot SynFlow."""
        return self._in_range(model, weights, batch, lambda ones: _flow(model, weights, ones))

    def prune(self, model: nn.Module, weights: dict[str, nn.Parameter], density: float, batch: Batch | None
              ) -> Scored:
        return self._in_range(model, weights, batch, lambda ones: self._rounds(weights, density, ones, model))

    def _rounds(self, weights: dict[str, nn.Parameter], density: float, ones: torch.Tensor, model: nn.Module
                ) -> Scored:
        original = {name: w.detach().clone() for name, w in weights.items()}
        masks = None
        for round_index in range(1, self.rounds + 1):
            if masks is not None:
                with torch.no_grad():
                    for name, w in weights.items():
                        torch.mul(original[name], masks.ranked[name], out=w.data)
            keep = kept_count(weights, density ** (round_index / self.rounds))
            scores = _flow(model, weights, ones)
            masks = keep_top_scores(scores, keep, among=masks)
        return Scored(masks, scores)

    def _in_range(self, model: nn.Module, weights: dict[str, nn.Parameter], batch: Batch | None, run):
        shape = self.input_shape or (tuple(batch[0].shape[1:]) if batch is not None else None)
        if shape is None:
            raise ValueError("SynFlow needs the input shape (it uses no data, only its shape)")
        initial = copy.deepcopy(model.state_dict())
        for dtype in (torch.float32, torch.float64):
            model.load_state_dict(initial)
            model.to(dtype).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.abs_()
            try:
                return run(torch.ones((1, *shape), dtype=dtype, device=device_of(model)))
            except OverflowError:
                continue
        raise ValueError("SynFlow scores overflow even in float64; the network is too deep for it")


def _flow(model: nn.Module, weights: dict[str, nn.Parameter], ones: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    flow = model(ones).sum()
    if not torch.isfinite(flow):
        raise OverflowError
    flow.backward()
    scores = {name: (w.grad * w).detach().abs() for name, w in weights.items()}
    if not all(torch.isfinite(s.max()) for s in scores.values()):
        raise OverflowError
    return scores
