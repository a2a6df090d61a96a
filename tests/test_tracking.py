"""RunTracker: TensorBoard scalars read back, plots, the time estimate, MLflow opt-in (no Flower)."""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server_app import tracking
from server_app.results import RunResults
from server_app.tracking import RunTracker, write_plots

PNG = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"round": 1, "round_seconds": 2.0, "train_loss": 1.0, "global_acc_mean": 0.5, "local_acc_mean": None,
     "gamma": 0.2, "gamma_R": 0.1, "num_replies": 3, "failed_sites": []},
    # not evaluated, a failed site, NaN loss, a bool and a str: none of these is a scalar
    {"round": 2, "round_seconds": 2.5, "train_loss": math.nan, "global_acc_mean": None, "gamma": 0.3,
     "num_replies": 2, "failed_sites": ["site-1"], "resumed": True, "method": "fusedspacefed"},
    {"round": 3, "round_seconds": 1.5, "train_loss": 0.5, "global_acc_mean": np.float32(0.75), "gamma": 0.25,
     "rec_loss": 0.05, "num_replies": 3, "failed_sites": []},
]  # fmt: skip


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def png_names(run_dir: Path) -> set[str]:
    files = sorted((run_dir / "plots").glob("*.png"))
    assert all(f.read_bytes()[:8] == PNG for f in files)
    return {f.stem for f in files}


def test_scalars_go_to_tensorboard_and_plots_to_the_run_folder(tmp_path: Path) -> None:
    tracker = RunTracker(tmp_path, num_rounds=3)
    for row in ROWS:
        tracker.log_round(row)
    tracker.close()
    tracker.close()  # twice is harmless

    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    got = scalars(tmp_path)
    assert set(got) == {"round_seconds", "train_loss", "global_acc_mean", "gamma", "gamma_R", "num_replies", "rec_loss"}
    assert got["global_acc_mean"] == [(1, pytest.approx(0.5)), (3, pytest.approx(0.75))]
    assert got["train_loss"] == [(1, pytest.approx(1.0)), (3, pytest.approx(0.5))]
    assert got["num_replies"] == [(1, 3.0), (2, 2.0), (3, 3.0)]
    assert [step for step, _ in got["gamma"]] == [1, 2, 3]
    assert png_names(tmp_path) == {"accuracy", "loss", "gamma"}


def test_a_plot_without_any_value_is_skipped(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if not k.startswith("gamma")} for r in ROWS]
    assert [p.name for p in write_plots(tmp_path, rows)] == ["accuracy.png", "loss.png"]
    rows[0]["gamma"] = None  # present but never a number
    rows[1]["gamma"] = math.nan
    write_plots(tmp_path / "b", rows)
    assert png_names(tmp_path / "b") == {"accuracy", "loss"}
    assert write_plots(tmp_path / "c", []) == []


def test_progress_estimates_from_the_rounds_of_this_process(tmp_path: Path) -> None:
    tracker = RunTracker(tmp_path, num_rounds=5, tensorboard=False)
    tracker.clock = lambda: 1060.0
    # 2 of 5 rounds in 60 s: 30 s each, 3 left
    assert tracker.progress(2, started_at=1000.0) == "elapsed 1m 00s, ~1m 30s left"
    assert tracker.progress(5, started_at=1000.0) == "elapsed 1m 00s, ~0s left"
    # resumed at round 4: one round done here in 60 s, 1 left
    assert tracker.progress(4, started_at=1000.0, first_round=4) == "elapsed 1m 00s, ~1m 00s left"
    assert tracker.progress(3, started_at=1055.0, first_round=4) == "elapsed 5s"  # nothing done yet
    tracker.num_rounds = 200
    assert tracker.progress(1, started_at=1000.0) == "elapsed 1m 00s, ~3h 19m left"
    tracker.close()
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "plots").exists()


def test_a_resumed_run_continues_the_events_and_the_plots(tmp_path: Path, monkeypatch) -> None:
    first = RunTracker(tmp_path, num_rounds=3)
    for server_round, acc in ((1, 0.1), (2, 0.2), (3, 0.3)):
        first.log_round({"round": server_round, "global_acc_mean": acc})
    first.close()
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": r, "global_acc_mean": 0.1}) + "\n" for r in (1, 2, 3))
    )

    plotted: list[list[dict]] = []
    monkeypatch.setattr(tracking, "write_plots", lambda run_dir, rows: plotted.append(rows) or [])
    # A resumed run is a later process: its event file's name (seconds, host, pid, a per-process
    # counter) sorts after the first one's. In one process within one second it need not
    # (counter 10 sorts before 9), and TensorBoard would read the purge before the old events.
    time.sleep(1.05 - time.time() % 1)
    second = RunTracker(tmp_path, num_rounds=3)  # resumed from the checkpoint of round 1
    second.log_round({"round": 2, "global_acc_mean": 0.9})
    second.log_round({"round": 3, "global_acc_mean": 0.95})
    second.close()

    assert scalars(tmp_path)["global_acc_mean"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.9)), (3, pytest.approx(0.95))]  # fmt: skip
    assert [(r["round"], r["global_acc_mean"]) for r in plotted[0]] == [(1, 0.1), (2, 0.9), (3, 0.95)]


def test_tracking_problems_never_stop_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # package missing
    tracker = RunTracker(tmp_path, num_rounds=3)
    tracker.log_round(ROWS[0])

    def broken(run_dir: Path, rows: list[dict]) -> list[Path]:
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "write_plots", broken)
    tracker.close()
    err = capsys.readouterr().err
    assert "TensorBoard logging is off" in err and "plots not written (OSError: disk full)" in err
    assert not (tmp_path / "tensorboard").exists()


def test_mlflow_asked_for_but_not_installed_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(RuntimeError, match=r"track-mlflow = true.*pip install mlflow"):
        RunTracker(tmp_path, num_rounds=3, tensorboard=False, mlflow=True)
    RunTracker(tmp_path, num_rounds=3, tensorboard=False).close()  # not asked for: no error


def test_mlflow_gets_params_metrics_and_plots(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []
    fake = types.SimpleNamespace(
        start_run=lambda **kw: calls.append(("start", kw)),
        log_params=lambda params: calls.append(("params", params)),
        log_metrics=lambda metrics, step: calls.append(("metrics", step, metrics)),
        log_artifact=lambda path, artifact_path: calls.append(("artifact", Path(path).name, artifact_path)),
        end_run=lambda: calls.append(("end",)),
    )
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    tracker = RunTracker(tmp_path, 3, tensorboard=False, mlflow=True, run_name="r1", config={"lr": 0.1, "dz": 16})
    tracker.log_round(ROWS[1])
    tracker.close()
    assert calls[0] == ("start", {"run_name": "r1"})
    assert calls[1] == ("params", {"lr": "0.1", "dz": "16"})
    assert calls[2] == ("metrics", 2, {"round_seconds": 2.5, "gamma": 0.3, "num_replies": 2.0})
    assert ("artifact", "gamma.png", "plots") in calls and calls[-1] == ("end",)


def test_cli_plots_an_existing_run(tmp_path: Path, capsys) -> None:
    rows = [{k: float(v) if isinstance(v, np.floating) else v for k, v in r.items()} for r in ROWS]
    RunResults(tmp_path.parent, tmp_path.name).write_rounds(rows)  # as the ServerApp writes it (NaN -> null)
    assert tracking.main([str(tmp_path)]) == 0
    assert png_names(tmp_path) == {"accuracy", "loss", "gamma"}
    assert tracking.main([str(tmp_path / "missing")]) == 1
    assert tracking.main([]) == 2
