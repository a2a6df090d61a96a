"""Progressively fused columns (FuseFL, Tang et al. NeurIPS 2024): one pre-activation
ResNet-20 column per site, cut into K levels; after stage k every site's level k is frozen
and shared, and a site's level k+1 reads all columns' level-k outputs through its own
adapter (a 1 x 1 convolution over their concatenation, FuseFL's `cnn1x1`). The fused
model's feature is the sum of the columns' pooled features, classified by one head.

Levels are contiguous runs of a column's ten units (stem, nine residual blocks); the last
level also owns the column's final norm. `level_units` says which units make each level,
so the key logic in core/stages.py and this module agree.
"""

from __future__ import annotations

import torch
from torch import nn

from core.stages import COLUMN_UNITS, level_units
from models.classifier import PreActResNet20


class FusedColumns(nn.Module):
    """N columns of K levels, adapters for levels 1..K-1, the fused model's head."""

    def __init__(self, in_channels: int, num_classes: int, columns: int, levels: int, norm: str = "batch") -> None:
        super().__init__()
        self.levels = levels
        self.columns = nn.ModuleList([PreActResNet20(in_channels, num_classes, norm=norm) for _ in range(columns)])
        if len(self.units(0)) != COLUMN_UNITS:
            raise ValueError(f"a column has {len(self.units(0))} units, core.stages expects {COLUMN_UNITS}")
        widths = [self.level_width(level) for level in range(levels)]
        self.adapters = nn.ModuleList(
            [
                nn.ModuleList([nn.Conv2d(columns * widths[level - 1], widths[level - 1], 1) for _ in range(columns)])
                for level in range(1, levels)
            ]
        )
        self.head = nn.Linear(self.columns[0].feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def units(self, column: int) -> list[nn.Module]:
        net = self.columns[column]
        return [net.stem, *net.stages]

    def level_width(self, level: int) -> int:
        """Channels a level's last unit puts out."""
        last = self.units(0)[level_units(self.levels)[level][-1]]
        return last.out_channels if isinstance(last, nn.Conv2d) else last.conv2.out_channels

    def run_level(self, column: int, level: int, x: torch.Tensor) -> torch.Tensor:
        units = self.units(column)
        for index in level_units(self.levels)[level]:
            x = units[index](x)
        return x

    def fused(self, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Every column's output after the fused levels 0..upto-1."""
        outs = [self.run_level(j, 0, x) for j in range(len(self.columns))]
        for level in range(1, upto):
            joined = torch.cat(outs, dim=1)
            outs = [self.run_level(j, level, self.adapters[level - 1][j](joined)) for j in range(len(self.columns))]
        return outs

    def pooled(self, column: int, x: torch.Tensor) -> torch.Tensor:
        net = self.columns[column]
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(net.bn(x)), 1), 1)

    def stage_features(self, x: torch.Tensor, stage: int, column: int) -> torch.Tensor:
        """What site `column` trains in stage `stage` (0-based): the fused levels before it
        (frozen), then its own column from level `stage` on, reading all columns through its
        adapter at that level."""
        if stage == 0:
            g = self.run_level(column, 0, x)
        else:
            with torch.no_grad():
                joined = torch.cat(self.fused(x, stage), dim=1)
            g = self.run_level(column, stage, self.adapters[stage - 1][column](joined))
        for level in range(stage + 1, self.levels):
            g = self.run_level(column, level, g)
        return self.pooled(column, g)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused model's feature: the sum of every column's pooled feature."""
        outs = self.fused(x, self.levels)
        return torch.stack([self.pooled(j, out) for j, out in enumerate(outs)]).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class StageModel(nn.Module):
    """A site's model during a stage (what it evaluates before the columns are all fused)."""

    def __init__(self, net: FusedColumns, stage: int, column: int) -> None:
        super().__init__()
        self.net, self.stage, self.column = net, stage, column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.columns[self.column].head(self.net.stage_features(x, self.stage, self.column))


def build(in_channels: int, num_classes: int, norm: str, cfg) -> FusedColumns:
    """The classifier of a progressive-fusion run (the contract's `classifier_builder`)."""
    return FusedColumns(in_channels, num_classes, cfg.fusefl_columns, cfg.fusefl_blocks, norm)
