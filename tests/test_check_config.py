"""The pre-flight config check, the one-line config errors and reading a run's final status (fast)."""

from __future__ import annotations

import logging
import os

import pytest
from flwr.app import Context, RecordDict

from core.check_config import EXIT_CONFIG_ERROR, app_defaults, check, describe, main
from core.config import ConfigError, RunConfig
from core.run_status import final_status, run_id_from, verdict
from server_app.app import RunConfigRejected, create_server_app


def test_a_good_run_config_is_the_one_flwr_would_build():
    cfg = check(["dataset='breastmnist' num-server-rounds=3", "lr=0.05 task-aware=false"])
    assert (cfg.dataset, cfg.num_server_rounds, cfg.lr, cfg.task_aware) == ("breastmnist", 3, 0.05, False)
    assert cfg.batch_size == app_defaults()["batch-size"]  # the rest from pyproject.toml


def test_no_overrides_means_pyproject_defaults():
    assert check([]) == RunConfig.from_mapping(app_defaults())


@pytest.mark.parametrize(
    ("run_config", "expected"),
    [
        ("method='fedfoo'", ["method", "'fedfoo'", "fusedspacefed", "fedavg", "fedbn"]),
        ("partition='zipf'", ["partition", "'zipf'", "dirichlet-equal", "iid"]),
        ("alpha=0", ["alpha", "> 0", "got 0"]),
        ("local-epochs='three'", ["local-epochs", "int", "'three'"]),
        ("learning-rate=0.1", ["learning-rate", "known keys", "'lr'"]),
        ("lr=-1", ["lr", "> 0", "lr=-1"]),
        ("lr-ae=0", ["lr-ae", "> 0", "lr-ae=0"]),
        ("device='tpu'", ["device", "'tpu'", "cpu", "cuda"]),
    ],
)
def test_a_bad_config_is_one_line_naming_key_value_and_allowed(run_config, expected, capsys):
    assert main(["--run-config", run_config]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: "), err
    for part in expected:
        assert part in err, (part, err)


def test_a_malformed_run_config_is_one_line_too(tmp_path, capsys):
    assert main(["--run-config", str(tmp_path / "missing.toml")]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.toml" in err


def test_every_range_check_names_its_key_and_value():
    """Each validate() message, provoked one by one: it names the key and the offending value."""
    bad = {
        "classes-per-client": 0,
        "num-server-rounds": 0,
        "fraction-train": 1.5,
        "warmup-epochs": -1,
        "batch-size": 0,
        "momentum": 1.0,
        "weight-decay": -0.5,
        "lambda-rec": -2.0,
        "dz": 0,
        "proximal-mu": -0.25,
        "gamma-batch-size": 0,
        "eval-every": 0,
        "num-threads": -3,
        "min-replies": 0,
        "round-timeout": -7.0,
        "l2sp-lambda": -0.125,
        "keep-checkpoints": -4,
        "dp-clip-norm": -0.75,
        "dp-noise-multiplier": -1.25,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError) as info:
            RunConfig.from_mapping({key: value})
        message = describe(info.value)
        assert key in message and str(value) in message, message


def test_the_server_app_logs_one_line_and_fails(caplog):
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with caplog.at_level(logging.ERROR), pytest.raises(RunConfigRejected, match="method must be one of"):
        create_server_app({"method": "fedfoo"})(grid=None, context=context)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("config error: method must be one of ("), errors
    assert "'fedavg'" in errors[0] and errors[0].endswith("got 'fedfoo'")


def test_the_run_id_comes_from_flwr_runs_output():
    assert run_id_from("Using SuperLink: local\nSuccessfully started run 11514285506904241291\n") == (
        11514285506904241291
    )
    assert run_id_from("Error: could not connect to the SuperLink") is None


def test_only_a_completed_run_succeeds():
    assert verdict(7, "finished:completed", "")[0] == 0
    code, line = verdict(
        7, "finished:failed", "Simulation failed with exception: \x1b[36mboom\x1b[39m\n  x" + "y" * 900
    )
    assert code == 1 and line.startswith("run 7 failed: finished:failed (Simulation failed with exception: boom x")
    assert "\n" not in line and "\x1b" not in line and len(line) < 500
    assert verdict(7, "finished:stopped", "")[0] == 1
    assert verdict(7, "running", "")[0] == 1  # never finished within the timeout
    assert verdict(None, "", "")[0] == 1  # no run was started


def test_the_final_status_is_awaited():
    answers = iter([("running", ""), ("running", ""), ("finished:failed", "oops")])
    assert final_status(3, timeout=10, poll=0, query=lambda run_id: next(answers)) == ("finished:failed", "oops")
    assert final_status(3, timeout=0, poll=0, query=lambda run_id: ("running", "")) == ("running", "")


def test_simulate_sh_stops_a_bad_method_before_flwr_starts(tmp_path):
    """One line on stderr, exit status 2, and no SuperLink (own FLWR_HOME and ports, cleaned up
    should the check ever let the run through)."""
    from tests.pilot_harness import free_port, simulate_sh, stop_superlinks

    control_port = free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
    }
    try:
        proc = simulate_sh("--run-config", "method='fedfoo' num-server-rounds=1", env=env, timeout=120)
    finally:
        stop_superlinks(control_port)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("config error: method must be one of (") and "got 'fedfoo'" in proc.stderr
    assert not any((tmp_path / "flwr-home").iterdir())  # flwr never ran (it writes config.toml first)
