"""What happens around the round loop, each as a listener of it.

`FederatedRun` (server_app/rounds.py) runs the rounds: configure, exchange, screen,
aggregate, evaluate. It tells its listeners what happened, in this order within a round:
`exchanged` (the replies of an exchange are in), `rows_changed` (a round's row was added or
completed), `round_closed` (the global model of a round is final: aggregated, or evaluated
after the last round), `faults` (sites that failed or went missing), `round_reported` (a
round is trained and, when due, evaluated); before a round's exchange, `sites_offline`
(sites the SuperLink no longer lists). Around the rounds: `configured` (the run's
settings, again when the federation changes them), `finished` (the summary) and `close`
(also after a failure).

The listeners:
- `RunFolderFiles`: the run folder (server_app/results.py writes it; core/run_folder.py
  reads it): config.json, metrics.jsonl, timeline.jsonl, the final model, summary.json;
- `Checkpoints`: a checkpoint after every round, for `resume-from` (server_app/checkpoint.py);
- `ConsoleReport`: the fault lines and one progress line per round, plus tracking
  (TensorBoard, MLflow, plots: server_app/tracking.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from core.console import console
from core.data_report import majority_class
from server_app.checkpoint import write_checkpoint
from server_app.faults import Exchange, report_failures
from server_app.results import RunResults
from server_app.tracking import RunTracker

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from core.config import RunConfig


class RunView(Protocol):
    """What a listener reads of the round loop (server_app/rounds.py's FederatedRun): named
    here so that the loop imports its listeners and never the other way round."""

    cfg: RunConfig
    rows: list[dict[str, Any]]
    arrays: ArrayRecord
    strategy: Any  # a strategies/ strategy: `checkpoint_state()` for the checkpoints
    results: RunResults
    first_round: int  # the round this start of the run began with (after a resume: past 1)


def progress_line(row: dict[str, Any], num_rounds: int, eta: str = "") -> str:
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
    # health (docs/recipe.md): is the fused space informative, do the BatchNorm statistics fit?
    if isinstance(row.get("rec_r2_worst"), float):
        parts.append(f"R2 {row['rec_r2']:.2f} (worst {row['rec_r2_worst']:.2f}) dep {row['rec_dependence']:.2f}")
    if isinstance(row.get("bn_gap"), float):
        parts.append(f"BN gap {100 * row['bn_gap']:+.1f} pts")
    if majority_class(row):
        parts.append(
            f"[yellow]= majority class ({100 * row['test_majority_share']:.2f} %): learnt nothing yet[/yellow]"
        )
    return "  ".join(parts) + (f"  [dim]{eta}[/dim]" if eta else "")


class RunListener:
    """A listener of the round loop: every event is optional (a no-op here)."""

    def configured(self, run: RunView) -> None:
        """The run's settings are settled (again, when the federation changed them)."""

    def exchanged(self, run: RunView, server_round: int, result: Exchange, final: bool) -> None:
        """An exchange's replies are in (`final`: the evaluation after the last round)."""

    def rows_changed(self, run: RunView) -> None:
        """`run.rows` gained a round or a round's evaluation."""

    def round_closed(self, run: RunView, server_round: int) -> None:
        """`run.arrays` is round `server_round`'s global model (0: the initial one)."""

    def sites_offline(self, run: RunView, server_round: int, labels: list[str]) -> None:
        """Sites connected in an earlier round that the SuperLink no longer lists (not asked)."""

    def faults(self, run: RunView, what: str, failed: list[str], missing: Iterable[str]) -> None:
        """Sites that failed an exchange, labelled as in `failed_sites`."""

    def round_reported(self, run: RunView, row: dict[str, Any]) -> None:
        """A round is finished: trained and, when due, evaluated."""

    def finished(self, run: RunView, summary: dict[str, Any]) -> None:
        """The run is over; `summary` is what summary.json holds."""

    def close(self) -> None:
        """The run stopped, finished or not."""


class RunFolderFiles(RunListener):
    """The run folder's files, each written atomically as the run goes."""

    def __init__(self, results: RunResults) -> None:
        self.results = results

    def configured(self, run: RunView) -> None:
        self.results.write_config(run.cfg.to_mapping())

    def exchanged(self, run: RunView, server_round: int, result: Exchange, final: bool) -> None:
        self.results.write_timeline(server_round, result, final=final)

    def rows_changed(self, run: RunView) -> None:
        self.results.write_rounds(run.rows)

    def finished(self, run: RunView, summary: dict[str, Any]) -> None:
        self.results.write_model(run.arrays.to_torch_state_dict())
        self.results.write_summary(summary)


class Checkpoints(RunListener):
    """A checkpoint of every round's global model, strategy state and rows."""

    def round_closed(self, run: RunView, server_round: int) -> None:
        write_checkpoint(
            run.cfg, server_round, run.arrays.to_torch_state_dict(), run.strategy.checkpoint_state(), run.rows
        )


class ConsoleReport(RunListener):
    """What a person watching the run sees: fault lines, a progress line per round with an
    estimate of the time left, the final warning and where the results are; and the
    same rounds mirrored to TensorBoard, MLflow and the plots."""

    def __init__(self, tracker: RunTracker, started: float) -> None:
        self.tracker = tracker
        self.started = started

    def sites_offline(self, run: RunView, server_round: int, labels: list[str]) -> None:
        for label in labels:
            console.print(
                f"[yellow]round {server_round}: {label} is offline (not connected to the SuperLink): "
                "not asked this round[/yellow]"
            )

    def faults(self, run: RunView, what: str, failed: list[str], missing: Iterable[str]) -> None:
        report_failures(what, failed, missing)

    def round_reported(self, run: RunView, row: dict[str, Any]) -> None:
        self.tracker.log_round(row)
        eta = self.tracker.progress(row["round"], self.started, run.first_round)
        console.print(progress_line(row, run.cfg.num_server_rounds, eta))

    def finished(self, run: RunView, summary: dict[str, Any]) -> None:
        if "warning" in summary:
            console.print(f"[yellow]warning: {run.cfg.method} ({run.cfg.run_name}): {summary['warning']}[/yellow]")
        console.print(f"results written to {run.results.dir}")

    def close(self) -> None:
        self.tracker.close()  # TensorBoard events flushed and plots written, also after a failure
