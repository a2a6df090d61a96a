"""Onboard a new site (hospital) to a FusedSpaceFed run, without labels.

    python -m client_app.onboard --model results/<run-name> --images site.npz \\
        --state-dir /path/state --site-name hospital-d

A FusedSpaceFed site keeps its own encoder E_i; the decoder D and classifier C are
global. A hospital that joins late, or only wants predictions, first aligns a fresh
E_i to the current D: the encoder warm-up of every round (reconstruction loss only,
D and C frozen), on its unlabeled images. The encoder is saved as the site's private
state under `<state-dir>/<run-name>/<site-name>/private_state.pt`, with the round of the
model used, so a SuperNode started with that `site-name` and `state-dir` continues from
it, and `python -m client_app.predict` labels images with it.

The model is a run's folder (its `global_model.pt`, else its newest checkpoint), a
`global_model.pt` (with the run's `config.json` beside it) or a server checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import RecordDict

from client_app.site_model import (
    SiteModelError,
    add_common_arguments,
    build_site_model,
    load_run_model,
    private_keys,
    read_unlabeled_images,
    run_cli,
    site_number,
)
from client_app.state import PrivateArrays, PrivateState, StateError, read_state_file
from client_app.trainers.base import LocalRound
from client_app.trainers.fusedspacefed import FusedSpaceFedTrainer, reconstruction_loss
from core.device import resolve_device, set_threads
from core.methods import contract_for
from core.seeds import BATCH_ORDER, round_seed
from models import SiteModel
from partitions.site_data import SiteData
from partitions.tensors import TensorSplit


@dataclass(frozen=True)
class Onboarded:
    path: Path  # the state file written
    run_name: str
    server_round: int  # the round of the global model the encoder was aligned to
    num_images: int
    epochs: int
    loss_before: float
    loss_after: float


@torch.inference_mode()
def mean_reconstruction_loss(model: SiteModel, split: TensorSplit, device: torch.device, batch_size: int) -> float:
    """MSE(D(E(x)), x) over all images (eval mode)."""
    model.eval()
    total = 0.0
    for x, _ in split.batches(batch_size):
        total += reconstruction_loss(model, x.to(device)).item() * len(x)
    return total / max(len(split), 1)


def onboard(
    model: str | Path,
    images: str | Path,
    state_dir: str | Path,
    site_name: str,
    *,
    epochs: int | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_threads: int = 0,
    array: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Onboarded:
    """Warm a fresh encoder for `site_name` against the run's global decoder and save it
    as the site's private state."""
    run = load_run_model(model)
    cfg = run.cfg
    if not cfg.fused:
        contract = contract_for(cfg.method)
        kept = f" — {contract.private} is learnt in its first round" if contract.private != "nothing" else ""
        raise SiteModelError(
            f"run {cfg.run_name!r} trains {cfg.method}: only a method with a private encoder has one to warm up, so a "
            f"new {cfg.method} site needs no onboarding; start its SuperNode (or use python -m client_app.predict) "
            "directly" + kept
        )
    if not site_name:
        raise SiteModelError("--site-name is empty; use the site-name of the site's SuperNode node config")
    state = PrivateState(RecordDict(), state_dir, cfg.run_name, site_name, keep=cfg.keep_checkpoints)
    if state.path.exists() and not force:
        try:
            held = f"round {read_state_file(state.path)[1]}"
        except StateError:
            held = "unreadable"
        raise SiteModelError(
            f"site {site_name!r} already has a private state for run {cfg.run_name!r}: {state.path} ({held}); it was "
            "left untouched. Pass --force to replace it (a state of another round is kept in "
            f"{state.dir / 'history'})"
        )
    epochs = max(1, cfg.warmup_epochs) if epochs is None else epochs
    if epochs < 1:
        raise SiteModelError(f"--epochs must be >= 1, got {epochs}")
    batch_size = batch_size or cfg.batch_size
    if batch_size < 1:
        raise SiteModelError(f"--batch-size must be >= 1, got {batch_size}")
    set_threads(num_threads)
    dev = resolve_device(device)

    net = build_site_model(run, site_name).to(dev)  # checks the arrays against the run's config first
    site_images = read_unlabeled_images(images, run.spec, array, reference=run.cfg.rules.reference_inputs)
    n = len(site_images.images)
    split = TensorSplit(torch.from_numpy(site_images.images), torch.zeros(n, dtype=torch.long))
    log(
        f"onboarding site {site_name!r} to run {cfg.run_name!r} ({cfg.dataset}, model of round {run.server_round} "
        f"from {run.source}): {n} images from {site_images.source}, {epochs} warm-up epoch(s) on {dev}"
    )
    before = mean_reconstruction_loss(net, split, dev, batch_size)
    log(f"reconstruction loss before: {before:.5f}")

    # one epoch per call, as many calls as --epochs asks (no minimum number of steps here)
    job_cfg = cfg.replace(warmup_epochs=1, batch_size=batch_size, warmup_min_steps=0)
    generator = torch.Generator().manual_seed(
        round_seed(cfg.seed, run.server_round, site_number(site_name), BATCH_ORDER)
    )
    empty = TensorSplit(split.images[:0], split.labels[:0])  # warm-up reads the train split only
    job = LocalRound(
        cfg=job_cfg,
        data=SiteData(spec=run.input_spec, train=split, test=empty, val=empty, local_test=empty),
        device=dev,
        generator=generator,
        server_round=run.server_round,
        incoming=RecordDict(),
    )
    trainer = FusedSpaceFedTrainer()
    for epoch in range(1, epochs + 1):
        loss = trainer.warm_up(net, job)
        log(f"epoch {epoch}/{epochs}: training reconstruction loss {loss:.5f}")
    after = mean_reconstruction_loss(net, split, dev, batch_size)
    log(f"reconstruction loss after: {after:.5f} (before: {before:.5f})")

    state_dict = net.state_dict()
    private = {k: state_dict[k] for k in private_keys(net, cfg)}
    state.save(PrivateArrays(model=private, extras={}), server_round=run.server_round)
    log(
        f"private state written to {state.path} (run {cfg.run_name!r}, round {run.server_round}); a SuperNode "
        f'started with site-name="{site_name}" state-dir="{state_dir}" continues from it'
    )
    return Onboarded(state.path, cfg.run_name, run.server_round, n, epochs, before, after)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client_app.onboard",
        description="Warm a new site's private encoder against a FusedSpaceFed run's global decoder "
        "(unlabeled images) and save it where the site's SuperNode finds it.",
    )
    parser.add_argument(
        "--model", required=True, help="a run's folder, its global_model.pt, or a server checkpoint round-<N>.pt"
    )
    parser.add_argument("--images", required=True, help="an npz (array 'images' or 'train_images') or an image folder")
    parser.add_argument("--state-dir", required=True, help="the site's state-dir (as in its SuperNode node config)")
    parser.add_argument("--site-name", required=True, help="the site's site-name (as in its SuperNode node config)")
    parser.add_argument("--epochs", type=int, default=None, help="warm-up epochs (default: the run's, at least 1)")
    add_common_arguments(parser, None, "default: the run's batch-size")
    parser.add_argument("--force", action="store_true", help="replace an existing state of this site")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(
        lambda: onboard(
            args.model,
            args.images,
            args.state_dir,
            args.site_name,
            epochs=args.epochs,
            device=args.device,
            batch_size=args.batch_size,
            num_threads=args.num_threads,
            array=args.array,
            force=args.force,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
