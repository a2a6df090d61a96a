"""The ServerApp: builds the run from its configuration and drives the rounds.

Per round: send the shared arrays to the sampled sites, aggregate their replies
(the strategy refuses anything private), evaluate, print a progress line and append
to metrics.jsonl. At the end: summary.json and the final shared model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from client_app.trainers import trainer_for
from core.config import RunConfig
from core.console import console
from models import build_run_model
from partitions.medmnist_data import dataset_spec
from server_app.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_resume_checkpoint,
    resumed_config,
    write_checkpoint,
)
from server_app.faults import SiteBook, TooFewReplies, exchange
from server_app.results import RunResults
from strategies import SharedModelStrategy, strategy_class


def initial_model_arrays(cfg: RunConfig) -> tuple[ArrayRecord, list[str]]:
    """The shared part of a freshly initialised model (seeded), and its keys."""
    spec = dataset_spec(cfg.dataset, cfg.image_size)
    model = build_run_model(cfg, spec, seed=cfg.seed)
    keys = trainer_for(cfg.method).shared_keys(model)
    state = model.state_dict()
    return ArrayRecord({k: state[k] for k in keys}), keys


def partition_summary(cfg: RunConfig, num_sites: int, results: RunResults) -> None:
    """Table and plot of the simulated partitioning, when the server can see the data."""
    from partitions.medmnist_data import DataError, npz_filename, partition_labels
    from partitions.summary import write_summary

    if not (Path(cfg.data_root) / npz_filename(cfg.dataset, cfg.image_size)).exists():
        console.print("[dim]dataset file not on the server: no partition summary (deployment mode)[/dim]")
        return
    from client_app.site_data import cached_dataset, cached_partition, dataset_key, partition_key

    try:
        data = cached_dataset(*dataset_key(cfg))
    except DataError as exc:
        console.print(f"[yellow]partition summary skipped: {exc}[/yellow]")
        return
    parts = cached_partition(*partition_key(cfg, num_sites))
    write_summary(
        partition_labels(data["train"].labels), list(parts), results.dir, cfg.partition, _class_names(data.spec)
    )


def _class_names(spec) -> list[str]:
    names = list(spec.class_names)
    return names + ["no finding"] if spec.multi_label else names


def build_strategy(cfg: RunConfig, shared_keys: list[str], num_nodes: int) -> SharedModelStrategy:
    return strategy_class(cfg.method)(
        shared_keys,
        weighted=cfg.weighted,
        fraction_train=cfg.fraction_train,
        min_train_nodes=cfg.min_replies,
        min_available_nodes=cfg.min_replies,  # a round goes on without sites that are down
        eval_every=cfg.eval_every,
        num_rounds=cfg.num_server_rounds,
    )


def wait_for_nodes(grid: Grid, timeout: float = 600.0, minimum: int = 1) -> int:
    start = time.time()
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.time() - start > timeout:
            raise RuntimeError(f"{len(nodes)} SuperNodes connected within {timeout:.0f} s, fewer than {minimum}")
        time.sleep(1)
    return len(nodes)


def progress_line(row: dict[str, Any], num_rounds: int) -> str:
    def fmt(key: str, label: str) -> str:
        value = row.get(key)
        return f"{label} {value:.4f}" if isinstance(value, float) else f"{label} -"

    parts = [
        f"[bold]round {row['round']}/{num_rounds}[/bold]",
        f"{row['round_seconds']:.1f}s",
        fmt("train_loss", "loss"),
        fmt("global_acc_mean", "global acc"),
        fmt("global_acc_worst", "worst"),
        fmt("local_acc_mean", "local acc"),
        fmt("gamma", "Gamma"),
    ]
    return "  ".join(parts)


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg.num_server_rounds` rounds and write the results; returns the summary.

    After every round a checkpoint is written; `resume-from` continues from one. A round
    aggregates the replies that arrived within `round-timeout` when at least
    `min-replies` did, and records the sites that failed.
    """
    checkpoint = find_resume_checkpoint(cfg)
    if checkpoint is not None:
        cfg = resumed_config(cfg, checkpoint)
    else:
        cfg = cfg.replace(run_name=cfg.run_name or cfg.default_run_name())
    results = RunResults(cfg.results_dir, cfg.run_name)
    results.write_config(cfg.to_mapping())
    console.rule(f"{cfg.method} on {cfg.dataset} ({cfg.partition}) -> {results.dir}")

    num_nodes = wait_for_nodes(grid, minimum=cfg.min_replies)
    partition_summary(cfg, num_nodes, results)
    arrays, shared_keys = initial_model_arrays(cfg)
    strategy = build_strategy(cfg, shared_keys, num_nodes)
    config = ConfigRecord(cfg.to_mapping())
    rows: list[dict[str, Any]] = []
    first_round = 1
    if checkpoint is not None:
        if set(checkpoint.arrays) != set(shared_keys):
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds arrays that differ from this method's shared set"
            )
        arrays = ArrayRecord(checkpoint.arrays)
        strategy.restore_state(checkpoint.strategy_state)
        rows = checkpoint.rows
        first_round = checkpoint.server_round + 1
        console.print(f"resuming {cfg.run_name} after round {checkpoint.server_round} from {checkpoint.path}")
    else:
        write_checkpoint(cfg, 0, arrays.to_torch_state_dict(), strategy.checkpoint_state(), rows)
    book = SiteBook()

    for server_round in range(first_round, cfg.num_server_rounds + 1):
        started = time.time()
        train = exchange(
            grid,
            strategy.configure_train(server_round, arrays, ConfigRecord(dict(config)), grid),
            cfg.round_timeout,
            book,
        )
        if len(train.replies) < cfg.min_replies:
            raise TooFewReplies(
                f"round {server_round}: {len(train.replies)} of {train.sent} sites replied, fewer than min-replies = "
                f"{cfg.min_replies} ({'; '.join(train.failed) or 'no site was sampled'}). The run stopped; resume it "
                f'with resume-from = "latest" (checkpoint of round {server_round - 1} in '
                f"{checkpoint_dir(cfg.results_dir, cfg.run_name)})"
            )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, train.replies)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: no site returned a model ({'; '.join(train.failed)})")
        strategy.failures[server_round] = train.failed
        arrays = new_arrays
        evaluation = exchange(
            grid,
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid),
            cfg.round_timeout,
            book,
        )
        eval_metrics = strategy.aggregate_evaluate(server_round, evaluation.replies)
        row: dict[str, Any] = {"round": server_round, "round_seconds": time.time() - started}
        row.update(dict(train_metrics or {}))
        row.update(dict(eval_metrics or {}))
        row["failed_sites"] = train.failed
        row["failed_eval_sites"] = evaluation.failed
        rows.append(row)
        results.write_rounds(rows)
        write_checkpoint(cfg, server_round, arrays.to_torch_state_dict(), strategy.checkpoint_state(), rows)
        console.print(progress_line(row, cfg.num_server_rounds))
        for failure in train.failed + [f"evaluate: {f}" for f in evaluation.failed]:
            console.print(f"[yellow]  failed: {failure}[/yellow]")

    results.write_model(arrays.to_torch_state_dict())
    summary = results.write_summary(rows, {"run_name": cfg.run_name, "method": cfg.method, "dataset": cfg.dataset})
    console.print(f"results written to {results.dir}")
    return summary


def create_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is the context's, updated with `overrides` (for tests)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})}))

    return server_app


app = create_server_app()
