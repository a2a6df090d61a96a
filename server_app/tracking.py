"""Per-round tracking of a run: TensorBoard event files, MLflow (opt-in), plots and a time estimate.

metrics.jsonl stays the record of a run; this module only mirrors it to tools people
watch while a run goes (TensorBoard, MLflow) and leaves plots in the run folder at the end.
A tracking problem never stops training, except asking for MLflow without having it.
A resumed run continues the same event files and plots: TensorBoard hides what an earlier
process logged from the first round run again, and the plots take earlier rounds from metrics.jsonl.

    python -m server_app.tracking RUN_DIR   # plots for a run made before this existed
"""

from __future__ import annotations

import io
import math
import numbers
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.console import console
from core.files import atomic_write_bytes
from core.run_folder import METRICS_FILE, RunFolder, RunFolderError

# plot name -> (y-axis label, series plotted when present)
PLOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "accuracy": ("accuracy", ("global_acc_mean", "global_acc_worst", "local_acc_mean", "val_acc_mean")),
    "loss": ("loss", ("train_loss", "rec_loss", "warmup_loss")),
    "gamma": ("Gamma", ("gamma", "gamma_orig", "gamma_R", "gamma_Phi")),
}

MLFLOW_MISSING = (
    "mlflow tracking was asked for (track-mlflow = true) but the mlflow package is not installed: pip install mlflow"
)


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a row (no round, bools, strings, lists, None or NaN): what a tracker can plot."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


def format_seconds(seconds: float) -> str:
    """Short human durations: 42s, 1m 23s, 2h 05m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def write_plots(run_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write plots/<name>.png for every plot with at least one value; returns the files written."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg canvas on save

    written: list[Path] = []
    for name, (ylabel, keys) in PLOTS.items():
        series = {}
        for key in keys:
            points = [(r["round"], v[key]) for r in rows if key in (v := scalars(r)) and "round" in r]
            if points:
                series[key] = points
        if not series:
            continue
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for key, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per round ({run_dir.name})")
        ax.grid(alpha=0.3)
        ax.legend()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        path = run_dir / "plots" / f"{name}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


class RunTracker:
    """Mirrors each round's row to TensorBoard/MLflow, estimates the time left, writes plots on close."""

    def __init__(
        self,
        run_dir: Path,
        num_rounds: int,
        *,
        tensorboard: bool = True,
        mlflow: bool = False,
        run_name: str = "",
        config: dict | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.num_rounds = num_rounds
        self.rows: list[dict[str, Any]] = []
        self.clock: Callable[[], float] = time.time  # same clock as the round loop's started_at
        self._writer_class: Any = None
        self._writer: Any = None
        self._mlflow: Any = None
        self._closed = False
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer_class = SummaryWriter
            except Exception as exc:  # the tensorboard package is missing: train on without it
                _warn(f"TensorBoard logging is off ({type(exc).__name__}: {exc})")
        if mlflow:
            try:
                import mlflow as mlflow_module
            except ImportError as exc:
                raise RuntimeError(MLFLOW_MISSING) from exc
            mlflow_module.start_run(run_name=run_name or self.run_dir.name)
            if config:
                mlflow_module.log_params({k: str(v)[:500] for k, v in config.items()})
            self._mlflow = mlflow_module

    def log_round(self, row: dict[str, Any]) -> None:
        """Every finite number of the row as a scalar at step row["round"]."""
        self.rows.append(dict(row))
        step = int(row["round"])
        values = scalars(row)
        if self._writer is None and self._writer_class is not None:
            try:
                # purge_step: a resumed run hides the events an earlier process logged from this round on
                self._writer = self._writer_class(log_dir=str(self.run_dir / "tensorboard"), purge_step=step)
            except Exception as exc:  # unwritable folder: train on without it
                _warn(f"TensorBoard logging is off ({type(exc).__name__}: {exc})")
            self._writer_class = None
        if self._writer is not None:
            try:
                for key, value in values.items():
                    self._writer.add_scalar(key, value, global_step=step)
                self._writer.flush()  # rounds are minutes apart: make each visible at once
            except Exception as exc:
                _warn(f"TensorBoard logging stopped ({type(exc).__name__}: {exc})")
                self._writer = None
        if self._mlflow is not None and values:
            try:
                self._mlflow.log_metrics(values, step=step)
            except Exception as exc:
                _warn(f"MLflow logging failed for round {step} ({type(exc).__name__}: {exc})")

    def progress(self, server_round: int, started_at: float, first_round: int = 1) -> str:
        """'elapsed 1m 23s, ~4m 10s left': mean time of the rounds run in this process times rounds left."""
        elapsed = self.clock() - started_at
        text = f"elapsed {format_seconds(elapsed)}"
        done = server_round - first_round + 1
        if done <= 0:
            return text
        left = max(0, self.num_rounds - server_round) * elapsed / done
        return f"{text}, ~{format_seconds(left)} left"

    def close(self) -> None:
        """Flush and close the writers, then write the plots; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:
                _warn(f"closing TensorBoard failed ({type(exc).__name__}: {exc})")
            self._writer = None
        plots: list[Path] = []
        try:
            plots = write_plots(self.run_dir, self._earlier_rows() + self.rows)
        except Exception as exc:
            _warn(f"plots not written ({type(exc).__name__}: {exc})")
        if self._mlflow is not None:
            try:
                for path in plots:
                    self._mlflow.log_artifact(str(path), artifact_path="plots")
                self._mlflow.end_run()
            except Exception as exc:
                _warn(f"closing the MLflow run failed ({type(exc).__name__}: {exc})")
            self._mlflow = None

    def _earlier_rows(self) -> list[dict[str, Any]]:
        """Rounds a resumed run did in an earlier process (from metrics.jsonl), so plots cover the whole run."""
        if not self.rows:
            return []
        first = self.rows[0]["round"]
        try:
            return [r for r in RunFolder(self.run_dir).rows() if isinstance(r.get("round"), int) and r["round"] < first]
        except Exception as exc:
            _warn(f"earlier rounds left out of the plots ({type(exc).__name__}: {exc})")
            return []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m server_app.tracking RUN_DIR", file=sys.stderr)
        return 2
    run = RunFolder(Path(args[0]))
    if not run.metrics_path.exists():
        print(f"no {METRICS_FILE} in {run.path}", file=sys.stderr)
        return 1
    try:
        rows = run.rows()
    except RunFolderError as exc:
        print(exc, file=sys.stderr)
        return 1
    for path in write_plots(run.path, rows):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
