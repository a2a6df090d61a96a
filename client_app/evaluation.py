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
`client_app.site.Site.evaluate`, which picks a personal model where the method keeps one),
BatchNorm recalibration and the health measures included; only scoring one split
(`models/evaluation.py:evaluate_split`) lives below, because the server scores the official
splits with it too. The metrics' names are those of `core/metrics.py`, prefixed by the split.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from core.data_report import MAJORITY_KEY
from core.metrics import majority_share
from models import SiteModel
from models.evaluation import evaluate_split
from partitions.site_data import SiteData
from partitions.tensors import TensorSplit, to_float

# -- health of a run: is the fused space informative, do the BatchNorm statistics fit? ------

HEALTH_IMAGES = 512  # images of a site's training split the reconstruction health is measured on
RECAL_IMAGES = 1024  # training images whose BatchNorm statistics a site recomputes (more change little)


@torch.inference_mode()
def reconstruction_health(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """How much of x the site's x_rec = D(E_i(x)) carries, on `images` (float, N x C x H x W):

    - `r2` = 1 - MSE(x_rec, x) / Var(x), the variance taken per pixel across images: 1 is a
      perfect reconstruction, 0 is what the mean image scores, below 0 is worse than it;
    - `dependence` = the spread of x_rec across images over that of x (per-pixel standard
      deviations, averaged): near 0 means x_rec is the same image whatever the input, so
      the fused input x + x_rec is x plus a constant.
    """
    was_training = model.training
    model.eval()
    try:
        rec = model.reconstruct(images)
    finally:
        model.train(was_training)
    variance = images.var(dim=0, unbiased=False).mean().clamp_min(1e-12)
    mse = (rec - images).pow(2).mean()
    spread = images.std(dim=0, unbiased=False).mean().clamp_min(1e-12)
    return {
        "r2": float(1 - mse / variance),
        "dependence": float(rec.std(dim=0, unbiased=False).mean() / spread),
    }


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def recalibrated_batchnorm(
    model: nn.Module, data, device: torch.device, batch_size: int = 256, limit: int = RECAL_IMAGES
) -> Iterator[None]:
    """Inside the block the BatchNorm running statistics are recomputed on `limit` images of
    `data` chosen at random (the same ones every time) (a TensorSplit: one forward pass in training mode, no labels, no weight
    changes; the exact average over the batches, not a momentum one). The model's own statistics come back
    after the block, so training and what is sent are unaffected."""
    layers = batchnorm_layers(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in layers]
    was_training = model.training
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        # a fixed random subset: a site's images may be stored grouped by class
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit]
        with torch.no_grad():
            for start in range(0, len(chosen), batch_size):
                images = data.images[chosen[start : start + batch_size]]  # uint8, as TensorSplit keeps them
                model(images.to(device).float().div_(255.0))
        model.eval()
        yield
    finally:
        for m, (mean, var, count, momentum) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
        model.train(was_training)


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
