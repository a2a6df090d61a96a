"""One real `flwr run .` of a tiny configuration, through scripts/simulate.sh.

Uses its own FLWR_HOME and ports, and stops the local SuperLink it caused to start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from tests.conftest import REPO
from tests.pilot_harness import stop_superlinks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flwr_env(tmp_path):
    control_port, http_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
    }
    yield env
    stop_superlinks(control_port)


def test_flwr_run_tiny_configuration(flwr_env, tmp_path, real_data_root):
    results = tmp_path / "results"
    run_config = (
        f"dataset='breastmnist' num-server-rounds=2 local-epochs=1 warmup-epochs=1 "
        f"data-root='{real_data_root}' results-dir='{results}' run-name='flwr-run' download=false"
    )
    proc = subprocess.run(
        [str(REPO / "scripts" / "simulate.sh"), "--run-config", run_config, "--federation-config", "num-supernodes=3"],
        cwd=REPO,
        env=flwr_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    run_dir = results / "flwr-run"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert "round 2/2" in output  # the per-round progress line reached the console
    assert json.loads((run_dir / "summary.json").read_text())["final"]["round"] == 2
    assert (run_dir / "global_model.pt").exists() and (run_dir / "config.json").exists()
