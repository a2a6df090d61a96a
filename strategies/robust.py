"""Aggregation that one site cannot steer (`aggregation`, `max-update-norm`, `max-examples`).

- `median`: the coordinate-wise median of the sites' arrays (Yin et al. 2018), as Flower's
  `FedMedian` computes it;
- `trimmed-mean`: the coordinate-wise mean after cutting `trim-fraction` of the values at each
  end, with Flower's `trim_mean` (the helper of its `FedTrimmedAvg`), and at least one value
  at each end whenever three or more sites replied (`trim_cut`: int(0.2 * 4) is 0, which made
  it the plain mean at the pilot's sizes); with two sites it is their median;
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
from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm

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
            cut = trim_cut(trim_fraction, len(records))
            value = trim_mean(stacked, cut) if cut > 0 or trim_fraction <= 0 else np.median(stacked, axis=0)
        else:
            raise ValueError(f"unknown aggregation {rule!r}; one of {AGGREGATIONS}")
        out[key] = Array(np.asarray(value).astype(first.dtype))
    return ArrayRecord(out)


def trim_cut(trim_fraction: float, num_sites: int) -> float:
    """The fraction to cut at each end: `trim_fraction`, raised so that one value goes at each
    end when that would cut none of three or more (0 when two or fewer: nothing can be cut)."""
    if trim_fraction <= 0 or num_sites < 3:
        return 0.0
    if int(trim_fraction * num_sites) >= 1:
        return trim_fraction
    return 1.0 / num_sites + 1e-9  # int(cut * n) == 1, and below 0.5 for n >= 3


def _float_pairs(record: ArrayRecord, sent: Mapping[str, np.ndarray]) -> tuple[list[str], list, list]:
    """The floating-point keys and their (sent, received) values in float64."""
    keys = [k for k in record.keys() if _floating(record[k].numpy())]
    return keys, [record[k].numpy().astype(np.float64) for k in keys], [sent[k].astype(np.float64) for k in keys]


def update_norm(record: ArrayRecord, sent: Mapping[str, np.ndarray]) -> float:
    """L2 norm of `record - sent` over the floating-point arrays (float64; Flower's `get_norm`,
    as the sites measure it in client_app/privacy.py)."""
    _, values, base = _float_pairs(record, sent)
    return float(get_norm([v - b for v, b in zip(values, base)]))


def bound_update(record: ArrayRecord, sent: Mapping[str, np.ndarray], max_norm: float) -> ArrayRecord:
    """`record` with its update scaled to L2 norm <= max_norm (unchanged when within it), with
    Flower's `compute_clip_model_update`."""
    if update_norm(record, sent) <= max_norm:
        return record
    keys, values, base = _float_pairs(record, sent)
    compute_clip_model_update(values, base, max_norm)
    clipped = dict(zip(keys, values))
    return ArrayRecord(
        {
            k: Array(clipped[k].astype(record[k].numpy().dtype) if k in clipped else np.array(record[k].numpy()))
            for k in record.keys()
        }
    )
