"""Averaging of the shared arrays and of the sites' metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord


def average_arrays(records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
    """Weighted mean of floating-point arrays; integer arrays (BatchNorm's
    num_batches_tracked) are taken from the first reply, as method.md says."""
    total = float(sum(weights))
    if not records or total <= 0:
        raise ValueError("nothing to average: no replies or zero total weight")
    factors = [w / total for w in weights]
    averaged: dict[str, Array] = {}
    for key in records[0].keys():
        first = records[0][key].numpy()
        if not np.issubdtype(first.dtype, np.floating):
            averaged[key] = Array(np.array(first))
            continue
        acc = np.zeros(first.shape, dtype=np.float64)
        for record, factor in zip(records, factors):
            acc += record[key].numpy().astype(np.float64) * factor
        averaged[key] = Array(acc.astype(first.dtype))
    return ArrayRecord(averaged)


def mean_metrics(records: Sequence[MetricRecord], weights: Sequence[float], skip: set[str]) -> dict[str, float]:
    """Weighted mean of every numeric metric except those in `skip`, ignoring NaNs."""
    out: dict[str, float] = {}
    keys = sorted({k for r in records for k in r.keys()} - skip)
    for key in keys:
        pairs = [(float(r[key]), w) for r, w in zip(records, weights) if key in r and not np.isnan(float(r[key]))]
        if pairs:
            values, ws = zip(*pairs)
            out[key] = float(np.average(values, weights=ws)) if sum(ws) > 0 else float(np.mean(values))
    return out


def worst_metrics(records: Sequence[MetricRecord], keys: Sequence[str]) -> dict[str, float]:
    """`<key>_worst`: the minimum over the sites that reported `key` (NaNs ignored)."""
    out: dict[str, float] = {}
    for key in keys:
        values = [float(r[key]) for r in records if key in r and not np.isnan(float(r[key]))]
        if values:
            out[f"{key}_worst"] = float(min(values))
    return out
