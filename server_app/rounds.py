"""The round loop, laid out like Flower's `Strategy.start`: configure, exchange,
aggregate, evaluate; plus resume and failing sites. What happens around it (the run
folder's files, checkpoints, the console and tracking) listens to it (server_app/listeners.py).

One message per site per round: the train message of round r carries the global model
of round r-1, and a site evaluates that model (with its private parts) before it
trains on it, so round r-1's evaluation arrives with round r's replies. After the last
round one evaluate message per site evaluates the final model. metrics.jsonl keeps one
row per round with that round's training and evaluation metrics.

When every site would evaluate the same model on the same official splits (FedAvg,
FedProx, SCAFFOLD in simulation), the server evaluates those splits once itself and
the sites evaluate only their own local shard.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from core.config import ConfigError, RunConfig
from core.console import console
from core.data_report import config_mismatch, describe_sites, describe_split
from core.methods import DATA_RECORD, EVALUATION_RECORD, METRICS_RECORD, SITE_ID_KEY, contract_for
from core.run_folder import METRICS_FILE
from core.settings import SettingsHandOver
from models import SiteModel, build_run_model
from partitions.inputs import input_spec
from server_app.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_resume_checkpoint,
    refuse_stale_private_resume,
    resumed_config,
)
from server_app.faults import Exchange, SiteBook, TooFewReplies, exchange
from server_app.listeners import Checkpoints, ConsoleReport, RunFolderFiles, RunListener
from server_app.results import RunResults, summarise
from server_app.secure import secure_sum
from server_app.server_data import central_evaluator, deployed, partition_summary, run_name_for
from server_app.tracking import RunTracker
from strategies import build_strategy

EVALUATED_KEY = "num_evaluated"  # present in a row once the round's model was evaluated
RESUME_WAIT = 180.0  # seconds a resumed run waits for the sites of its checkpoint's round (at most round-timeout)


def initial_model(cfg: RunConfig) -> SiteModel:
    """A freshly initialised model of the run (seeded)."""
    return build_run_model(
        cfg,
        input_spec(cfg.dataset, cfg.image_size, cfg.rules.reference_inputs),
        seed=cfg.seed,
        contract=contract_for(cfg.method),
    )


def initial_model_arrays(cfg: RunConfig, model: SiteModel | None = None) -> tuple[ArrayRecord, list[str]]:
    """The shared part of a freshly initialised model (seeded), and its keys."""
    model = model if model is not None else initial_model(cfg)
    keys = contract_for(cfg.method).shared_keys(model, cfg.head_blocks)
    state = model.state_dict()
    return ArrayRecord({k: state[k] for k in keys}), keys


def wait_for_nodes(grid: Grid, timeout: float = 600.0, minimum: int = 1) -> int:
    start = time.time()
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.time() - start > timeout:
            raise RuntimeError(f"{len(nodes)} SuperNodes connected within {timeout:.0f} s, fewer than {minimum}")
        time.sleep(0.2)
    return len(nodes)


def refuse_to_overwrite(run_dir: Path) -> None:
    """A fresh start never writes over an earlier run's metrics, checkpoints or site state
    (they would be lost, and simulated sites would refuse to go back to round 1)."""
    held = [name for name in (METRICS_FILE, "checkpoints", "site-state") if (run_dir / name).exists()]
    if held:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(held)}): resume it with resume-from = 'latest', "
            "give this one another run-name, or remove that folder"
        )


class FederatedRun:
    """One run: `start()` drives the rounds and returns the summary."""

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        self.grid = grid
        # a deployment's sites bring their own data: the run's name and summary describe it
        # as they report it, not by the run config's partition settings (server_data.py)
        self.in_deployment = deployed(grid)
        self.checkpoint = find_resume_checkpoint(cfg, self.in_deployment)
        if self.checkpoint is not None:
            cfg = resumed_config(cfg, self.checkpoint)
            refuse_stale_private_resume(cfg, self.checkpoint)
        else:
            cfg = cfg.replace(run_name=run_name_for(cfg, self.in_deployment))
            refuse_to_overwrite(Path(cfg.results_dir) / cfg.run_name)
        self.cfg = cfg
        self.contract = contract_for(cfg.method)
        self.results = RunResults(cfg.results_dir, cfg.run_name)
        self.book = SiteBook()
        self.data_reports: dict[int, dict[str, float]] = {}  # site id -> what its data is (core/data_report.py)
        self.rows: list[dict[str, Any]] = []
        self.first_round = 1  # set again by run(): past 1 after a resume
        tracker = RunTracker(
            self.results.dir,
            cfg.num_server_rounds,
            tensorboard=cfg.track_tensorboard,
            mlflow=cfg.track_mlflow,
            run_name=cfg.run_name,
            config=cfg.to_mapping(),
        )
        # what happens around the loop (server_app/listeners.py), told in this order
        self.listeners: list[RunListener] = [
            RunFolderFiles(self.results),
            Checkpoints(),
            ConsoleReport(tracker, time.time()),
        ]

    def tell(self, event: str, *args: Any) -> None:
        """Every listener's `event` (server_app/listeners.py)."""
        for listener in self.listeners:
            getattr(listener, event)(self, *args)

    # -- the run ------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        try:
            self.first_round = self.prepare()
            for server_round in range(self.first_round, self.cfg.num_server_rounds + 1):
                self.run_round(server_round)
            self.evaluate_final()
            return self.finish()
        finally:
            for listener in self.listeners:
                listener.close()

    def prepare(self) -> int:
        """Results folder, partition summary, initial (or restored) model and strategy;
        returns the first round to run."""
        cfg = self.cfg
        self.tell("configured")
        data = "the sites' own data" if self.in_deployment else cfg.partition
        console.rule(f"{cfg.method} on {cfg.dataset} ({data}) -> {self.results.dir}")
        console.print(cfg.describe_model())
        num_nodes = wait_for_nodes(self.grid, minimum=cfg.min_replies)
        num_nodes = self.wait_for_resumed_sites(num_nodes)
        cfg = self.settle_for_federation(num_nodes)
        partition_summary(cfg, num_nodes, self.results.dir, self.in_deployment)
        model = initial_model(cfg)  # built once: what is shared, and whether every site evaluates the same model
        everywhere = self.contract.same_model_everywhere(model, cfg.head_blocks)
        self.evaluator = central_evaluator(cfg, everywhere and not cfg.recalibrate_bn, self.in_deployment)
        self.arrays, shared_keys = initial_model_arrays(cfg, model)
        self.strategy = build_strategy(cfg, self.arrays)
        # the settings, now resolved, go to each site once (core/settings.py); messages name them
        self.handover = SettingsHandOver(cfg.to_mapping())
        if self.checkpoint is None:
            self.tell("round_closed", 0)
            return 1
        ckpt = self.checkpoint
        if set(ckpt.arrays) != set(shared_keys):
            raise CheckpointError(f"checkpoint {ckpt.path} holds arrays that differ from this method's shared set")
        self.arrays = ArrayRecord(ckpt.arrays)
        self.strategy.restore_state(ckpt.strategy_state)
        self.rows = ckpt.rows
        console.print(f"resuming {cfg.run_name} after round {ckpt.server_round} from {ckpt.path}")
        return ckpt.server_round + 1

    def settle_for_federation(self, num_nodes: int) -> RunConfig:
        """Settings the method derives from the federation (FuseFL: one column per connected
        site, each required every round), said once and written to config.json."""
        derived = self.cfg.for_federation(num_nodes)
        changed = {k: v for k, v in derived.to_mapping().items() if self.cfg.to_mapping()[k] != v}
        if changed:
            said = ", ".join(f"{k} = {v}" for k, v in changed.items())
            console.print(f"{said}: derived from the {num_nodes} sites connected")
            self.cfg = derived
            self.tell("configured")
        return self.cfg

    def wait_for_resumed_sites(self, num_nodes: int) -> int:
        """A resumed run (e.g. after the SuperLink restarted) waits a while for as many sites
        as answered the checkpoint's round, so that sites still reconnecting are not left
        out of the first resumed round; then goes on with those connected."""
        if self.checkpoint is None or not self.checkpoint.rows:
            return num_nodes
        last = self.checkpoint.rows[-1]
        expected = int(last.get("num_replies", 0))
        if num_nodes >= expected:
            return num_nodes
        wait = min(self.cfg.round_timeout, RESUME_WAIT)
        console.print(
            f"resuming: {num_nodes} of the {expected} sites that answered round {last['round']} are connected; "
            f"waiting up to {wait:.0f} s for the others"
        )
        try:
            return wait_for_nodes(self.grid, timeout=wait, minimum=expected)
        except RuntimeError:
            num_nodes = len(list(self.grid.get_node_ids()))
            console.print(f"[yellow]resuming with {num_nodes} of {expected} sites connected[/yellow]")
            return num_nodes

    def run_round(self, server_round: int) -> None:
        """Train round `server_round`; its messages also evaluate the previous round's model."""
        started = time.time()
        pending = self.pending_evaluation()
        train_messages = list(
            self.strategy.configure_train(
                server_round, self.arrays, self.message_config(pending is not None), self.grid
            )
        )
        sampled = {m.metadata.dst_node_id for m in train_messages}
        connected = set(self.grid.get_node_ids())  # (one request to the SuperLink in a deployment)
        unsampled = connected - sampled  # (fraction-train < 1, or sites that joined)
        eval_messages = self.evaluate_messages(pending, exclude=sampled) if pending is not None and unsampled else []
        offline = self.report_offline(server_round, connected)
        result = self.send(train_messages + eval_messages, f"round {server_round}")
        self.tell("exchanged", server_round, result, False)
        self.learn_data(result)
        if pending is not None:
            self.record_evaluation(pending, result)
        train_replies, failed = self.screen(result, "train")
        if len(train_replies) < self.cfg.min_replies:
            raise TooFewReplies(
                f"round {server_round}: {len(train_replies)} of {len(train_messages)} sites replied, fewer than "
                f"min-replies = {self.cfg.min_replies} ({'; '.join(failed) or 'no site was sampled'}). The run "
                f'stopped; resume it with resume-from = "latest" (checkpoint of round {server_round - 1} in '
                f"{checkpoint_dir(self.cfg.results_dir, self.cfg.run_name)})"
            )
        if self.cfg.secure_aggregation:
            arrays, metrics, failed = self.aggregate_securely(server_round, train_replies, failed)
        else:
            arrays, metrics = self.strategy.aggregate_train(server_round, train_replies)
        self.arrays = arrays
        row: dict[str, Any] = {"round": server_round, "round_seconds": time.time() - started}
        row.update(dict(metrics or {}))
        row["failed_sites"] = failed
        row["offline_sites"] = offline
        self.rows.append(row)
        self.tell("rows_changed")
        self.tell("round_closed", server_round)
        self.tell("faults", f"round {server_round}", failed, result.missing)
        if not self.due(server_round):
            self.tell("round_reported", row)

    def aggregate_securely(
        self, server_round: int, train_replies: list[Message], failed: list[str]
    ) -> tuple[ArrayRecord, MetricRecord, list[str]]:
        """SecAgg+ over the sites that trained (server_app/secure.py): the server learns
        only the weighted sum of their updates; a site that fails a stage is a failed site."""
        result = secure_sum(self.grid, self.cfg, self.book, server_round, train_replies, self.strategy.specs)
        summed = set(result.summed)
        replies = [m for m in train_replies if m.metadata.src_node_id in summed]
        upload = float(np.mean([result.upload_bytes.get(n, 0) for n in summed]))
        arrays, metrics = self.strategy.aggregate_secure(server_round, replies, result.mean_update, upload)
        return arrays, metrics, failed + result.failed

    def evaluate_final(self) -> None:
        """After the last round: evaluate the final model (one evaluate message per site)."""
        pending = self.pending_evaluation()
        if pending is None:
            return
        started = time.time()
        result = self.send(self.evaluate_messages(pending), f"final evaluation of round {pending}")
        self.tell("exchanged", pending, result, True)
        self.tell("faults", f"final evaluation of round {pending}", result.failed, result.missing)
        self.record_evaluation(pending, result, started=started)
        self.tell("round_closed", pending)

    def finish(self) -> dict[str, Any]:
        extra = {
            "run_name": self.cfg.run_name,
            "method": self.cfg.method,
            "dataset": self.cfg.dataset,
            "model": self.cfg.describe_model(),
        }
        if self.cfg.dp_noise_multiplier > 0:  # the delta that summary.json's dp_epsilon holds at
            extra["dp_delta"] = self.cfg.dp_delta
        if self.data_reports:
            extra["data"] = describe_sites(self.data_reports, self.in_deployment)
        summary = {**summarise(self.rows), **extra}
        self.tell("finished", summary)
        return summary

    # -- pieces -------------------------------------------------------------------
    def learn_data(self, result: Exchange) -> None:
        """Keep each site's report of its data; on the first reports of a run whose sites
        read their own split files, say what the split is, and which of the run config's
        partition settings do not apply to it."""
        first = not self.data_reports
        for msg in result.replies:
            record = msg.content.metric_records.get(DATA_RECORD)
            metrics = msg.content.metric_records.get(METRICS_RECORD) or {}
            if record is not None and SITE_ID_KEY in metrics:  # (a site's numbers: NaN is allowed, kept out)
                report = {k: float(v) for k, v in record.items() if math.isfinite(float(v))}
                self.data_reports[int(metrics[SITE_ID_KEY])] = report
        if not first or not self.data_reports:
            return
        data = describe_sites(self.data_reports, self.in_deployment)
        sizes = ", ".join(str(s.get("train", "?")) for s in data["sites"])
        if data["source"] == "sites":  # a deployment's sites with data not from partitions.split
            console.print(f"data as the sites report it: their own data; {sizes} training images")
        if data["source"] != "site files":
            return
        split = data.get("split")
        if split is None:
            console.print(
                "[yellow]the sites' data files were split with different settings: see summary.json's data[/yellow]"
            )
            return
        differ = config_mismatch(self.cfg, split)
        console.print(
            f"data as the sites report it: {describe_split(split)}; {sizes} training images"
            + (
                f"[yellow]; the run config's {'; '.join(differ)} do not apply: summary.json's data is the "
                "sites'[/yellow]"
                if differ
                else ""
            )
        )

    def due(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_server_rounds

    def pending_evaluation(self) -> int | None:
        """The round whose model is still to be evaluated (the last finished one, when due)."""
        if not self.rows:
            return None
        last = self.rows[-1]
        return last["round"] if self.due(last["round"]) and EVALUATED_KEY not in last else None

    def message_config(self, evaluate_received: bool) -> ConfigRecord:
        """What changes per message (the strategy adds the round); the settings go by digest."""
        return self.handover.config(evaluate_received, "local" if self.evaluator is not None else "all")

    def send(self, messages: list[Message], what: str) -> Exchange:
        """One exchange; the run's settings go with the messages to nodes that may not hold them."""
        messages = self.handover.attach(messages)
        result = exchange(self.grid, messages, self.cfg.round_timeout, self.book, what)
        self.handover.settle(
            [m.metadata.dst_node_id for m in messages], [m.metadata.src_node_id for m in result.replies]
        )
        return result

    def report_offline(self, server_round: int, connected: set[int]) -> list[str]:
        """Sites that were connected in an earlier round (answered or not) but that the
        SuperLink no longer lists as `connected` (it drops a node that missed its
        heartbeats), told to the listeners."""
        known = self.book.seen | set(self.book.sites)
        offline = [self.book.label(node) for node in sorted(known - connected)]
        self.book.seen |= connected
        if offline:
            self.tell("sites_offline", server_round, offline)
        return offline

    def evaluate_messages(self, server_round: int, exclude: set[int] = frozenset()) -> list[Message]:
        """Evaluate messages (the current global model is round `server_round`'s) for the
        connected sites not in `exclude`."""
        messages = self.strategy.configure_evaluate(server_round, self.arrays, self.message_config(False), self.grid)
        return [m for m in messages if m.metadata.dst_node_id not in exclude]

    def screen(self, result: Exchange, message_type: str) -> tuple[list[Message], list[str]]:
        """The replies of one type fit to aggregate, and every failure of the exchange
        (no reply, error replies, replies the strategy refused), labelled by site."""
        good, bad = self.strategy.screen(result.of_type(message_type))
        failed = result.failed + [f"{self.book.label(m.metadata.src_node_id)}: {reason}" for m, reason in bad]
        return good, failed

    def record_evaluation(self, server_round: int, result: Exchange, started: float | None = None) -> None:
        """Round `server_round`'s evaluation metrics (from the sites, and from the server
        when it evaluates the official splits itself) into its row; then report it.
        `started`: when the final evaluation began; its time is added to the last round's
        `round_seconds` before the row is written and printed (one figure in both)."""
        site_tested = any(
            "test_acc" in m.content[EVALUATION_RECORD]
            for m in result.replies
            if EVALUATION_RECORD in m.content.metric_records
        )
        # the server's own evaluation only stands in for sites that skipped the official splits
        central = self.evaluator(self.arrays) if self.evaluator is not None and not site_tested else None
        metrics = self.strategy.aggregate_evaluate(server_round, result.replies, central) or MetricRecord({})
        row = next(r for r in self.rows if r["round"] == server_round)
        row.update(dict(metrics))
        row[EVALUATED_KEY] = row.get(EVALUATED_KEY, 0)
        row["failed_eval_sites"] = result.failed
        if started is not None:
            row["round_seconds"] += time.time() - started
        self.tell("rows_changed")
        self.tell("round_reported", row)
