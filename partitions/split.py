"""Split a MedMNIST dataset into per-site files, with the simulation's partitioners.

    python -m partitions.split --dataset breastmnist --data-root data/medmnist \\
        --num-sites 3 --partition dirichlet-equal --alpha 0.05 --seed 0 --out sites/

writes `sites/site-0.npz` ... `sites/site-2.npz` and `sites/partition.json` (+ .png).
Each site file is in MedMNIST's own npz layout (`train_images`, `train_labels`, `val_*`,
`test_*`), so a SuperNode loads it with `--node-config 'data-path="sites/site-0.npz"'`.
Its training arrays are exactly the indices simulation site i trains on (same
partitioner, same seed). Its held-out arrays depend on `--holdout`:

- `shared` (default): the official val and test splits in full, plus `local_test_*`, the
  personalised test shard the simulation draws for that site. A deployment then reports
  the same metrics as the simulation (global accuracy on the official test split through
  each site's encoder, local accuracy on the shard).
- `local`: val and test are shards drawn from the official splits with the site's
  training label distribution (as a hospital's own held-out data would be). Shards of
  different sites may overlap.

A `site_meta` entry (a JSON string) records where the file came from.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from core.files import atomic_write_bytes
from core.seeds import VAL_SHARD_OFFSET, local_shard_seed
from partitions.medmnist_data import DataError, MedMNISTData, load_medmnist
from partitions.partitioners import SCHEMES, PartitionError, local_test_indices, partition_indices, partition_labels
from partitions.summary import write_summary

HOLDOUTS = ("shared", "local")
META_KEY = "site_meta"


def _medmnist_layout(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) back to medmnist's (N, H, W) or (N, H, W, C)."""
    return images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)


def _labels_column(labels: np.ndarray) -> np.ndarray:
    return labels.reshape(len(labels), 1) if labels.ndim == 1 else labels


def site_arrays(
    data: MedMNISTData,
    parts: list[np.ndarray],
    site: int,
    *,
    holdout: str = "shared",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The arrays of site `site`'s file (medmnist layout), without metadata."""
    num_sites = len(parts)
    train_labels = partition_labels(data["train"].labels)[parts[site]]
    out: dict[str, np.ndarray] = {}

    def put(split: str, source: str, idx: np.ndarray | None) -> None:
        src = data[source]
        images, labels = (src.images, src.labels) if idx is None else (src.images[idx], src.labels[idx])
        out[f"{split}_images"] = np.ascontiguousarray(_medmnist_layout(images)).astype(np.uint8)
        out[f"{split}_labels"] = np.ascontiguousarray(_labels_column(labels)).astype(np.uint8)

    put("train", "train", parts[site])
    shard = local_test_indices(
        partition_labels(data["test"].labels), train_labels, num_sites, seed=local_shard_seed(seed, site)
    )
    if holdout == "shared":
        put("val", "val", None)
        put("test", "test", None)
        put("local_test", "test", shard)
    elif holdout == "local":
        val_shard = local_test_indices(
            partition_labels(data["val"].labels),
            train_labels,
            num_sites,
            seed=local_shard_seed(seed, site, VAL_SHARD_OFFSET),
        )
        put("val", "val", val_shard)
        put("test", "test", shard)
    else:
        raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
    return out


def write_site_file(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write an npz atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays, **{META_KEY: np.array(json.dumps(meta))})
    atomic_write_bytes(path, buffer.getvalue())


def split_dataset(
    dataset: str,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    num_sites: int,
    partition: str = "dirichlet-equal",
    alpha: float = 0.05,
    classes_per_site: int = 2,
    seed: int = 0,
    image_size: int = 28,
    holdout: str = "shared",
    download: bool = False,
    show: bool = True,
) -> list[Path]:
    """Write one file per site into `out_dir`; returns their paths."""
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
    data = load_medmnist(dataset, data_root, size=image_size, download=download)
    labels = partition_labels(data["train"].labels)
    parts = partition_indices(labels, partition, num_sites, alpha=alpha, classes_per_site=classes_per_site, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(data.spec.class_names) + (["no finding"] if data.spec.multi_label else [])
    write_summary(labels, parts, out, partition, names, show=show)
    paths = []
    for site in range(num_sites):
        meta = {
            "dataset": dataset,
            "image_size": image_size,
            "site": site,
            "num_sites": num_sites,
            "partition": partition,
            "alpha": alpha,
            "classes_per_client": classes_per_site,
            "seed": seed,
            "holdout": holdout,
        }
        path = out / f"site-{site}.npz"
        write_site_file(path, site_arrays(data, parts, site, holdout=holdout, seed=seed), meta)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partitions.split",
        description="Split a MedMNIST dataset into per-site npz files with the simulation's partitioners.",
    )
    parser.add_argument("--dataset", required=True, help="MedMNIST 2D flag, e.g. breastmnist")
    parser.add_argument("--data-root", default="data/medmnist", help="folder holding <dataset>[_<size>].npz")
    parser.add_argument("--out", required=True, help="output folder for site-<i>.npz")
    parser.add_argument("--num-sites", type=int, required=True)
    parser.add_argument("--partition", default="dirichlet-equal", choices=SCHEMES)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--classes-per-client", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--holdout", default="shared", choices=HOLDOUTS)
    parser.add_argument("--download", action="store_true", help="download the dataset file if it is missing")
    args = parser.parse_args(argv)
    try:
        paths = split_dataset(
            args.dataset,
            args.data_root,
            args.out,
            num_sites=args.num_sites,
            partition=args.partition,
            alpha=args.alpha,
            classes_per_site=args.classes_per_client,
            seed=args.seed,
            image_size=args.image_size,
            holdout=args.holdout,
            download=args.download,
        )
    except (DataError, PartitionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
