"""Each method added through the contract runs in Flower's Ray simulation and in the lean
engine (benchmarks/lean.py), and both write the same metrics."""

from __future__ import annotations

import json

import pytest

METHODS_ADDED = ("lg-fedavg", "fedper", "fedrep", "ditto", "feddaf", "fraug", "fusefl")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS_ADDED)
def test_runs_in_flowers_simulation_and_the_lean_engine_alike(tmp_path, method):
    """Flower's Ray simulation and the lean engine write the same metrics for the method."""
    from flwr.simulation import run_simulation

    import client_app.app as client
    from benchmarks.lean import run_lean
    from server_app.app import create_server_app
    from tests.conftest import RAY_TEST_BACKEND, tiny_blood_run, write_fake_medmnist

    # the defaults test's small data: about 1 CPU-s less per engine than (120, 30, 40)
    write_fake_medmnist(tmp_path / "data", "bloodmnist", sizes=(60, 16, 20))
    # every method on its own defaults (FuseFL derives its stage, its 2 columns and min-replies)
    config = tiny_blood_run(tmp_path / "data", method, **{"run-name": "same"})
    run_simulation(
        server_app=create_server_app({**config, "results-dir": str(tmp_path / "flower")}),
        client_app=client.app,
        num_supernodes=2,
        backend_config=RAY_TEST_BACKEND,
    )
    run_lean({**config, "results-dir": str(tmp_path / "lean")}, 2)

    def rows(engine):
        lines = (tmp_path / engine / "same" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "round_seconds"} for line in lines]

    flower, lean = rows("flower"), rows("lean")
    assert len(flower) == 2 and flower[-1]["num_evaluated"] == 2 and flower[-1]["failed_sites"] == []
    assert lean == flower


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(__import__("core.methods", fromlist=["METHODS"]).METHODS))
def test_every_method_runs_on_its_defaults(tmp_path, method):
    """A short run of every registered method with none of its own settings given (the
    common ones only: data, 2 rounds of 1 epoch, 2 sites): what follows from the federation,
    such as FuseFL's columns and the replies it needs, is derived, never a config error."""
    from benchmarks.lean import run_lean
    from tests.conftest import tiny_blood_run, write_fake_medmnist

    write_fake_medmnist(tmp_path / "data", "bloodmnist", sizes=(60, 16, 20))
    config = tiny_blood_run(tmp_path / "data", method, **{"run-name": "defaults", "results-dir": str(tmp_path)})
    del config["warmup-min-steps"]  # the method's own default, as a user's first run has it
    run_lean(config, 2)
    rows = [json.loads(line) for line in (tmp_path / "defaults" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[-1]["failed_sites"] == [] and rows[-1]["num_evaluated"] == 2
    assert json.loads((tmp_path / "defaults" / "summary.json").read_text())
