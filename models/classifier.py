"""Pre-activation ResNet-20 (CIFAR style), the classifier every method shares.

One definition for FusedSpaceFed and all baselines keeps comparisons like for like.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("batch", "group")
GROUPS = 8  # GroupNorm groups per layer (widths 16/32/64 give 2-8 channels a group)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm (running statistics: averaged by FedAvg, recomputable at a site) or
    GroupNorm (per-image statistics: nothing to average, nothing to recompute)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(GROUPS, channels), channels)
    raise ValueError(f"unknown norm {kind!r}: choose one of {NORMS}")


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.bn1 = norm_layer(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        identity = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + identity


class PreActResNet20(nn.Module):
    """3x3 stem to 16 channels, three stages of three blocks (16/32/64, strides 1/2/2)."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 3, norm: str = "batch") -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        width_in = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(PreActBlock(width_in, width, stride if i == 0 else 1, norm))
                width_in = width
        self.stages = nn.Sequential(*layers)
        self.bn = norm_layer(norm, 64)
        self.head = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature the head classifies (what feature-space methods work on)."""
        out = self.stages(self.stem(x))
        out = torch.relu(self.bn(out))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
