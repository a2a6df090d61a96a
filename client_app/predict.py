"""Label images at a site with a run's global model and the site's own private parts.

    python -m client_app.predict --model results/<run-name> --state-dir /path/state \\
        --site-name hospital-d --images new-scans/ --out predictions.csv

A site predicts with the global arrays and whatever its method contract says it keeps
(`private`): FusedSpaceFed's encoder E_i (from its private state: written by its SuperNode
after each round, or by `python -m client_app.onboard`), FedBN's BatchNorm layers, a
personalised head or body, Ditto's personal model. Where nothing is private the global
classifier alone decides and no state is needed.

The CSV has one row per image: `index` (npz row) or `file` (path relative to the
folder), then `prediction` (class index) and `label` (class name) and one probability
column `p_<class name>` per class; for multi-label datasets `predicted_labels` (the
labels scoring >= 0.5, joined by ';') and one sigmoid score column `p_<label>` per label.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from client_app.site_model import (
    SiteImages,
    SiteModelError,
    add_common_arguments,
    build_site_model,
    load_run_model,
    private_keys,
    read_unlabeled_images,
    run_cli,
)
from client_app.state import PrivateState
from core.config import RunConfig
from core.device import resolve_device, set_threads
from core.files import atomic_write_bytes
from core.methods import contract_for
from models import SiteModel
from models.evaluation import predict_scores
from partitions.medmnist_data import DatasetSpec
from partitions.tensors import TensorSplit

THRESHOLD = 0.5  # multi-label: a label is predicted when its sigmoid score reaches it


def load_private_state(
    net: SiteModel, cfg: RunConfig, state_dir: str | Path | None, site_name: str | None, log
) -> tuple[SiteModel, int | None]:
    """The site's model: `net` with its private parts loaded (or, for a method that keeps a
    personal model, that model), and the round of the state (None when the method keeps
    nothing private)."""
    method, contract = cfg.method, contract_for(cfg.method)
    private = private_keys(net, cfg)
    if not private and not contract.personal_model:
        if state_dir or site_name:
            log(f"note: a {method} model has no private parts; the site's state is not needed")
        return net, None
    what = contract.private
    if contract.uses_encoder:
        how = (
            "its SuperNode writes it after each round it trains; a new site writes it with "
            "python -m client_app.onboard --model ... --images ... --state-dir ... --site-name ..."
        )
    else:
        how = "its SuperNode writes it after each round it trains (node config state-dir and site-name)"
    if not state_dir or not site_name:
        raise SiteModelError(f"a {method} site predicts with {what}: pass --state-dir and --site-name of the site")
    state = PrivateState(RecordDict(), state_dir, cfg.run_name, site_name)
    saved = state.load()
    if saved is None:
        raise SiteModelError(
            f"no private state of site {site_name!r} for run {cfg.run_name!r}: expected {state.path}. A {method} "
            f"site predicts with {what}; {how}"
        )
    expected = net.state_dict()
    missing = [k for k in private if k not in saved.model]
    wrong = [k for k in private if k in saved.model and saved.model[k].shape != expected[k].shape]
    if missing or wrong:
        raise SiteModelError(
            f"the private state {state.path} does not fit this run's {method} model (missing {missing[:4]}, "
            f"other shapes {wrong[:4]}); is it from another run or dataset?"
        )
    net.load_state_dict({**expected, **{k: saved.model[k] for k in private}})
    if contract.personal_model:
        try:
            net = contract.load_trainer().personal(net, saved.extras)
        except ValueError as exc:
            raise SiteModelError(f"the private state {state.path} holds no usable {what}: {exc}") from exc
    return net, state.loaded_round


def write_predictions(out: Path, scores: np.ndarray, spec: DatasetSpec, images: SiteImages) -> None:
    """The predictions CSV, written atomically."""
    names = list(spec.class_names)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    first = "file" if images.names is not None else "index"
    columns = ["predicted_labels"] if spec.multi_label else ["prediction", "label"]
    writer.writerow([first, *columns, *(f"p_{name}" for name in names)])
    for i, row in enumerate(scores):
        key = images.names[i] if images.names is not None else i
        if spec.multi_label:
            predicted = [";".join(n for n, p in zip(names, row, strict=True) if p >= THRESHOLD)]
        else:
            c = int(np.argmax(row))
            predicted = [c, names[c]]
        writer.writerow([key, *predicted, *(f"{float(p):.6f}" for p in row)])
    atomic_write_bytes(out, buffer.getvalue().encode())


def predict(
    model: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    state_dir: str | Path | None = None,
    site_name: str | None = None,
    device: str = "auto",
    batch_size: int = 512,
    num_threads: int = 0,
    array: str | None = None,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """Label `images` with the run's model and the site's private parts; write `out`;
    return the scores (N x classes)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise SiteModelError(f"--out {out} is a folder; name the CSV file to write")
    if batch_size < 1:
        raise SiteModelError(f"--batch-size must be >= 1, got {batch_size}")
    run = load_run_model(model)
    cfg, spec = run.cfg, run.spec
    net = build_site_model(run, site_name or "")
    net, state_round = load_private_state(net, cfg, state_dir, site_name, log)
    site_images = read_unlabeled_images(images, spec, array, reference=cfg.rules.reference_inputs)
    if state_round is not None and state_round != run.server_round:
        log(
            f"note: site {site_name!r}'s private state is from round {state_round}, the model from round "
            f"{run.server_round}; python -m client_app.onboard --force re-aligns the encoder to this model"
        )
    set_threads(num_threads)
    dev = resolve_device(device)
    n = len(site_images.images)
    labels = torch.zeros((n, spec.num_classes)) if spec.multi_label else torch.zeros(n, dtype=torch.long)
    split = TensorSplit(torch.from_numpy(site_images.images), labels)  # labels only tell the task's kind
    scores = predict_scores(net.to(dev), split, dev, batch_size=batch_size)
    write_predictions(out, scores, spec, site_images)
    if spec.multi_label:
        counts = {name: int((scores[:, i] >= THRESHOLD).sum()) for i, name in enumerate(spec.class_names)}
    else:
        found = np.bincount(scores.argmax(axis=1), minlength=spec.num_classes)
        counts = {name: int(found[i]) for i, name in enumerate(spec.class_names)}
    who = f" and the private parts of site {site_name!r} (round {state_round})" if state_round is not None else ""
    log(
        f"{n} images from {site_images.source} labelled with the {cfg.method} model of run {cfg.run_name!r} "
        f"(round {run.server_round}){who} -> {out}"
    )
    log("predicted: " + ", ".join(f"{name}: {count}" for name, count in counts.items()))
    return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client_app.predict",
        description="Label images with a run's global model and this site's private parts; write a CSV.",
    )
    parser.add_argument(
        "--model", required=True, help="a run's folder, its global_model.pt, or a server checkpoint round-<N>.pt"
    )
    parser.add_argument("--images", required=True, help="an npz (array 'images' or 'train_images') or an image folder")
    parser.add_argument("--out", required=True, help="the CSV file to write")
    parser.add_argument("--state-dir", default=None, help="the site's state-dir (methods that keep private parts)")
    parser.add_argument("--site-name", default=None, help="the site's site-name (methods that keep private parts)")
    add_common_arguments(parser, 256, "images per batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(
        lambda: predict(
            args.model,
            args.images,
            args.out,
            state_dir=args.state_dir,
            site_name=args.site_name,
            device=args.device,
            batch_size=args.batch_size,
            num_threads=args.num_threads,
            array=args.array,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
