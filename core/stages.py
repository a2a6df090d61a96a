"""Which state_dict keys travel in which round of a progressive-fusion run (FuseFL): the
schedule of stages as key sets, so that the site, the server and the contract agree.

A run has K levels (`fusefl-blocks`) and one column per site (`fusefl-columns`). Round r
(1..K) is stage r-1: the server sends the levels fused so far (every column's levels
0..r-2 and their adapters); site j sends its own level r-1 (and its adapter at that
level). Round K+1 calibrates: the server sends all fused levels, site j sends its column's
head (and, in a record of its own, per-class feature statistics). Nothing else of a
site's column leaves it before its stage.

Keys (models/fused_columns.py): `classifier.columns.<j>.stem|stages.<i>|bn|head.*`,
`classifier.adapters.<level-1>.<j>.*`, `classifier.head.*` (the fused model's head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

COLUMN_UNITS = 10  # a ResNet-20 column: the stem and nine residual blocks
PREFIX = "classifier"


def level_units(levels: int) -> list[list[int]]:
    """The column's units (0 = stem, i = residual block i-1) of each level: contiguous, as
    equal as ten units split K ways allow (K = 2: units 0-4 and 5-9)."""
    if not 1 <= levels <= COLUMN_UNITS:
        raise ValueError(f"fusefl-blocks must be in 1..{COLUMN_UNITS}, got {levels}")
    bounds = [round(i * COLUMN_UNITS / levels) for i in range(levels + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(levels)]


def _under(key: str, prefix: str) -> bool:
    return key.startswith(prefix + ".")


def level_prefixes(level: int, column: int, levels: int) -> list[str]:
    base = f"{PREFIX}.columns.{column}"
    prefixes = [f"{base}.stem" if u == 0 else f"{base}.stages.{u - 1}" for u in level_units(levels)[level]]
    if level == levels - 1:
        prefixes.append(f"{base}.bn")
    if level > 0:
        prefixes.append(f"{PREFIX}.adapters.{level - 1}.{column}")
    return prefixes


def level_keys(keys: Iterable[str], level: int, column: int, levels: int) -> list[str]:
    prefixes = level_prefixes(level, column, levels)
    return [k for k in keys if any(_under(k, p) for p in prefixes)]


def fused_keys(keys: Iterable[str], upto: int, columns: int, levels: int) -> list[str]:
    """Every column's levels 0..upto-1 with their adapters."""
    prefixes = [p for level in range(upto) for j in range(columns) for p in level_prefixes(level, j, levels)]
    return [k for k in keys if any(_under(k, p) for p in prefixes)]


def progressive_round_keys(
    keys: Iterable[str], server_round: int, site: int | None, config: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """(keys the server sends in `server_round`, keys site `site` sends back)."""
    keys = list(keys)
    levels, columns = int(config["fusefl-blocks"]), int(config["fusefl-columns"])
    if site is not None and not 0 <= site < columns:
        raise ValueError(f"site {site} has no column: fusefl-columns = {columns} (one column per site, numbered 0..)")
    if 1 <= server_round <= levels:
        stage = server_round - 1
        back = level_keys(keys, stage, site, levels) if site is not None else []
        return fused_keys(keys, stage, columns, levels), back
    if server_round == levels + 1:
        back = [k for k in keys if _under(k, f"{PREFIX}.columns.{site}.head")] if site is not None else []
        return fused_keys(keys, levels, columns, levels), back
    raise ValueError(f"round {server_round}: a progressive-fusion run has {levels} stages and one calibration round")


def progressive_settings(config: Mapping[str, Any], num_sites: int | None) -> dict[str, Any]:
    """What follows from the run and the federation where the config says 0 (automatic):
    K = num-server-rounds - 1 stages (the last round calibrates), one column per site
    connected when the run starts, and every column's reply required in every round."""
    derived: dict[str, Any] = {}
    if int(config["fusefl-blocks"]) == 0 and int(config["num-server-rounds"]) >= 2:
        derived["fusefl-blocks"] = min(int(config["num-server-rounds"]) - 1, COLUMN_UNITS)
    columns = int(config["fusefl-columns"])
    if columns == 0 and num_sites is not None:
        derived["fusefl-columns"] = columns = num_sites
    if columns > 0 and int(config["min-replies"]) < columns:
        derived["min-replies"] = columns
    return derived


def progressive_config_problem(config: Mapping[str, Any]) -> str | None:
    """Why a run configuration cannot run progressive fusion, or None (0 = automatic for
    fusefl-blocks and fusefl-columns: see `progressive_settings`)."""
    levels, rounds = int(config["fusefl-blocks"]), int(config["num-server-rounds"])
    if levels == 0:
        return (
            f"progressive fusion needs at least one stage and a calibration round: num-server-rounds >= 2, got {rounds}"
        )
    if not 1 <= levels <= COLUMN_UNITS:
        return f"fusefl-blocks must be in 1..{COLUMN_UNITS}, got {levels}"
    if rounds != levels + 1:
        return (
            f"progressive fusion runs fusefl-blocks = {levels} stages and one calibration round: set "
            f"num-server-rounds = {levels + 1}, got {rounds}"
        )
    if int(config["fusefl-columns"]) < 0:
        return (
            f"fusefl-columns must be >= 1 (one per site), or 0 for the sites connected, got {config['fusefl-columns']}"
        )
    if float(config["fraction-train"]) != 1.0:
        return "progressive fusion needs every site in every stage: set fraction-train = 1.0"
    if (
        float(config["dp-clip-norm"]) > 0
        or str(config["aggregation"]) != "mean"
        or float(config["max-update-norm"]) > 0
    ):
        return (
            "progressive fusion stacks the sites' blocks: differential privacy, robust aggregation and "
            "max-update-norm do not apply"
        )
    if int(config["fusefl-columns"]) and int(config["min-replies"]) != int(config["fusefl-columns"]):
        return (
            f"every column must be trained in every stage: set min-replies = fusefl-columns "
            f"({config['fusefl-columns']}), got {config['min-replies']}"
        )
    return None
