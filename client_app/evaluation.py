"""Where a site evaluates, and what it reports.

A site evaluates the model it holds after a round (the global arrays with its private
parts; for Ditto and FuseFL its personal or stage model) on its splits:
- `local_*`: its local test shard (the test split with its own label distribution; a
  deployed site's own held-out test split), always;
- `test_*` and `val_*`: the official test and validation splits, unless the server
  evaluates those itself (the same model on the same splits at every site);
- with BatchNorm, the BatchNorm gap on the local shard: accuracy with the received running
  statistics (`bn_acc_running`) against statistics recomputed on the site's training images
  (`bn_acc_recal`); with `norm = "batch-recal"` every split is scored with the recomputed ones;
- `test_majority_share`: what always predicting the test split's most common class scores
  (the reference of the "= majority class" warning);
- for FusedSpaceFed, the fused space's health, measured by its trainer on the same training
  images every round (`fused_space_health`: R^2 of x_rec = D(E_i(x)) and its input
  dependence, after the warm-up, after fused training and with the received decoder).

Every method and both engines (Flower's Ray simulation, the lean one) evaluate here (through
`client_app.site.Site.evaluate`, which picks a personal model where the method keeps one); the
model-level primitives (scoring a split, recalibrating BatchNorm, the fused space's health)
are in `models/evaluation.py`. The metrics' names are those of `core/metrics.py`, prefixed
by the split.
"""

from __future__ import annotations

import torch

from core.data_report import MAJORITY_KEY
from core.metrics import majority_share
from models import SiteModel
from models.evaluation import (
    HEALTH_IMAGES,
    batchnorm_layers,
    evaluate_split,
    recalibrated_batchnorm,
    reconstruction_health,
)
from partitions.site_data import SiteData
from partitions.tensors import TensorSplit, to_float


def evaluate_site(
    model: SiteModel, data: SiteData, *, shared_splits: bool, recalibrate_bn: bool, device: torch.device
) -> dict[str, float]:
    """The site's evaluation metrics (module doc); `shared_splits`: also the official test
    and validation splits."""
    splits = {"local": data.local_test}
    if shared_splits:
        splits.update({"test": data.test, "val": data.val})
    task = data.spec.task
    metrics: dict[str, float] = {}
    if batchnorm_layers(model):
        running = split_scores(model, {"local": data.local_test}, task, device)
        with recalibrated_batchnorm(model, data.train, device):
            recal = split_scores(model, splits if recalibrate_bn else {"local": data.local_test}, task, device)
        metrics.update(recal if recalibrate_bn else {**split_scores(model, splits, task, device), **running})
        metrics.update(
            {
                "bn_acc_running": running["local_acc"],
                "bn_acc_recal": recal["local_acc"],
                "bn_gap": recal["local_acc"] - running["local_acc"],
            }
        )
    else:
        metrics.update(split_scores(model, splits, task, device))
    if shared_splits:
        metrics[MAJORITY_KEY] = majority_share_of_test(data)
    return metrics


def split_scores(model: SiteModel, splits: dict[str, TensorSplit], task: str, device: torch.device) -> dict[str, float]:
    """`<split>_<metric>` for each split."""
    metrics: dict[str, float] = {}
    for prefix, split in splits.items():
        scores = evaluate_split(model, split, task, device)
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
    return metrics


def majority_share_of_test(data: SiteData) -> float:
    """The test split's most common class share (what a model that learnt nothing scores)."""
    return majority_share(data.test.labels.numpy(), data.spec.task)


def health_images(train: TensorSplit) -> torch.Tensor:
    """The site's first `HEALTH_IMAGES` training images (the same ones every round)."""
    return to_float(train.images[:HEALTH_IMAGES])


def fused_space_health(model: SiteModel, images: torch.Tensor) -> dict[str, float]:
    """`rec_r2` and `rec_dependence` of the model's reconstruction of `images`."""
    health = reconstruction_health(model, images)
    return {"rec_r2": health["r2"], "rec_dependence": health["dependence"]}
