"""A site's data, for simulated and deployed sites, loaded once per process.

In simulation a site is a partition of a MedMNIST training set (by `partition-id`);
its evaluation data are the official test and validation splits plus its personalised
test shard. Caches are keyed by everything the data depends on, so one Ray actor that
serves many sites loads each dataset file only once.

In a deployment a site reads its own data from the node config's `data-path`: an npz
in MedMNIST's layout (as `python -m partitions.split` writes) or an image folder, and
evaluates on its own held-out arrays. The server never sees site data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig
from core.protocol import PROTOCOLS
from core.seeds import local_shard_seed
from partitions.medmnist_data import (
    MULTI_LABEL,
    DataError,
    DatasetSpec,
    MedMNISTData,
    Split,
    dataset_spec,
    input_spec,
    load_medmnist,
    medmnist_info,
    partition_labels,
    reference_inputs,
    validate_npz,
    validate_split,
)
from partitions.partitioners import local_test_indices, partition_indices
from partitions.split import META_KEY
from partitions.tensors import TensorSplit


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
def cached_dataset(name: str, root: str, size: int, download: bool, protocol: str = "standard") -> MedMNISTData:
    """The dataset file, loaded once per process; its inputs as the protocol feeds them."""
    data = load_medmnist(name, root, size=size, download=download)
    return as_protocol(data, PROTOCOLS[protocol].reference_inputs)


def as_protocol(data: MedMNISTData, to_reference_inputs: bool) -> MedMNISTData:
    """`data` itself, or with the reference protocol's 32-px 3-channel inputs."""
    if not to_reference_inputs:
        return data
    splits = {name: reference_inputs(split) for name, split in data.splits.items()}
    return MedMNISTData(spec=input_spec(data.spec.name, data.spec.image_size, True), splits=splits)


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


# -- deployment: the site's own data (node config `data-path`) ------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
FOLDER_HOLDOUT = (("val", 0.1), ("test", 0.2))  # carved per class from a plain class-folder site


@dataclass(frozen=True)
class SiteFile:
    """A site's own data: its splits, an optional personalised test shard, and, for
    files written by `python -m partitions.split`, where they came from."""

    data: MedMNISTData
    local_test: Split | None
    meta: dict


def deployment_site_data(
    cfg: RunConfig, data_path: str | Path, cache_dir: str | Path | None = None
) -> tuple[SiteData, dict]:
    """A SuperNode's data from its own `data-path` (an npz in MedMNIST's layout, or an
    image folder): it trains on the train split and evaluates on its own held-out data.
    With `cache_dir`, the validated arrays are prepared once and memory-mapped afterwards."""
    path = str(Path(data_path).expanduser())
    if cache_dir:
        site = cached_site_file(path, cfg.dataset, cfg.image_size, cfg.seed, str(cache_dir))
    else:
        site = load_site_file(path, cfg.dataset, cfg.image_size, cfg.seed)
    if cfg.rules.reference_inputs:  # the reference protocol's inputs (method.md section 7)
        local = reference_inputs(site.local_test) if site.local_test is not None else None
        site = SiteFile(as_protocol(site.data, True), local, site.meta)
    multi = site.data.spec.multi_label
    test = to_tensors(site.data["test"], multi)
    data = SiteData(
        spec=site.data.spec,
        train=to_tensors(site.data["train"], multi),
        test=test,
        val=to_tensors(site.data["val"], multi),
        local_test=to_tensors(site.local_test, multi) if site.local_test is not None else test,
    )
    if len(data.train) == 0:
        raise DataError(f"site data {data_path} has no training samples")
    return data, site.meta


def load_site_file(path: str, dataset: str, image_size: int, seed: int = 0) -> SiteFile:
    """Load and validate a site's data (npz file or image folder); errors name the path."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"site data-path {p} does not exist (node config 'data-path' of this SuperNode). Point it at the "
            "site's npz file (python -m partitions.split writes them) or at an image folder with one "
            "sub-folder per class."
        )
    info = medmnist_info(dataset)
    if p.is_dir():
        return _load_image_folder(p, dataset, info, image_size, seed)
    data = validate_npz(p, dataset, info, image_size)
    with np.load(p, allow_pickle=False) as npz:
        meta = json.loads(str(npz[META_KEY])) if META_KEY in npz.files else {}
        local = None
        if "local_test_images" in npz.files and "local_test_labels" in npz.files:
            local = validate_split(
                p, "local_test", npz["local_test_images"], npz["local_test_labels"], dataset, info, image_size
            )
    if meta.get("dataset", dataset) != dataset:
        raise DataError(f"site file {p} holds {meta['dataset']!r} data but the run's dataset is {dataset!r}")
    return SiteFile(data=data, local_test=local, meta=meta)


# -- prepared once, memory-mapped after: a site's data cache ------------------------------

CACHE_FORMAT = 1


def _content_key(path: Path, dataset: str, image_size: int, seed: int) -> str:
    """sha256 of a file's bytes, or of a folder's listing (names, sizes, modification
    times: re-reading every image would cost what the cache saves), plus what the
    prepared arrays depend on."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{dataset}|{image_size}|{seed}|".encode())
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def _split_arrays(site: SiteFile) -> dict[str, np.ndarray]:
    splits = {**site.data.splits, **({"local_test": site.local_test} if site.local_test is not None else {})}
    arrays = {}
    for name, split in splits.items():
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split.images, split.labels
    return arrays


def cached_site_file(path: str, dataset: str, image_size: int, seed: int, cache_root: str) -> SiteFile:
    """`load_site_file` through a cache under `cache_root`, keyed by the data's content:
    the first message validates and writes plain .npy files (atomically, as a folder
    renamed into place); later messages memory-map them (no decompression, no image
    decoding, no validation pass)."""
    source = Path(path)
    if not source.exists():
        return load_site_file(path, dataset, image_size, seed)  # its error names the path
    folder = Path(cache_root) / _content_key(source, dataset, image_size, seed)
    if (folder / "meta.json").exists():
        return _prepared(str(folder), dataset, image_size)
    site = load_site_file(path, dataset, image_size, seed)
    arrays = _split_arrays(site)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_mkdirs(folder.parent)))
    try:
        for name, values in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(values), allow_pickle=False)
        meta = {"arrays": list(arrays), "local_test": site.local_test is not None, "site_meta": site.meta}
        (tmp / "meta.json").write_text(json.dumps({**meta, "source": path}))
        os.replace(tmp, folder)
    except OSError:  # another process prepared it first, or the disk is full: the loaded data is right
        shutil.rmtree(tmp, ignore_errors=True)
    return site


@lru_cache(maxsize=4)
def _prepared(folder: str, dataset: str, image_size: int) -> SiteFile:
    """A prepared cache entry, memory-mapped (copy-on-write: tensors may be made from it).
    Keyed by its content-named folder, so a process never serves a replaced file's data."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    arrays = {name: np.load(Path(folder) / f"{name}.npy", mmap_mode="c") for name in meta["arrays"]}
    splits = {s: Split(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in ("train", "val", "test")}
    local = Split(arrays["local_test_images"], arrays["local_test_labels"]) if meta["local_test"] else None
    return SiteFile(MedMNISTData(dataset_spec(dataset, image_size), splits), local, meta["site_meta"])


def _mkdirs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _class_index(folder: str, class_names: list[str], path: Path) -> int:
    """A class folder's label: its index ("0", "1", ...) or the class name (any case,
    spaces or underscores) from medmnist's metadata."""

    def norm(name: str) -> str:
        return "".join(ch for ch in name.lower() if ch.isalnum())

    if folder.isdigit() and int(folder) < len(class_names):
        return int(folder)
    names = {norm(n): i for i, n in enumerate(class_names)}
    if norm(folder) in names:
        return names[norm(folder)]
    raise DataError(
        f"image folder {path}: sub-folder {folder!r} is not a class of this dataset; use the class index "
        f"(0..{len(class_names) - 1}) or one of {class_names}"
    )


def _read_image(file: str, channels: int, size: int) -> np.ndarray:
    """One image as uint8 (C, H, W): converted to the dataset's channels, resized to `size`."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"image {file} cannot be read ({type(exc).__name__}: {exc})") from exc
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _folder_split(root: Path, class_names: list[str], channels: int, size: int) -> Split:
    """`root/<class>/**/<image>` through torchvision's ImageFolder; a class folder is
    named by the class index or the class name."""
    from torchvision.datasets import ImageFolder

    class SiteImageFolder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            subs = sorted(d.name for d in Path(directory).iterdir() if d.is_dir() and not d.name.startswith("."))
            return subs, {sub: _class_index(sub, class_names, root) for sub in subs}

    folder = SiteImageFolder(
        str(root),
        loader=lambda file: _read_image(file, channels, size),
        is_valid_file=lambda file: file.lower().endswith(IMAGE_SUFFIXES),
        allow_empty=True,
    )
    images = np.empty((len(folder), channels, size, size), dtype=np.uint8)
    for i in range(len(folder)):
        images[i] = folder[i][0]
    return Split(images=images, labels=np.array(folder.targets, dtype=np.int64))


def _load_image_folder(path: Path, dataset: str, info: dict, size: int, seed: int) -> SiteFile:
    """`path/<class>/<images>` (val and test carved per class: 10 % and 20 %, seeded),
    or `path/train/<class>/...` with `val/` and `test/` beside it."""
    if info["task"] == MULTI_LABEL:
        raise DataError(f"image folder {path}: {dataset} is multi-label; class folders cannot express it, use an npz")
    names = [info["label"][str(i)] for i in range(len(info["label"]))]
    channels = int(info["n_channels"])
    if (path / "train").is_dir():
        splits = {"train": _folder_split(path / "train", names, channels, size)}
        for split in ("val", "test"):
            part = path / split
            splits[split] = (
                _folder_split(part, names, channels, size)
                if part.is_dir()
                else Split(splits["train"].images[:0], splits["train"].labels[:0])
            )
        if len(splits["test"]) == 0:
            raise DataError(f"image folder {path} has train/ but no test/ images to evaluate on")
    else:
        every = _folder_split(path, names, channels, size)
        rng = np.random.default_rng(seed)
        chosen = {name: [] for name, _ in FOLDER_HOLDOUT}
        train = []
        for c in np.unique(every.labels):
            idx = rng.permutation(np.flatnonzero(every.labels == c))
            start = 0
            for name, share in FOLDER_HOLDOUT:
                n = int(round(share * len(idx))) if len(idx) >= 3 else 0
                chosen[name].append(idx[start : start + n])
                start += n
            train.append(idx[start:])

        def take(parts: list[np.ndarray]) -> Split:
            idx = np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)
            return Split(every.images[idx], every.labels[idx])

        splits = {"train": take(train), **{name: take(chosen[name]) for name, _ in FOLDER_HOLDOUT}}
    if len(splits["train"]) == 0:
        raise DataError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders")
    return SiteFile(data=MedMNISTData(spec=dataset_spec(dataset, size), splits=splits), local_test=None, meta={})


def site_data_for(cfg: RunConfig, node_config) -> tuple[SiteData, dict]:
    """This node's data: its own `data-path` (deployment) or its `partition-id` of the
    configured dataset (simulation); returns the data and the site file's metadata."""
    data_path = str(node_config.get("data-path", "") or "")
    if data_path:
        state_dir = str(node_config.get("state-dir", "") or "")
        return deployment_site_data(cfg, data_path, Path(state_dir) / "data-cache" if state_dir else None)
    if "partition-id" not in node_config:
        raise DataError(
            "this SuperNode's node config has no 'data-path' (a deployed site's own data file or image folder) "
            "and no 'partition-id' (a simulated site): start it with --node-config 'data-path=\"/path/site.npz\" "
            'site-name="..." state-dir="/path/state"\''
        )
    site_id = int(node_config["partition-id"])
    num_sites = int(node_config.get("num-partitions", 1))
    return simulation_site_data(cfg, site_id, num_sites), {}
