"""What the server may do with the dataset in a simulation: show the partitioning, and
evaluate a model that is the same at every site on the official test and validation
splits once, instead of once per site.

Whether a run is a simulation or a deployment is the Grid's to say, not the file
system's: Flower hands a deployed ServerApp an `HttpGrid` (the SuperLink's Runtime API)
and a simulated one an `InMemoryGrid`. In a deployment the sites bring their own data,
which the run config's partition settings do not describe, so both are skipped (even
when the coordinator happens to hold the dataset file, e.g. after splitting it for the
sites) and every site evaluates on its own data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from core.config import RunConfig
from core.console import console
from core.data_report import MAJORITY_KEY
from core.methods import contract_for
from core.metrics import majority_share
from models import build_run_model
from models.evaluation import evaluate_split
from partitions.medmnist_data import DataError, npz_filename
from partitions.partitioners import partition_labels
from partitions.simulated import (
    cached_dataset,
    cached_partition,
    dataset_key,
    evaluation_splits,
    inputs_key,
    partition_key,
)
from partitions.summary import write_summary


def deployed(grid: object) -> bool:
    """Whether the ServerApp runs in a deployment: Flower's deployed grid (SuperLink,
    SuperNodes, each with its own data) rather than a simulation's or a test's in-process one.

    Flower's `HttpGrid` module is looked up, not imported: importing it costs about 2 CPU-s
    (SQLAlchemy and Alembic come with it) in every lean run and test process, and a grid
    can only be an `HttpGrid` in a process that has imported its class."""
    http_grid = sys.modules.get("flwr.superlink.grid.http_grid")
    return http_grid is not None and isinstance(grid, http_grid.HttpGrid)


def dataset_on_server(cfg: RunConfig) -> bool:
    return (Path(cfg.data_root) / npz_filename(cfg.dataset, cfg.image_size)).exists()


def run_name_for(cfg: RunConfig, in_deployment: bool = False) -> str:
    """`run-name`, or the default one: a simulation's or a deployment's
    (core.config.RunConfig.default_run_name)."""
    return cfg.run_name or cfg.default_run_name(simulated=not in_deployment)


def partition_summary(cfg: RunConfig, num_sites: int, out_dir: Path, in_deployment: bool = False) -> None:
    """Table and plot of the simulated partitioning, when the server can see the data."""
    if in_deployment:
        console.print("[dim]deployment: the sites bring their own data (described after round 1)[/dim]")
        return
    if not dataset_on_server(cfg):
        console.print("[dim]dataset file not on the server: no partition summary[/dim]")
        return
    try:
        data = cached_dataset(*dataset_key(cfg))
    except DataError as exc:
        console.print(f"[yellow]partition summary skipped: {exc}[/yellow]")
        return
    parts = cached_partition(*partition_key(cfg, num_sites))
    names = list(data.spec.class_names) + (["no finding"] if data.spec.multi_label else [])
    write_summary(partition_labels(data["train"].labels), list(parts), out_dir, cfg.partition, names)


class CentralEvaluator:
    """Evaluates the global model on the official test and validation splits."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.test, self.val = evaluation_splits(*inputs_key(cfg))
        self.spec = cached_dataset(*inputs_key(cfg)).spec

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        model = build_run_model(self.cfg, self.spec, seed=self.cfg.seed, contract=contract_for(self.cfg.method))
        model.load_state_dict({**model.state_dict(), **arrays.to_torch_state_dict()})
        cpu = torch.device("cpu")
        metrics: dict[str, float] = {}
        for prefix, split in (("test", self.test), ("val", self.val)):
            scores = evaluate_split(model, split, self.spec.task, cpu)
            metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        metrics[MAJORITY_KEY] = majority_share(self.test.labels.numpy(), self.spec.task)
        return metrics


def central_evaluator(
    cfg: RunConfig, same_model_everywhere: bool, in_deployment: bool = False
) -> CentralEvaluator | None:
    """An evaluator when the method's evaluated model is the same at every site and the
    server simulates the sites from a dataset it can read; None otherwise (the sites
    evaluate everything, in a deployment on their own data)."""
    if in_deployment or not same_model_everywhere or not dataset_on_server(cfg):
        return None
    try:
        return CentralEvaluator(cfg)
    except DataError as exc:
        console.print(f"[yellow]server-side evaluation off: {exc}[/yellow]")
        return None
