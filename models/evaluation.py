"""A model's scores on a split, and its metrics (core.metrics) there.

Used by the sites and, in simulation, by the server when every site would evaluate the
same model on the same official splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from core.metrics import classification_metrics


@torch.inference_mode()
def predict_scores(model: nn.Module, data, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (softmax) or, for multi-label tasks, per-label sigmoids. Batches of
    256: on this CPU 1.7x faster than 512 and 2.3x faster than 1024 (benchmarks/kernels.py)."""
    model.eval()
    outputs = []
    for x, _ in data.batches(batch_size):
        outputs.append(model(x.to(device)).float().cpu())
    logits = torch.cat(outputs) if outputs else torch.empty(0)
    multi_label = data.labels.ndim == 2
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)).numpy()


def evaluate_split(model: nn.Module, data, task: str, device: torch.device) -> dict[str, float]:
    """`data`: a partitions.tensors.TensorSplit (anything with `batches` and `labels`)."""
    scores = predict_scores(model, data, device)
    labels = data.labels.numpy().astype(np.int64)
    if len(labels) == 1:
        # medmnist's getACC squeezes a one-image split to a scalar and fails (a site's local
        # shard with 100 breastmnist sites); the image twice has the same metrics
        labels, scores = np.concatenate([labels, labels]), np.concatenate([scores, scores])
    return classification_metrics(labels, scores, task)


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
