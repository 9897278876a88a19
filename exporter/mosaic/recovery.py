"""Recovery: a short masked fine-tune that makes a composite variant usable again.

Removing heads and neurons, then half the remaining weights, leaves a model whose perplexity is
several times its parent's. A few hundred next-token steps on the calibration text (never the
evaluation text) bring most of it back. Only the decoder layers' projections train, and each keeps
its pruning mask: a gradient is zeroed where the weight is zero and the weight is masked again
after every step, so the recovered model has exactly the sparsity and shapes it was pruned to
(embeddings, norms and the head stay as they were: a head tied to the embeddings would otherwise
move the vocabulary of every variant).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from exporter.device import device_of
from exporter.mosaic.load import decoder_layers, projections


@dataclass(frozen=True)
class RecoveryConfig:
    steps: int = 100              # optimizer steps; 0 turns recovery off
    lr: float = 5e-5              # AdamW learning rate, cosine-decayed to zero
    batch_windows: int = 1        # calibration windows per step
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"recovery steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"recovery learning rate must be > 0, got {self.lr}")
        if self.batch_windows < 1:
            raise ValueError(f"recovery batch must hold at least one window, got {self.batch_windows}")


@dataclass(frozen=True)
class RecoveryReport:
    steps: int
    seconds: float
    loss_before: float            # mean next-token loss on the calibration windows
    loss_after: float


def recover(model: nn.Module, calib: torch.Tensor, config: RecoveryConfig) -> RecoveryReport:
    """Fine-tune `model`'s decoder projections in place on `calib` windows [n, context], masks kept."""
    config.validate()
    device = device_of(model)
    windows = calib.to(device)
    linears = [m for layer in decoder_layers(model) for m in projections(layer).values()]
    masks = [(m.weight != 0) for m in linears]
    trained = [m.weight for m in linears]
    frozen = [p for p in model.parameters() if all(p is not w for w in trained)]
    states = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    started = time.perf_counter()
    try:
        before = mean_loss(model, windows)
        if config.steps:
            _train(model, windows, trained, masks, config)
        after = mean_loss(model, windows)
    finally:
        for p, state in zip(frozen, states):
            p.requires_grad_(state)
        model.train(was_training)
    return RecoveryReport(config.steps, round(time.perf_counter() - started, 2), before, after)


def _train(model: nn.Module, windows: torch.Tensor, weights: list[torch.Tensor], masks: list[torch.Tensor],
           config: RecoveryConfig) -> None:
    hooks = [weight.register_hook(lambda grad, mask=mask: grad * mask) for weight, mask in zip(weights, masks)]
    optimizer = torch.optim.AdamW(weights, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    batches = _batches(len(windows), config)
    model.train()
    try:
        for _ in range(config.steps):
            loss = _next_token_loss(model, windows[next(batches).to(windows.device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for weight, mask in zip(weights, masks):
                    weight.mul_(mask)
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()


def _batches(count: int, config: RecoveryConfig) -> Iterator[torch.Tensor]:
    """Window indices, `batch_windows` at a time, through a fresh seeded permutation per pass."""
    order = torch.Generator().manual_seed(config.seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < config.batch_windows:
            pending = torch.cat([pending, torch.randperm(count, generator=order)])
        yield pending[:config.batch_windows]
        pending = pending[config.batch_windows:]


def mean_loss(model: nn.Module, windows: torch.Tensor) -> float:
    """The mean next-token cross-entropy over `windows`, one window at a time."""
    model.eval()
    with torch.no_grad():
        losses = [float(_next_token_loss(model, window.unsqueeze(0))) for window in windows]
    return sum(losses) / len(losses)


def _next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
