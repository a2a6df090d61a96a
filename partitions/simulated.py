"""A simulated site's data: partition `partition-id` of a MedMNIST training set, and its
evaluation data (the official test and validation splits plus a test shard with the
site's label distribution). Caches are keyed by everything the data depends on, so one
Ray actor that serves many sites loads each dataset file only once. The server's own
evaluation data and partition summary come from the same caches."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from core.config import RunConfig
from core.protocol import PROTOCOLS
from core.seeds import local_shard_seed
from partitions.inputs import as_protocol
from partitions.medmnist_data import MedMNISTData, load_medmnist
from partitions.partitioners import local_test_indices, partition_indices, partition_labels
from partitions.site_data import SiteData, to_tensors
from partitions.tensors import TensorSplit


@dataclass(frozen=True)
class SimulatedPartition:
    """The `DataSource` of a simulated site: site `site_id` of `num_sites`."""

    site_id: int
    num_sites: int

    def load(self, cfg: RunConfig) -> tuple[SiteData, dict]:
        return simulation_site_data(cfg, self.site_id, self.num_sites), {}


@lru_cache(maxsize=4)
def cached_dataset(name: str, root: str, size: int, download: bool, protocol: str = "standard") -> MedMNISTData:
    """The dataset file, loaded once per process; its inputs as the protocol feeds them."""
    data = load_medmnist(name, root, size=size, download=download)
    return as_protocol(data, PROTOCOLS[protocol].reference_inputs)


@lru_cache(maxsize=4)
def evaluation_splits(
    name: str, root: str, size: int, download: bool, protocol: str = "standard"
) -> tuple[TensorSplit, TensorSplit]:
    data = cached_dataset(name, root, size, download, protocol)
    return to_tensors(data["test"], data.spec.multi_label), to_tensors(data["val"], data.spec.multi_label)


@lru_cache(maxsize=8)
def cached_partition(
    name: str, root: str, size: int, download: bool, scheme: str, num_sites: int, alpha: float, k: int, seed: int
) -> tuple[np.ndarray, ...]:
    labels = partition_labels(cached_dataset(name, root, size, download)["train"].labels)
    return tuple(partition_indices(labels, scheme, num_sites, alpha=alpha, classes_per_site=k, seed=seed))


def dataset_key(cfg: RunConfig) -> tuple[str, str, int, bool]:
    return (cfg.dataset, cfg.data_root, cfg.image_size, cfg.download)


def inputs_key(cfg: RunConfig) -> tuple[str, str, int, bool, str]:
    """`dataset_key` plus the protocol, which decides what the model is fed."""
    return (*dataset_key(cfg), cfg.protocol)


def partition_key(cfg: RunConfig, num_sites: int) -> tuple:
    return (*dataset_key(cfg), cfg.partition, num_sites, cfg.alpha, cfg.classes_per_client, cfg.seed)


def simulation_site_data(cfg: RunConfig, site_id: int, num_sites: int) -> SiteData:
    """Site `site_id` of `num_sites`: its training partition and its evaluation data."""
    if not 0 <= site_id < num_sites:
        raise ValueError(f"partition-id {site_id} is outside 0..{num_sites - 1}")
    data = cached_dataset(*inputs_key(cfg))
    parts = cached_partition(*partition_key(cfg, num_sites))
    train_idx = parts[site_id]
    multi = data.spec.multi_label
    test, val = evaluation_splits(*inputs_key(cfg))
    shard = local_test_indices(
        partition_labels(data["test"].labels),
        partition_labels(data["train"].labels)[train_idx],
        num_sites,
        seed=local_shard_seed(cfg.seed, site_id),
    )
    return SiteData(
        spec=data.spec,
        train=to_tensors(data["train"], multi, train_idx),
        test=test,
        val=val,
        local_test=to_tensors(data["test"], multi, shard),
    )
