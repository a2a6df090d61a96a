"""A site's model outside a federated round: what onboarding and prediction share.

`load_run_model` reads a run's global model (a run folder, its `global_model.pt` with the
`config.json` beside it, or a server checkpoint `round-<N>.pt`) and the configuration it
was trained with. `read_unlabeled_images` reads a site's images (an npz, or a folder of
image files at any nesting) and checks them against the run's dataset. `build_site_model`
puts the global arrays into a site's model; `private_keys` names what stays at the site.

Checkpoints are read here with `torch.load` (weights only), never through the server's
code: the site side does not import the server side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client_app.state import StateError
from core.config import ConfigError, RunConfig
from core.files import round_files
from core.methods import contract_for
from core.run_folder import CONFIG_FILE, RunFolder, RunFolderError, read_json
from core.seeds import private_init_seed
from models import SiteModel, build_run_model
from partitions.deployed import IMAGE_SUFFIXES, read_image
from partitions.inputs import input_spec, reference_inputs
from partitions.medmnist_data import DataError, DatasetSpec, Split, dataset_spec
from partitions.split import META_KEY  # the JSON metadata (`site_meta`) in a site's npz

GLOBAL_MODEL = "global_model.pt"
CHECKPOINT_DIR = "checkpoints"
NPZ_ARRAYS = ("images", "train_images")  # arrays of an npz read by default, first found wins


class SiteModelError(ValueError):
    """A model file, its configuration or a site's state does not fit what was asked."""


#: what the site commands report as one clear line (exit status 2) instead of a traceback
CLI_ERRORS = (SiteModelError, DataError, StateError, ConfigError)


def add_common_arguments(parser: argparse.ArgumentParser, batch_size: int | None, batch_help: str) -> None:
    """The options `onboard` and `predict` share."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads (0: PyTorch's choice)")
    parser.add_argument("--array", default=None, help="the npz array to read (default: 'images', else 'train_images')")


def run_cli(call: Callable[[], object]) -> int:
    """Run a command; its expected errors become one line `error: ...` and exit status 2."""
    try:
        call()
    except CLI_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


@dataclass(frozen=True)
class RunModel:
    """A run's global (shared) arrays, the configuration they were trained with, and the
    round they come from."""

    cfg: RunConfig
    shared: dict[str, torch.Tensor]
    server_round: int
    source: Path  # the file the arrays were read from

    @property
    def spec(self) -> DatasetSpec:
        """The dataset's own images (what a site's files hold)."""
        return dataset_spec(self.cfg.dataset, self.cfg.image_size)

    @property
    def input_spec(self) -> DatasetSpec:
        """What the model sees (32-px 3-channel under the reference protocol)."""
        return input_spec(self.cfg.dataset, self.cfg.image_size, self.cfg.rules.reference_inputs)


@dataclass(frozen=True)
class SiteImages:
    """Unlabeled images as uint8 (N, C, H, W) and, for a folder, each file's relative path."""

    images: np.ndarray
    names: list[str] | None  # None for an npz: rows are named by their index
    source: Path


# -- the run's model -------------------------------------------------------------------


def load_run_model(path: str | Path) -> RunModel:
    """A run folder (its `global_model.pt`, else its newest checkpoint), a `global_model.pt`
    (with `config.json` beside it) or a checkpoint file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / GLOBAL_MODEL).is_file():
            return _read_model_file(p / GLOBAL_MODEL)
        checkpoints = round_files(p / CHECKPOINT_DIR)
        if checkpoints:
            return _read_model_file(checkpoints[-1][1])
        raise SiteModelError(
            f"model folder {p} has no {GLOBAL_MODEL} (written when a run finishes) and no "
            f"{CHECKPOINT_DIR}/round-<N>.pt; pass a run's folder (<results-dir>/<run-name>), its {GLOBAL_MODEL} "
            "or a server checkpoint file"
        )
    if not p.is_file():
        raise SiteModelError(
            f"model {p} does not exist; pass a run's folder, its {GLOBAL_MODEL} or a server checkpoint"
        )
    return _read_model_file(p)


def _read_model_file(path: Path) -> RunModel:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SiteModelError(f"model file {path} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from exc
    if isinstance(payload, dict) and {"arrays", "config", "round"} <= set(payload):
        cfg = _config(payload["config"], path)
        run_name = str(payload.get("run_name") or cfg.run_name)
        return RunModel(cfg.replace(run_name=run_name), _tensors(payload["arrays"], path), int(payload["round"]), path)
    return _global_model(path, payload)


def _global_model(path: Path, payload: Any) -> RunModel:
    """A `global_model.pt` (a plain state_dict); its configuration is `config.json` beside
    it, its round the last row of `metrics.jsonl` (else the configured number of rounds)."""
    arrays = _tensors(payload, path)
    config_path = path.parent / CONFIG_FILE
    if not config_path.is_file():
        raise SiteModelError(
            f"{path} is a plain model file and {config_path} (the run's configuration) is missing; keep the "
            "run's folder together or pass a server checkpoint, which holds its configuration"
        )
    try:
        mapping = read_json(config_path)
    except RunFolderError as exc:
        raise SiteModelError(f"run configuration {config_path} cannot be read ({exc})") from exc
    cfg = _config(mapping, config_path)
    if not cfg.run_name:
        cfg = cfg.replace(run_name=path.parent.name)
    return RunModel(cfg, arrays, _last_round(path.parent, cfg), path)


def _last_round(run_dir: Path, cfg: RunConfig) -> int:
    try:
        rows = RunFolder(run_dir).rows()
    except RunFolderError:  # an unreadable history: the configured length is the best guess
        rows = []
    rounds = [row["round"] for row in rows if isinstance(row.get("round"), int)]
    return max(rounds) if rounds else cfg.num_server_rounds


def _config(mapping: Any, where: Path) -> RunConfig:
    if not isinstance(mapping, dict):
        raise SiteModelError(f"{where} holds no run configuration")
    try:
        return RunConfig.from_mapping(dict(mapping))
    except ConfigError as exc:
        raise SiteModelError(f"the run configuration in {where} does not fit this code: {exc}") from exc


def _tensors(value: Any, where: Path) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not value or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise SiteModelError(f"{where} holds no model arrays (expected a state_dict of tensors)")
    return dict(value)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


# -- the site's model ------------------------------------------------------------------


def site_number(site_name: str) -> int:
    """A stable number for a site name (seeds its fresh private parts)."""
    return int(hashlib.sha256(site_name.encode()).hexdigest(), 16) % 10**6


def build_site_model(run: RunModel, site_name: str) -> SiteModel:
    """The run's model for this site: private parts freshly initialised (seeded by the
    site name), shared parts from the run. Errors say when the arrays do not fit."""
    cfg = run.cfg
    shared = cfg.fused and cfg.shared_encoder_init
    model = build_run_model(
        cfg,
        run.input_spec,
        seed=private_init_seed(cfg.seed, site_number(site_name), shared),
        contract=contract_for(cfg.method),
    )
    expected = model.state_dict()
    shared = contract_for(cfg.method).shared_keys(model, cfg.head_blocks)
    missing, unexpected = sorted(set(shared) - set(run.shared)), sorted(set(run.shared) - set(shared))
    if missing or unexpected:
        raise SiteModelError(
            f"{run.source} does not hold the shared arrays of a {cfg.method} model (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}); is it from another method or code version?"
        )
    for key in shared:
        if run.shared[key].shape != expected[key].shape:
            raise SiteModelError(
                f"{run.source}: array {key} has shape {tuple(run.shared[key].shape)}, but a {cfg.method} model for "
                f"{cfg.dataset} at image-size {cfg.image_size} (its config) has {tuple(expected[key].shape)}; the "
                "model file and its configuration are from different runs"
            )
    model.load_state_dict({**expected, **run.shared})
    return model


def private_keys(model: SiteModel, cfg: RunConfig) -> list[str]:
    """State_dict keys that stay at the site (the method contract's complement of what it shares)."""
    shared = set(contract_for(cfg.method).shared_keys(model, cfg.head_blocks))
    return [k for k in model.state_dict() if k not in shared]


# -- the site's images -----------------------------------------------------------------


def read_unlabeled_images(
    path: str | Path, spec: DatasetSpec, array: str | None = None, reference: bool = False
) -> SiteImages:
    """Images for `spec` (the run's dataset): an npz (array `array`, else `images` or
    `train_images`; labels are not needed) in MedMNIST's layout (N, H, W) or (N, H, W, C),
    or a folder of image files at any nesting (converted and resized like a site's image
    folder). An npz must already have the run's size and channels."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = _read_folder(p, spec)
    elif not p.is_file():
        raise DataError(f"images {p} do not exist; pass an npz file or a folder of images")
    else:
        found = _read_npz(p, spec, array)
    if reference:  # the reference protocol's inputs: 32 x 32, 3 channels
        images = reference_inputs(Split(found.images, np.zeros(len(found.images), dtype=np.int64))).images
        found = SiteImages(images, found.names, found.source)
    return found


def _read_folder(root: Path, spec: DatasetSpec) -> SiteImages:
    files = sorted(
        f
        for f in root.rglob("*")
        if f.is_file()
        and f.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) at any depth")
    size = spec.image_size
    images = np.empty((len(files), spec.channels, size, size), dtype=np.uint8)
    for i, file in enumerate(files):
        images[i] = read_image(str(file), spec.channels, size)
    return SiteImages(images, [f.relative_to(root).as_posix() for f in files], root)


def _read_npz(path: Path, spec: DatasetSpec, array: str | None) -> SiteImages:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            key = array or next((k for k in NPZ_ARRAYS if k in names), None)
            if key is None or key not in names:
                wanted = repr(array) if array else " or ".join(repr(k) for k in NPZ_ARRAYS)
                raise DataError(f"{path} has no array {wanted} (found {sorted(names)})")
            images = npz[key]
            meta = json.loads(str(npz[META_KEY])) if META_KEY in names else {}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} is not a readable npz file ({type(exc).__name__}: {_first_line(exc)})") from exc
    source = meta.get("dataset") if isinstance(meta, dict) else None
    if source and source != spec.name:
        raise DataError(
            f"{path} holds {source} images (its {META_KEY}), but the model is from a {spec.name} run; use the "
            f"model of a {source} run, or images of {spec.name}"
        )
    return SiteImages(_channels_first(images, path, key, spec), None, path)


def _channels_first(images: np.ndarray, path: Path, key: str, spec: DatasetSpec) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) (MedMNIST's layout; (N, C, H, W) is accepted too) checked
    against the run's dataset, as uint8 (N, C, H, W)."""
    where = f"{path}: array {key!r}"
    size, channels = spec.image_size, spec.channels
    expected = f"(N, {size}, {size})" if channels == 1 else f"(N, {size}, {size}, {channels})"
    if images.dtype != np.uint8:
        raise DataError(f"{where} has dtype {images.dtype}; expected uint8 pixel values 0..255")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] <= 4:
        images = images.transpose(0, 3, 1, 2)
    elif not (images.ndim == 4 and images.shape[1] <= 4):
        raise DataError(f"{where} has shape {images.shape}; expected {expected} images for {spec.name}")
    if len(images) == 0:
        raise DataError(f"{where} holds no images")
    if images.shape[1] != channels:
        raise DataError(
            f"{where} has {images.shape[1]} channel{'s' * (images.shape[1] != 1)}, the run's dataset {spec.name} "
            f"has {channels} (expected {expected})"
        )
    if images.shape[2:] != (size, size):
        h, w = images.shape[2:]
        raise DataError(
            f"{where} holds {h}x{w} images, the run's model expects {size}x{size} ({spec.name} at image-size "
            f"{size}; expected {expected}); resize them, or pass a folder of image files, which is resized"
        )
    return np.ascontiguousarray(images)
