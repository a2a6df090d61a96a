"""Loading MedMNIST 2D datasets from a data root in medmnist's own npz layout.

Metadata (task, channels, labels) comes from medmnist's INFO, so every 2D flag works.
Files are validated before use; a missing file is downloaded through medmnist when the
network allows, and otherwise the error names the file and where to put it.
"""

from __future__ import annotations

import functools
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.metrics import MULTI_LABEL

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset file is missing, corrupt or does not match its metadata."""


@functools.cache
def _medmnist_table() -> dict:
    """medmnist's INFO, from its plain-data module `medmnist.info` alone: the package's
    `__init__` also imports its datasets (PyTorch, pandas), about 4 CPU-s that a site's
    pre-flight check and the split command would spend on a table of names."""
    spec = importlib.util.find_spec("medmnist")
    folders = list(spec.submodule_search_locations or []) if spec else []
    info_file = Path(folders[0]) / "info.py" if folders else None
    if info_file is None or not info_file.is_file():  # another layout: the package as documented
        from medmnist import INFO

        return INFO
    info_spec = importlib.util.spec_from_file_location("fusedspacefed_medmnist_info", info_file)
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return module.INFO


def medmnist_info(flag: str) -> dict:
    """medmnist's metadata for a 2D flag, with a clear error for anything else."""
    info = _medmnist_table()
    flags_2d = sorted(k for k in info if not k.endswith("3d"))
    if flag not in info or flag.endswith("3d"):
        raise DataError(f"unknown dataset {flag!r}; MedMNIST 2D datasets are: {', '.join(flags_2d)}")
    return info[flag]


IMAGE_SIZES = (28, 64, 128, 224)  # the sizes MedMNIST+ offers for 2D datasets


def npz_filename(flag: str, size: int) -> str:
    """medmnist's file naming: `bloodmnist.npz` at 28 px, `bloodmnist_64.npz` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, C, H, W); labels as int64 (N,) or, for multi-label, (N, L)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and a loss need to know about a dataset."""

    name: str
    task: str
    num_classes: int
    channels: int
    image_size: int
    class_names: tuple[str, ...]

    @property
    def multi_label(self) -> bool:
        return self.task == MULTI_LABEL


@dataclass(frozen=True)
class MedMNISTData:
    spec: DatasetSpec
    splits: dict[str, Split]

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


def dataset_spec(flag: str, size: int = 28) -> DatasetSpec:
    """What the model needs, from medmnist's metadata alone (no data file required)."""
    info = medmnist_info(flag)
    num_classes = len(info["label"])
    return DatasetSpec(
        name=flag,
        task=info["task"],
        num_classes=num_classes,
        channels=int(info["n_channels"]),
        image_size=size,
        class_names=tuple(info["label"][str(i)] for i in range(num_classes)),
    )


def _download(flag: str, info: dict, root: Path, size: int) -> None:
    import medmnist

    cls = getattr(medmnist, info["python_class"])
    root.mkdir(parents=True, exist_ok=True)
    cls(split="train", root=str(root), download=True, size=size)


def load_medmnist(flag: str, root: str | Path, size: int = 28, download: bool = True) -> MedMNISTData:
    """Load and validate `<root>/<flag>[_<size>].npz`, downloading it if missing and allowed."""
    info = medmnist_info(flag)
    if size not in IMAGE_SIZES:
        raise DataError(f"image size {size} is not offered by MedMNIST; choose one of {IMAGE_SIZES}")
    root = Path(root).expanduser()
    path = root / npz_filename(flag, size)
    if not path.exists():
        reason = "download disabled (download = false)"
        if download:
            try:
                _download(flag, info, root, size)
            except Exception as exc:  # no network, HTTP error, disk: all end the same way
                reason = f"download failed: {type(exc).__name__}: {exc}"
        if not path.exists():
            raise DataError(
                f"dataset file {path} is missing and could not be obtained ({reason}). "
                f"Put the official MedMNIST file {npz_filename(flag, size)} into {root.resolve()} "
                "or set data-root to the folder that holds it."
            )
    return validate_npz(path, flag, info, size)


def validate_npz(path: Path, flag: str, info: dict, size: int) -> MedMNISTData:
    """Check keys, dtypes, shapes and label ranges against medmnist's metadata."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"dataset file {path} is corrupt or not an npz archive ({exc}); replace it") from exc

    splits = {}
    for split in SPLITS:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in arrays:
                raise DataError(f"dataset file {path} has no array {key!r} (found {sorted(arrays)})")
        splits[split] = validate_split(
            path, split, arrays[f"{split}_images"], arrays[f"{split}_labels"], flag, info, size
        )
    return MedMNISTData(spec=dataset_spec(flag, size), splits=splits)


def validate_split(
    path: Path, split: str, images: np.ndarray, labels: np.ndarray, flag: str, info: dict, size: int
) -> Split:
    """Check one split's images and labels against medmnist's metadata; channels first."""
    channels = int(info["n_channels"])
    num_classes = len(info["label"])
    multi_label = info["task"] == MULTI_LABEL
    expected = (size, size) if channels == 1 else (size, size, channels)
    if images.ndim not in (3, 4) or images.shape[1:] != expected:
        raise DataError(
            f"{path}: {split}_images has shape {images.shape}, expected (N, {', '.join(map(str, expected))})"
        )
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images has dtype {images.dtype}, expected uint8")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} {split} images but {len(labels)} labels")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        # a float label such as 2.7 would be truncated to class 2 without a word
        raise DataError(f"{path}: {split}_labels has dtype {labels.dtype}, expected integers (class indices)")
    labels = labels.reshape(len(labels), -1).astype(np.int64)
    if multi_label:
        if labels.shape[1] != num_classes or not np.isin(labels, (0, 1)).all():
            raise DataError(f"{path}: {split}_labels must be {num_classes} binary columns for {flag}")
    else:
        if labels.shape[1] != 1:
            raise DataError(f"{path}: {split}_labels has {labels.shape[1]} columns, expected 1")
        labels = labels[:, 0]
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(
                f"{path}: {split}_labels range {labels.min()}..{labels.max()} is outside 0..{num_classes - 1}"
            )
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return Split(images=images, labels=labels)
