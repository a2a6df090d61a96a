"""Aggregation that one site cannot steer (`aggregation`, `max-update-norm`, `max-examples`).

- `median`: the coordinate-wise median of the sites' arrays (Yin et al. 2018), as Flower's
  `FedMedian` computes it;
- `trimmed-mean`: the coordinate-wise mean after cutting `trim-fraction` of the values at each
  end, with Flower's `trim_mean` (the helper of its `FedTrimmedAvg`);
- `krum`: the one site's arrays closest to its n - f - 2 nearest neighbours (Blanchard et al.
  2017), selected with Flower's `select_multikrum`, f = `krum-byzantine`.

Flower's strategies themselves are not used: they aggregate the first array record of a
reply and its metrics their own way, while our replies are checked and unpacked by the
method contract first (strategies/base.py). Integer arrays (BatchNorm's counters) are taken
from the first reply, as the mean does. The robust rules ignore example counts: a claimed
count is what a site could lie about.

Also here: the server-side bound on a site's update (`bound_update`), which scales an update
whose L2 norm exceeds `max-update-norm` down to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from core.config import AGGREGATIONS


def _floating(values: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.floating)


def robust_arrays(records: Sequence[ArrayRecord], rule: str, trim_fraction: float, byzantine: int) -> ArrayRecord:
    """The `rule` aggregate of `records` (not "mean": that is strategies.aggregation)."""
    if not records:
        raise ValueError("nothing to aggregate")
    if rule == "krum":
        chosen = select_multikrum([RecordDict({"arrays": r}) for r in records], byzantine, 1)[0]["arrays"]
        return ArrayRecord({k: Array(np.array(chosen[k].numpy())) for k in chosen.keys()})
    out: dict[str, Array] = {}
    for key in records[0].keys():
        first = records[0][key].numpy()
        if not _floating(first):
            out[key] = Array(np.array(first))
            continue
        stacked = np.stack([r[key].numpy().astype(np.float64) for r in records])
        if rule == "median":
            value = np.median(stacked, axis=0)
        elif rule == "trimmed-mean":
            value = trim_mean(stacked, trim_fraction)
        else:
            raise ValueError(f"unknown aggregation {rule!r}; one of {AGGREGATIONS}")
        out[key] = Array(np.asarray(value).astype(first.dtype))
    return ArrayRecord(out)


def update_norm(record: ArrayRecord, sent: Mapping[str, np.ndarray]) -> float:
    """L2 norm of `record - sent` over the floating-point arrays (float64)."""
    total = 0.0
    for key in record.keys():
        values = record[key].numpy()
        if _floating(values):
            total += float(((values.astype(np.float64) - sent[key].astype(np.float64)) ** 2).sum())
    return float(np.sqrt(total))


def bound_update(record: ArrayRecord, sent: Mapping[str, np.ndarray], max_norm: float) -> ArrayRecord:
    """`record` with its update scaled to L2 norm <= max_norm (unchanged when within it)."""
    norm = update_norm(record, sent)
    if norm <= max_norm:
        return record
    scale = max_norm / norm
    out: dict[str, Array] = {}
    for key in record.keys():
        values = record[key].numpy()
        if _floating(values):
            base = sent[key].astype(np.float64)
            values = (base + (values.astype(np.float64) - base) * scale).astype(values.dtype)
        out[key] = Array(np.array(values))
    return ArrayRecord(out)
