"""A deployed site's data: the node config's `data-path`, an npz in MedMNIST's layout (as
`python -m partitions.split` writes) or an image folder. The site trains on its train
split and evaluates on its own held-out arrays; the server never sees site data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.config import RunConfig
from partitions.inputs import as_protocol, reference_inputs
from partitions.medmnist_data import (
    MULTI_LABEL,
    DataError,
    MedMNISTData,
    Split,
    dataset_spec,
    medmnist_info,
    validate_npz,
    validate_split,
)
from partitions.split import META_KEY

if TYPE_CHECKING:
    from partitions.site_data import SiteData


@dataclass(frozen=True)
class SiteFolder:
    """The `DataSource` of a deployed site: its own data, prepared once into `cache_dir`
    (memory-mapped afterwards) when a state folder is given."""

    data_path: str
    cache_dir: str | None = None

    def load(self, cfg: RunConfig) -> tuple[SiteData, dict]:
        return deployment_site_data(cfg, self.data_path, self.cache_dir)


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
    # here, not at the top: PyTorch loads only for training (a site's pre-flight check reads its data without it)
    from partitions.site_data import SiteData, to_tensors

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


def read_image(file: str, channels: int, size: int) -> np.ndarray:
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
        loader=lambda file: read_image(file, channels, size),
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
