"""VGG-16 with batch norm for 32x32 inputs, following OpenLTH's CIFAR plan."""

from __future__ import annotations

import torch
from torch import nn

# Numbers are 3x3 conv + BN + ReLU output widths, "M" a 2x2 max-pool.
VGG16_PLAN: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)


def scale_channels(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class VGG(nn.Module):
    def __init__(
        self,
        plan: tuple[int | str, ...],
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        arch: str = "vgg",
    ) -> None:
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in plan:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_channels = scale_channels(int(entry), width)
            layers += [
                nn.Conv2d(channels, out_channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def vgg16(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> VGG:
    return VGG(VGG16_PLAN, num_classes, width, in_channels, arch="vgg16")
