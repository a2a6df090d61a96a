"""Real `flwr run .` runs through scripts/simulate.sh: a tiny configuration, and runs that
fail and must say so in the exit status; the sweep's Flower engine likewise.

Uses its own FLWR_HOME and ports, and stops the local SuperLink it caused to start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.pilot_harness import free_port, simulate_sh, stop_superlinks

pytestmark = pytest.mark.slow  # each starts Flower's local SuperLink and Ray


@pytest.fixture
def flwr_env(tmp_path):
    control_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        # 2 CPUs a site: one Ray actor on a 2-core machine instead of two (each pays its own
        # imports of torch, Flower and the ClientApp, about 5 CPU-s); the sites take turns
        "FSF_CPUS_PER_SITE": "2",
    }
    yield env
    stop_superlinks(control_port)


def test_flwr_run_tiny_configuration(flwr_env, tmp_path, real_data_root):
    results = tmp_path / "results"
    run_config = (
        f"dataset='breastmnist' num-server-rounds=2 local-epochs=1 warmup-epochs=1 warmup-min-steps=0 "
        f"data-root='{real_data_root}' results-dir='{results}' run-name='flwr-run' download=false"
    )
    proc = simulate_sh("--run-config", run_config, "--federation-config", "num-supernodes=3", env=flwr_env, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    run_dir = results / "flwr-run"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert "round 2/2" in output  # the per-round progress line reached the console
    assert json.loads((run_dir / "summary.json").read_text())["final"]["round"] == 2
    assert (run_dir / "global_model.pt").exists() and (run_dir / "config.json").exists()


def test_a_run_that_fails_exits_non_zero(flwr_env, tmp_path):
    """The configuration passes the pre-flight check but every site fails (no data, no
    download): `flwr run --stream` exits 0, simulate.sh must not."""
    run_config = (
        f"dataset='breastmnist' num-server-rounds=1 local-epochs=1 warmup-epochs=0 download=false "
        f"data-root='{tmp_path / 'no-data'}' results-dir='{tmp_path / 'results'}' run-name='fails'"
    )
    proc = simulate_sh("--run-config", run_config, "--federation-config", "num-supernodes=2", env=flwr_env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "failed: finished:failed" in output.strip().splitlines()[-1], output[-2000:]
    assert not (tmp_path / "results" / "fails" / "summary.json").exists()


def test_the_sweeps_flower_engine_reports_a_failed_run(tmp_path, real_data_root):
    """An invalid method reaches the ServerApp of the sweep's child (nothing checks it
    earlier): the run is logged as failed, with the one-line reason, and the sweep exits 1."""
    results = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweep", "--engine", "flower", "--methods", "fedfoo"]
        + ["--datasets", "breastmnist", "--alphas", "0.5", "--seeds", "0", "--rounds", "1", "--sites", "2"]
        + ["--local-epochs", "1", "--warmup-epochs", "0", "--data-root", str(real_data_root)]
        + ["--results-dir", str(results)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    (entry,) = [json.loads(line) for line in (results / "sweep.jsonl").read_text().splitlines()]
    assert entry["ok"] is False and entry["engine"] == "flower"
    (log,) = results.glob("*/run.log")
    assert "config error: method must be one of" in log.read_text()
