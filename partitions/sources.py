"""Which `DataSource` a node has, chosen once from its node config: a deployed site's own
`data-path` (`SiteFolder`) or a simulated site's `partition-id` (`SimulatedPartition`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from partitions.deployed import SiteFolder
from partitions.medmnist_data import DataError
from partitions.simulated import SimulatedPartition
from partitions.site_data import DataSource, SiteData

if TYPE_CHECKING:
    from core.config import RunConfig


def data_source(node_config) -> DataSource:
    """This node's source: its own `data-path` (deployment) or its `partition-id` of the
    configured dataset (simulation)."""
    data_path = str(node_config.get("data-path", "") or "")
    if data_path:
        state_dir = str(node_config.get("state-dir", "") or "")
        return SiteFolder(data_path, str(Path(state_dir) / "data-cache") if state_dir else None)
    if "partition-id" not in node_config:
        raise DataError(
            "this SuperNode's node config has no 'data-path' (a deployed site's own data file or image folder) "
            "and no 'partition-id' (a simulated site): start it with --node-config 'data-path=\"/path/site.npz\" "
            'site-name="..." state-dir="/path/state"\''
        )
    return SimulatedPartition(int(node_config["partition-id"]), int(node_config.get("num-partitions", 1)))


def site_data_for(cfg: RunConfig, node_config) -> tuple[SiteData, dict]:
    """This node's data and its split file's metadata, from its source."""
    return data_source(node_config).load(cfg)
