"""Non-IID partitions of a training set over sites (method.md section 5).

`dirichlet`, `pathological` and `iid` use flwr-datasets' partitioners; `dirichlet-equal`
(the reference code's scheme) is ours. All are deterministic given the seed and return
one array of training-set indices per site.
"""

from __future__ import annotations

import numpy as np

from core.config import PARTITION_SCHEMES as SCHEMES


class PartitionError(ValueError):
    """An impossible partition configuration."""


def _check(scheme: str, labels: np.ndarray, num_sites: int, alpha: float, classes_per_site: int) -> None:
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if num_sites < 1:
        raise PartitionError(f"need at least one site, got {num_sites}")
    if num_sites > len(labels):
        raise PartitionError(
            f"{num_sites} sites but only {len(labels)} training samples: every site needs at least one sample"
        )
    if scheme.startswith("dirichlet") and not alpha > 0:
        raise PartitionError(f"Dirichlet alpha must be > 0, got {alpha}")
    num_classes = len(np.unique(labels))
    if scheme == "pathological" and not 1 <= classes_per_site <= num_classes:
        raise PartitionError(
            f"classes-per-client must be between 1 and the {num_classes} classes present, got {classes_per_site}"
        )


def _with_flwr_datasets(scheme: str, labels: np.ndarray, num_sites: int, alpha: float, k: int, seed: int):
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    table = Dataset.from_dict({"label": labels.tolist(), "index": np.arange(len(labels)).tolist()})
    if scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_sites,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min(10, len(labels) // num_sites),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif scheme == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=num_sites,
            partition_by="label",
            num_classes_per_partition=k,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = IidPartitioner(num_partitions=num_sites)
    partitioner.dataset = table
    try:
        parts = [np.asarray(partitioner.load_partition(i).with_format("numpy")["index"]) for i in range(num_sites)]
    except ValueError as exc:
        raise PartitionError(f"{scheme} partition with {num_sites} sites failed: {exc}") from exc
    if scheme == "iid":  # IidPartitioner splits in order; shuffle so sites are not contiguous blocks
        order = np.random.default_rng(seed).permutation(len(labels))
        parts = [order[p] for p in parts]
    return parts


def _dirichlet_equal(labels: np.ndarray, num_sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Every site gets N/K samples following a Dir(alpha) class preference.

    Pools are drawn without replacement. Unlike the reference code, which drops samples
    when a class pool runs dry, the shortfall is refilled from the classes that still
    have samples (by the site's preference, else by what is left), so every training
    sample is assigned exactly once.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    sizes = np.full(num_sites, len(labels) // num_sites)
    sizes[: len(labels) % num_sites] += 1
    parts = []
    for size in sizes:
        preference = rng.dirichlet(np.full(len(classes), alpha))
        take = dict.fromkeys(classes, 0)
        remaining = int(size)
        while remaining > 0:
            room = np.array([len(pools[c]) - take[c] for c in classes], dtype=float)
            weights = preference * (room > 0)
            if weights.sum() <= 0:
                weights = room
            counts = rng.multinomial(remaining, weights / weights.sum())
            for c, n, r in zip(classes, counts, room):
                granted = int(min(n, r))
                take[c] += granted
                remaining -= granted
        parts.append(np.concatenate([[pools[c].pop() for _ in range(take[c])] for c in classes]).astype(np.int64))
    return parts


def partition_indices(
    labels: np.ndarray,
    scheme: str,
    num_sites: int,
    *,
    alpha: float = 0.5,
    classes_per_site: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Training-set indices per site, sorted, deterministic in `seed`."""
    labels = np.asarray(labels)
    _check(scheme, labels, num_sites, alpha, classes_per_site)
    if scheme == "dirichlet-equal":
        parts = _dirichlet_equal(labels, num_sites, alpha, seed)
    else:
        parts = _with_flwr_datasets(scheme, labels, num_sites, alpha, classes_per_site, seed)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(
            f"{scheme} partition left sites {empty} without samples; use fewer sites or a larger alpha"
        )
    return [np.sort(p) for p in parts]


def local_test_indices(
    test_labels: np.ndarray, train_labels: np.ndarray, num_sites: int, seed: int, shard_size: int | None = None
) -> np.ndarray:
    """A site's personalised test shard: drawn from the test split with the site's
    training label distribution (method.md section 4), without replacement per class."""
    rng = np.random.default_rng(seed)
    shard_size = shard_size or max(1, len(test_labels) // num_sites)
    classes, counts = np.unique(train_labels, return_counts=True)
    shares = counts / counts.sum()
    pools = [np.flatnonzero(test_labels == c) for c in classes]
    # shrink the shard rather than distort its label distribution when a class pool is small
    fits = [len(pool) / share for pool, share in zip(pools, shares) if share > 0]
    shard_size = int(min([shard_size, *fits]))
    wanted = np.floor(shares * shard_size).astype(int)
    wanted[np.argmax(counts)] += shard_size - wanted.sum()
    chosen = [rng.choice(pool, size=min(n, len(pool)), replace=False) for pool, n in zip(pools, wanted)]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.array([], dtype=np.int64)


def partition_labels(labels: np.ndarray) -> np.ndarray:
    """One integer label per sample for partitioning.

    Multi-label data (ChestMNIST) is partitioned on its first positive finding, with
    samples that have none ("no finding") as an extra class L.
    """
    if labels.ndim == 1:
        return labels
    has_any = labels.any(axis=1)
    return np.where(has_any, labels.argmax(axis=1), labels.shape[1])
