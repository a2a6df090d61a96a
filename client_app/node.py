"""This site's own settings, from its SuperNode's node config: read once per run and kept.

Flower hands the same node config with every message of a run (a SuperNode's node config is
fixed when it starts), so a site parses it on the run's first message and keeps the result,
as it keeps the run's settings (core/settings.py). Everything a site reads of its own
configuration is here: where its state lives, its data source, its opt-ins and its name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partitions.site_data import DataSource
from partitions.sources import data_source

if TYPE_CHECKING:
    from core.config import RunConfig

ALLOW_GRADIENTS = "allow-gradients"  # node config of a deployed site: opt in to sending gradients
MIN_DP_NOISE = "min-dp-noise-multiplier"  # node config: take part only in runs with at least this much DP noise
_MAX_KEPT = 16  # node settings kept per process (a site worker serves run after run)


class PrivacyRequired(RuntimeError):
    """This site's node config asks for more differential privacy than the run gives, or
    says so in a form that is not a number."""


def flag(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class NodeSettings:
    """What a site's node config says, parsed once."""

    state_dir: str  # "" for a simulated site: its state goes under the run's results folder
    deployed: bool  # it has its own `data-path`
    allows_gradients: bool  # a simulated site may; a deployed one only with `allow-gradients = true`
    min_dp_noise: float  # 0: any run; > 0: only runs that clip and noise at least this much
    partition_id: int | None
    num_partitions: int | None
    site_name: str | None
    source: DataSource  # where its data comes from (partitions/sources.py)

    @classmethod
    def read(cls, node: Mapping[str, Any]) -> NodeSettings:
        try:
            min_dp_noise = float(node.get(MIN_DP_NOISE, 0.0) or 0.0)
        except (TypeError, ValueError):
            raise PrivacyRequired(
                f"node config {MIN_DP_NOISE} must be a number, got {node.get(MIN_DP_NOISE)!r}"
            ) from None
        deployed = bool(str(node.get("data-path", "") or ""))
        return cls(
            state_dir=str(node.get("state-dir", "") or ""),
            deployed=deployed,
            allows_gradients=not deployed or flag(node.get(ALLOW_GRADIENTS, False)),
            min_dp_noise=min_dp_noise,
            partition_id=int(node["partition-id"]) if "partition-id" in node else None,
            num_partitions=int(node["num-partitions"]) if "num-partitions" in node else None,
            site_name=str(node["site-name"]) if "site-name" in node else None,
            source=data_source(node),
        )


_KEPT: dict[tuple, NodeSettings] = {}


def node_settings(run_id: int, node: Mapping[str, Any]) -> NodeSettings:
    """This node's settings for run `run_id`: parsed on the run's first message, then kept
    (keyed by the node config itself too, so a process serving several nodes or a changed
    config never reads another's)."""
    key = (int(run_id), tuple(sorted((str(k), repr(v)) for k, v in node.items())))
    kept = _KEPT.get(key)
    if kept is None:
        kept = NodeSettings.read(node)
        while len(_KEPT) >= _MAX_KEPT:
            _KEPT.pop(next(iter(_KEPT)))
        _KEPT[key] = kept
    return kept


def require_privacy(cfg: RunConfig, node: NodeSettings) -> None:
    """A site whose node config sets `min-dp-noise-multiplier = m > 0` takes part only in
    runs that clip (dp-clip-norm > 0) and noise with dp-noise-multiplier >= m. The server
    adds the noise, so this guards against a misconfigured run, not a dishonest server."""
    minimum = node.min_dp_noise
    if minimum > 0 and not (cfg.dp_clip_norm > 0 and cfg.dp_noise_multiplier >= minimum):
        raise PrivacyRequired(
            f"this site takes part only with differential privacy of noise multiplier >= {minimum:g} "
            f"({MIN_DP_NOISE} in its node config); this run has dp-clip-norm = {cfg.dp_clip_norm:g}, "
            f"dp-noise-multiplier = {cfg.dp_noise_multiplier:g}"
        )
