"""SGD training with momentum and a step LR schedule: seeded, deterministic on CPU, masks enforced."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from exporter.data import Dataset
from exporter.pruning.masks import Masks, apply_masks


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the run where the LR drops
    gamma: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    accuracy: float
    iterations: int
    rewind_state: dict | None  # weights at the rewind iteration, when one was asked for


def train(model: nn.Module, data: Dataset, config: TrainConfig, masks: Masks | None = None,
          rewind_iteration: int | None = None, description: str = "train", progress: bool = True) -> TrainResult:
    """Train `model` in place; with `masks`, pruned weights stay exactly zero throughout."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(data.train_y) // config.batch_size)
    total_steps = max(1, config.epochs * steps_per_epoch)
    milestones = sorted({int(f * total_steps) for f in config.milestones})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)

    if masks is not None:
        apply_masks(model, masks)
    rewind_state = copy.deepcopy(model.state_dict()) if rewind_iteration == 0 else None
    iteration = 0
    bar = tqdm(total=total_steps, desc=description, unit="it", leave=False, disable=None if progress else True)  # None: quiet when not a terminal
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(data.train_y), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if masks is not None:
                apply_masks(model, masks)
            iteration += 1
            if iteration == rewind_iteration:
                rewind_state = copy.deepcopy(model.state_dict())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return TrainResult(accuracy=evaluate(model, data.test_x, data.test_y), iterations=iteration,
                       rewind_state=rewind_state)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x).argmax(dim=1) == y).float().mean().item()


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with its initial weights fixed by `seed`."""
    torch.manual_seed(seed)
    return build()
