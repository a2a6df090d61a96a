"""A site's data, loaded once per process and reused across rounds.

In simulation a site is a partition of a MedMNIST training set (by `partition-id`);
its evaluation data are the official test and validation splits plus its personalised
test shard. Caches are keyed by everything the data depends on, so one Ray actor that
serves many sites loads each dataset file only once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from client_app.training import TensorSplit
from core.config import RunConfig
from partitions.medmnist_data import DatasetSpec, MedMNISTData, Split, load_medmnist, partition_labels
from partitions.partitioners import local_test_indices, partition_indices


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


@lru_cache(maxsize=4)
def cached_dataset(name: str, root: str, size: int, download: bool) -> MedMNISTData:
    return load_medmnist(name, root, size=size, download=download)


@lru_cache(maxsize=4)
def _evaluation_splits(name: str, root: str, size: int, download: bool) -> tuple[TensorSplit, TensorSplit]:
    data = cached_dataset(name, root, size, download)
    return to_tensors(data["test"], data.spec.multi_label), to_tensors(data["val"], data.spec.multi_label)


@lru_cache(maxsize=8)
def cached_partition(
    name: str, root: str, size: int, download: bool, scheme: str, num_sites: int, alpha: float, k: int, seed: int
) -> tuple[np.ndarray, ...]:
    labels = partition_labels(cached_dataset(name, root, size, download)["train"].labels)
    return tuple(partition_indices(labels, scheme, num_sites, alpha=alpha, classes_per_site=k, seed=seed))


def dataset_key(cfg: RunConfig) -> tuple[str, str, int, bool]:
    return (cfg.dataset, cfg.data_root, cfg.image_size, cfg.download)


def partition_key(cfg: RunConfig, num_sites: int) -> tuple:
    return (*dataset_key(cfg), cfg.partition, num_sites, cfg.alpha, cfg.classes_per_client, cfg.seed)


def simulation_site_data(cfg: RunConfig, site_id: int, num_sites: int) -> SiteData:
    """Site `site_id` of `num_sites`: its training partition and its evaluation data."""
    if not 0 <= site_id < num_sites:
        raise ValueError(f"partition-id {site_id} is outside 0..{num_sites - 1}")
    data = cached_dataset(*dataset_key(cfg))
    parts = cached_partition(*partition_key(cfg, num_sites))
    train_idx = parts[site_id]
    multi = data.spec.multi_label
    test, val = _evaluation_splits(*dataset_key(cfg))
    shard = local_test_indices(
        partition_labels(data["test"].labels),
        partition_labels(data["train"].labels)[train_idx],
        num_sites,
        seed=cfg.seed * 1000 + site_id,
    )
    return SiteData(
        spec=data.spec,
        train=to_tensors(data["train"], multi, train_idx),
        test=test,
        val=val,
        local_test=to_tensors(data["test"], multi, shard),
    )
