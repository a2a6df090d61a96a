"""What a site's data is, as the site reports it: split sizes, the test split's majority
share, and the settings its file was split with (partitions.split's `site_meta`). Sites
send it as numbers (a metric record: nothing a site sends is read as text); the server
turns the reports into the summary's `data` entry and compares them with the run's own
partition settings, which describe the data only in a simulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from core.config import PARTITION_SCHEMES, RunConfig, partition_tag

HOLDOUTS = ("shared", "local")  # partitions.split's --holdout choices, by index
MAJORITY_KEY = "test_majority_share"  # share of the test split's most common class (evaluation record too)


def site_data_record(sizes: Mapping[str, int], majority: float, meta: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a site reports about its data; `meta`: its file's `site_meta` ({} in a
    simulation, where the run's own settings made the split)."""
    record: dict[str, float] = {f"num-{split}": int(n) for split, n in sizes.items()}
    record[MAJORITY_KEY] = float(majority)
    if meta.get("partition") in PARTITION_SCHEMES:
        record["split-partition"] = PARTITION_SCHEMES.index(meta["partition"])
        for key in ("alpha", "seed", "num_sites", "classes_per_client"):
            if isinstance(meta.get(key), int | float) and not isinstance(meta.get(key), bool):
                record[f"split-{key.replace('_', '-')}"] = meta[key]
        if meta.get("holdout") in HOLDOUTS:
            record["split-holdout"] = HOLDOUTS.index(meta["holdout"])
    return record


def describe_sites(reports: Mapping[int, Mapping[str, float]], in_deployment: bool = False) -> dict[str, Any]:
    """The summary's `data` entry from the latest report of each site (keyed by site id).
    `source`: `site files` when the sites' files say how they were split, else `sites`
    in a deployment (their own data: sizes and shares only) and `run config` in a
    simulation (the run's partition settings made the split)."""
    sites = []
    for site in sorted(reports):
        report = reports[site]
        entry: dict[str, Any] = {"site": site}
        entry.update({k[4:]: int(v) for k, v in report.items() if k.startswith("num-")})
        entry[MAJORITY_KEY] = float(report.get(MAJORITY_KEY, math.nan))
        split = split_of(report)
        if split:
            entry["split"] = split
        sites.append(entry)
    splits = [s["split"] for s in sites if "split" in s]
    source = "site files" if splits else "sites" if in_deployment else "run config"
    out: dict[str, Any] = {"source": source, "sites": sites}
    if splits and all(s == splits[0] for s in splits):
        out["split"] = splits[0]
    return out


def split_of(report: Mapping[str, float]) -> dict[str, Any]:
    """The split settings in one site's report ({} when its data was not from partitions.split)."""
    if "split-partition" not in report:
        return {}
    index = int(report["split-partition"])
    split: dict[str, Any] = {"partition": PARTITION_SCHEMES[index] if 0 <= index < len(PARTITION_SCHEMES) else None}
    for key in ("alpha", "seed", "num-sites", "classes-per-client"):
        if f"split-{key}" in report:
            value = float(report[f"split-{key}"])
            split[key.replace("-", "_")] = int(value) if key != "alpha" else value
    if "split-holdout" in report and 0 <= int(report["split-holdout"]) < len(HOLDOUTS):
        split["holdout"] = HOLDOUTS[int(report["split-holdout"])]
    return split


def config_mismatch(cfg: RunConfig, split: Mapping[str, Any]) -> list[str]:
    """The run settings that the sites' split contradicts, as `key: run value, sites' value`."""
    pairs = [("partition", cfg.partition, split.get("partition")), ("seed", cfg.seed, split.get("seed"))]
    if split.get("partition") == cfg.partition:
        tag = partition_tag(cfg.partition, cfg.alpha, cfg.classes_per_client)
        theirs = partition_tag(
            str(split["partition"]),
            float(split.get("alpha", cfg.alpha)),
            int(split.get("classes_per_client", cfg.classes_per_client)),
        )
        pairs.append(("alpha" if tag.startswith("a") else "classes-per-client", tag, theirs))
    return [
        f"{key} {mine} (the sites' {theirs})" for key, mine, theirs in pairs if theirs is not None and mine != theirs
    ]


def describe_split(split: Mapping[str, Any]) -> str:
    """`dirichlet-equal alpha 0.5, seed 0, 2 sites` for a log line."""
    parts = [str(split.get("partition"))]
    if str(split.get("partition", "")).startswith("dirichlet") and "alpha" in split:
        parts[0] += f" alpha {split['alpha']:g}"
    if split.get("partition") == "pathological" and "classes_per_client" in split:
        parts[0] += f" {split['classes_per_client']} classes per site"
    parts += [f"seed {split['seed']}"] if "seed" in split else []
    parts += [f"{split['num_sites']} sites"] if "num_sites" in split else []
    return ", ".join(parts)


def majority_class(row: Mapping[str, Any], tolerance: float = 1e-6) -> bool:
    """Whether a round's global accuracy equals its test split's majority share (the model
    predicts the most common class, or does no better than that)."""
    acc, share = row.get("global_acc_mean"), row.get(MAJORITY_KEY)
    if not isinstance(acc, float) or not isinstance(share, float) or math.isnan(acc) or math.isnan(share):
        return False
    return abs(acc - share) <= tolerance
