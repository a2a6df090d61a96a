"""A split held as tensors: uint8 images scaled to [0, 1] per batch.

Images stay uint8 in memory (a quarter of float32) and are converted batch by batch,
with no PIL and no per-sample Python work, which is what makes CPU simulation affordable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class TensorSplit:
    """A site's images (uint8, N x C x H x W) and labels (int64 N, or float N x L)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled mini-batches when a generator is given, in order otherwise."""
        n = len(self)
        if generator is None:
            for start in range(0, n, batch_size):
                yield to_float(self.images[start : start + batch_size]), self.labels[start : start + batch_size]
            return
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield to_float(self.images[idx]), self.labels[idx]

    def first(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A deterministic random batch of up to `count` samples."""
        idx = torch.randperm(len(self), generator=generator)[:count]
        return to_float(self.images[idx]), self.labels[idx]


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)
