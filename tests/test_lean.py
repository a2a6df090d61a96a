"""The lean runner (benchmarks/lean.py: the round loop and ClientApp in one process, no
Ray) gives exactly the metrics and model of Flower's simulation for the same seed, so
sweeps run on it (and on a GPU machine without Ray) measure the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.lean import run_lean
from tests.conftest import RAY_TEST_BACKEND, tiny_blood_run, write_fake_medmnist

pytestmark = pytest.mark.slow  # a Flower (Ray) simulation and the GPU sweep script, 50-70 s each

VOLATILE = {"round_seconds"}  # wall-clock time


def _rows(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_lean_runner_matches_the_flower_simulation(tmp_path):
    from flwr.simulation import run_simulation

    import client_app.app as client
    from server_app.app import create_server_app

    write_fake_medmnist(tmp_path / "data", "bloodmnist", sizes=(150, 30, 60))
    config = tiny_blood_run(tmp_path / "data", "fusedspacefed", **{"measure-gamma": True, "run-name": "same"})
    run_simulation(
        server_app=create_server_app({**config, "results-dir": str(tmp_path / "flower")}),
        client_app=client.app,
        num_supernodes=3,
        backend_config=RAY_TEST_BACKEND,
    )
    summary = run_lean({**config, "results-dir": str(tmp_path / "lean")}, 3)
    flower, lean = _rows(tmp_path / "flower" / "same"), _rows(tmp_path / "lean" / "same")
    assert len(flower) == 2 and flower[-1]["num_evaluated"] == 3 and "gamma" in flower[0]
    assert lean == flower
    a = torch.load(tmp_path / "flower" / "same" / "global_model.pt", weights_only=True)
    b = torch.load(tmp_path / "lean" / "same" / "global_model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["final"]["global_acc_mean"] == flower[-1]["global_acc_mean"]


def test_the_gpu_sweep_script_rehearsed_on_cpu(tmp_path):
    """benchmarks/gpu-sweep.sh with the tiny grid: both protocols run in parallel with the
    lean engine, every run finishes with its reference selection, a second call has
    nothing left to do, and the report renders the reference-protocol table. The script's
    plumbing is what is rehearsed, so on a synthetic BreastMNIST of 90 training images: the
    four runs took 49 CPU-s on it and 87 on the real file's 546 (measured side by side with
    other work, so as a ratio)."""
    import os
    import subprocess
    import sys

    from benchmarks import report

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu-runs"
    grid = tmp_path / "grid.toml"
    data_root = tmp_path / "data"
    write_fake_medmnist(data_root, "breastmnist", sizes=(90, 24, 30), channels=1, num_classes=2)
    grid.write_text((repo / "benchmarks" / "gpu-grid-tiny.toml").read_text() + f'\ndata-root = "{data_root}"\n')
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "PARALLEL": "2", "STOP_AFTER": "600"}
    cmd = ["bash", str(repo / "benchmarks" / "gpu-sweep.sh"), "run", "--device", "cpu", "--grid", str(grid)]
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir() if (p / "summary.json").exists())
    assert (
        len(names) == 4
        and any("-ref-no-warmup-" in n for n in names)
        and any(n.startswith("fedavg-ref") for n in names)
    )
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["reference_selection"]["round"] in (1, 2)
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert "4 done already, 0 to run" in again.stdout + again.stderr
    runs, unfinished = report.load_runs(out)
    table = "\n".join(report.reference_table(report.cells(runs)))
    assert not unfinished and "FusedSpaceFed, reference protocol, no warm-up" in table and "| reference |" in table
