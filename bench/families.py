"""Model families nobody here wrote (transformers vision models built from config), with dead structure
planted the way IMP leaves it: a share of each conv's filters zeroed, and the BN right behind them masked.

Shared by tests/test_structured_families.py (exactness and removal floors) and bench/structured.py
--families (share of the planted channels removed, max |diff|, step time).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn


class Logits(nn.Module):
    """A transformers image classifier as a plain module: pixels in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def plant_dead_filters(model: nn.Module, share: float = 0.3, seed: int = 0) -> int:
    """Zero `share` of every plain conv's filters (and mask the BN behind them); how many filters were planted."""
    generator = torch.Generator().manual_seed(seed)
    modules = list(model.modules())
    planted = 0
    with torch.no_grad():
        for index, module in enumerate(modules):
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
            if not (isinstance(module, nn.Conv2d) and module.groups == 1 and module.out_channels > 4):
                continue
            dead = torch.randperm(module.out_channels, generator=generator)[:int(share * module.out_channels)]
            module.weight[dead] = 0
            if module.bias is not None:
                module.bias[dead] = 0
            behind = modules[index + 1] if index + 1 < len(modules) else None
            if isinstance(behind, nn.BatchNorm2d) and behind.num_features == module.out_channels:
                behind.weight[dead] = 0
                behind.bias[dead] = 0
            planted += len(dead)
    return planted


def families() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    """name: (a seeded Logits model from config, channels the step must at least remove)."""
    import transformers as t

    def seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Logits(build()).eval()
        return make

    return {
        "resnet": (seeded(lambda: t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10))), 40),
        "mobilenetv2": (seeded(lambda: t.MobileNetV2ForImageClassification(t.MobileNetV2Config(
            depth_multiplier=0.35, num_labels=10, image_size=64))), 300),
        "efficientnet": (seeded(lambda: t.EfficientNetForImageClassification(t.EfficientNetConfig(  # squeeze-excite
            width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=10, image_size=64))), 120),
        "regnet": (seeded(lambda: t.RegNetForImageClassification(t.RegNetConfig(  # grouped convs
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8,
            num_labels=10))), 25),
        "mobilevit": (seeded(lambda: t.MobileViTForImageClassification(t.MobileViTConfig(  # convs around attention
            image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160],
            num_labels=10))), 100),
        # Weight-standardized convs and GroupNorm subclasses with their own forward: weights that prove
        # nothing about what the layer computes, so nothing may go.
        "bit": (seeded(lambda: t.BitForImageClassification(t.BitConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_groups=4,
            layer_type="bottleneck", num_labels=10))), 0),
        # LayerNorm over channels reads every channel: removing one changes the mean, so nothing may go.
        "convnext": (seeded(lambda: t.ConvNextForImageClassification(t.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10))), 0),
    }
