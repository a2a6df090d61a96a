"""Why a run scores what it scores: each simulated site's model on the official test split,
evaluated five ways, and the health of its fused space.

    python -m benchmarks.diagnose RUN_DIR [--max-images 1000] [--sites 0,1,2]

For every site (its private parts from the run's `site-state/`, the shared parts from
`global_model.pt` or the newest checkpoint):

| column | the model as ... |
|---|---|
| `as evaluated` | the run evaluated it (`averaged stats`, or `recalibrated` under `norm = "batch-recal"`) |
| `averaged stats` | with the BatchNorm running statistics it received (averaged by the server) |
| `batch stats` | BatchNorm in batch-statistics mode (each test batch normalised by itself) |
| `recalibrated` | running statistics recomputed on the site's own training images |
| `const x_rec` | FusedSpaceFed with x_rec replaced by its mean over the site's training images |
| `x alone` | FusedSpaceFed's classifier on x, without x_rec |

plus the reconstruction R^2 and input dependence on the test images. With BatchNorm, the
last two columns recompute the statistics on the site's training images for their own
inputs, so they compare with `recalibrated`. When `const x_rec`
scores what `as evaluated` scores, the fused space carries nothing the classifier uses;
a large gap between `as evaluated` and `recalibrated` says averaged BatchNorm statistics
cost that much. Only simulated runs (the run's data and partition are rebuilt from its
config.json) with their `site-state/` folder are supported.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client_app.evaluation import batchnorm_layers, recalibrated_batchnorm, reconstruction_health
from client_app.site_model import SiteModelError, build_site_model, load_run_model, run_cli
from client_app.state import read_state_file
from core.run_folder import RunFolder
from models import SiteModel
from models.evaluation import predict_scores
from partitions.simulated import simulation_site_data
from partitions.tensors import TensorSplit, to_float

COLUMNS = ("as evaluated", "averaged stats", "batch stats", "recalibrated", "const x_rec", "x alone")


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise each batch by its own statistics: training mode with
    momentum 0, so the running statistics stay as they are."""
    layers = batchnorm_layers(model)
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield lambda: [m.train() for m in layers]
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
            m.eval()


class ClassifierOn(nn.Module):
    """The classifier on x plus a fixed image (or on x alone)."""

    def __init__(self, classifier: nn.Module, image: torch.Tensor | None) -> None:
        super().__init__()
        self.classifier, self.image = classifier, image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x if self.image is None else x + self.image)


def accuracy(model: nn.Module, split: TensorSplit, batch_mode=None) -> float:
    """Accuracy on `split` (`batch_mode`: called after the model is put in eval mode, to put
    its BatchNorm layers back in training mode)."""
    if batch_mode is None:
        scores = predict_scores(model, split, torch.device("cpu"))
    else:
        model.eval()
        batch_mode()
        with torch.no_grad():
            scores = torch.cat([torch.softmax(model(x), 1) for x, _ in split.batches(256)]).numpy()
    labels = split.labels.numpy()
    if labels.ndim == 2:  # multi-label: MedMNIST's ACC at threshold 0.5
        return float(((scores > 0.5) == labels).all(axis=1).mean())
    return float((scores.argmax(1) == labels.reshape(-1)).mean())


def site_row(model: SiteModel, train: TensorSplit, test: TensorSplit, recalibrates: bool) -> dict[str, float]:
    """The five accuracies (NaN where a column does not apply) and the reconstruction health."""
    cpu = torch.device("cpu")
    has_bn = bool(batchnorm_layers(model))

    def scored(module: nn.Module, recalibrate: bool) -> float:
        """Accuracy, with the BatchNorm statistics recomputed by forwarding `module` itself
        on the site's training images when `recalibrate`."""
        with recalibrated_batchnorm(module, train, cpu) if recalibrate and has_bn else nullcontext():
            return accuracy(module, test)

    nan = float("nan")
    row = {
        "as evaluated": scored(model, recalibrates),
        "averaged stats": scored(model, False) if has_bn else nan,
        "recalibrated": scored(model, True) if has_bn else nan,
    }
    if has_bn:
        with batch_statistics(model) as batch_mode:
            row["batch stats"] = accuracy(model, test, batch_mode)
    else:
        row["batch stats"] = nan
    row.update({"const x_rec": nan, "x alone": nan, "R2": nan, "dependence": nan})
    if model.fused:
        with torch.no_grad():
            mean_rec = torch.cat([model.reconstruct(x) for x, _ in train.batches(256)]).mean(0, keepdim=True)
        row["const x_rec"] = scored(ClassifierOn(model.classifier, mean_rec), has_bn)
        row["x alone"] = scored(ClassifierOn(model.classifier, None), has_bn)
        health = reconstruction_health(model, to_float(test.images[:1000]))
        row["R2"], row["dependence"] = health["r2"], health["dependence"]
    return row


def site_state_file(run_dir: Path, run_name: str, site: int) -> Path:
    return run_dir / "site-state" / run_name / f"site-{site}" / "private_state.pt"


def diagnose(run_dir: str | Path, max_images: int = 1000, sites: list[int] | None = None) -> list[dict[str, float]]:
    """One row per site (see the module doc); prints the table."""
    run_dir = Path(run_dir)
    run = load_run_model(run_dir)
    cfg = run.cfg
    partition = RunFolder(run_dir).partition()
    num_sites = len(partition.get("counts", []))
    if not num_sites:
        raise SiteModelError(f"{run_dir} has no partition.json naming its sites; is it a simulated run?")
    rows = []
    torch.manual_seed(0)
    for site in sites if sites is not None else range(num_sites):
        data = simulation_site_data(cfg, site, num_sites)
        test = TensorSplit(data.test.images[:max_images], data.test.labels[:max_images])
        model = build_site_model(run, f"site-{site}")
        state = site_state_file(run_dir, cfg.run_name, site)
        if model.fused or set(model.state_dict()) - set(run.shared):
            if not state.exists():
                raise SiteModelError(
                    f"site {site}'s private state {state} is missing; diagnose needs the run's site-state/"
                )
            private, _ = read_state_file(state)
            model.load_state_dict({**model.state_dict(), **private.model})
        model.eval()
        row = {"site": site, **site_row(model, data.train, test, cfg.recalibrate_bn)}
        rows.append(row)
    print_table(rows, cfg.method, run.server_round, len(test))
    return rows


def print_table(rows: list[dict[str, float]], method: str, server_round: int, images: int) -> None:
    print(f"{method}, round {server_round}, accuracy on the first {images} test images (%):")
    header = ["site", *COLUMNS, "R2", "dependence"]
    print("  ".join(f"{h:>13}" for h in header))
    for row in rows:
        cells = [f"{row['site']:>13}"]
        for name in header[1:]:
            value = row[name]
            scale = 1 if name in ("R2", "dependence") else 100
            cells.append(f"{'-':>13}" if np.isnan(value) else f"{scale * value:>13.2f}")
        print("  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max-images", type=int, default=1000, help="test images per site (default 1000)")
    parser.add_argument("--sites", default="", help="comma-separated site numbers (default: all)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    sites = [int(s) for s in args.sites.split(",") if s.strip()] or None

    def call() -> None:
        rows = diagnose(args.run_dir, args.max_images, sites)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))

    return run_cli(call)


if __name__ == "__main__":
    sys.exit(main())
