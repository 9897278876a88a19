"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and second stage for 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s)
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8, minimum: int = 8) -> int:
    """Round to the nearest multiple of divisor, never below minimum nor more than 10% below value."""
    rounded = max(minimum, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(in_channels, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, out_channels, 1)
        self.block = nn.Sequential(*layers)
        # Fixed at construction, so tracing sees a constant, not data-dependent control flow.
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        self.arch = "mobilenetv2"
        channels = make_divisible(STEM_CHANNELS * width)
        layers: list[nn.Module] = [*conv_bn(in_channels, channels, 3), nn.ReLU6(inplace=True)]
        for expansion, base_channels, repeats, first_stride in CIFAR_SETTINGS:
            out_channels = make_divisible(base_channels * width)
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        last_channels = make_divisible(LAST_CHANNELS * max(1.0, width))
        layers += [*conv_bn(channels, last_channels, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def mobilenetv2(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, width, in_channels)
