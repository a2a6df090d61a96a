"""A model's scores on a split, and its metrics (core.metrics) there: the one primitive the
sites and the server share (in simulation the server scores the official splits itself when
every site would score the same model on them). What a site evaluates, BatchNorm
recalibration and the fused space's health are client_app/evaluation.py's.
"""

from __future__ import annotations

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
