"""A site's data as its trainer and its evaluation see it, and where it comes from.

`SiteData` is what every method trains and evaluates on. A `DataSource` gives it; there
are two, chosen once from the node config (partitions/sources.py):
- `SimulatedPartition` (partitions/simulated.py): a partition of a MedMNIST training set by
  `partition-id`, evaluated on the official test and validation splits plus a personalised
  test shard;
- `SiteFolder` (partitions/deployed.py): a deployed site's own `data-path`, an npz in
  MedMNIST's layout or an image folder, evaluated on its own held-out arrays. The server
  never sees site data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from partitions.medmnist_data import DatasetSpec, Split
from partitions.tensors import TensorSplit

if TYPE_CHECKING:
    from core.config import RunConfig


@dataclass
class SiteData:
    spec: DatasetSpec
    train: TensorSplit
    test: TensorSplit  # the official test split (global accuracy)
    val: TensorSplit  # the official validation split (round selection)
    local_test: TensorSplit  # test shard with the site's label distribution (local accuracy)


def to_tensors(split: Split, multi_label: bool, indices: np.ndarray | None = None) -> TensorSplit:
    images, labels = split.images, split.labels
    if indices is not None:
        images, labels = images[indices], labels[indices]
    y = torch.from_numpy(np.ascontiguousarray(labels))
    return TensorSplit(torch.from_numpy(np.ascontiguousarray(images)), y.float() if multi_label else y.long())


class DataSource(Protocol):
    """Where a site's data comes from: the one thing a site asks of it."""

    def load(self, cfg: RunConfig) -> tuple[SiteData, dict]:
        """The site's data for this run, and its split file's metadata ({} where none)."""
        ...
