"""Models for the benchmarks, loaded through the exporter's user-model path (`--model bench.models:resnet18`)."""
from __future__ import annotations

import torch
from torch import nn

from exporter.models.resnet import BasicBlock, scale_channels

RESNET18_WIDTHS = (64, 128, 256, 512)
RESNET18_STRIDES = (1, 2, 2, 2)
RESNET18_BLOCKS = (2, 2, 2, 2)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem without max-pool, four stages of two basic blocks, ~11.2M params at width 1."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        self.arch = "resnet18"
        stem_channels = scale_channels(RESNET18_WIDTHS[0], width)
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        channels, stages = stem_channels, []
        for stage_width, stride, blocks in zip(RESNET18_WIDTHS, RESNET18_STRIDES, RESNET18_BLOCKS):
            out_channels = scale_channels(stage_width, width)
            stage = []
            for index in range(blocks):
                stage.append(BasicBlock(channels, out_channels, stride if index == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNet18:
    return ResNet18(num_classes, width, in_channels)
