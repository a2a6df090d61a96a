"""`fraction-evaluate`: at scale a due round's model is evaluated by a sample of the sites
(Flower's FedAvg sampling), and the row says how many evaluated it."""

from __future__ import annotations

import json

import pytest

from core.config import ConfigError, RunConfig


def test_fraction_evaluate_outside_zero_one_is_refused():
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"fraction-evaluate must be in \(0, 1\]"):
            RunConfig.from_mapping({"fraction-evaluate": bad})


def test_a_sample_of_the_sites_evaluates_the_final_model(tmp_path):
    from benchmarks.lean import run_lean
    from tests.conftest import tiny_blood_run, write_fake_medmnist

    write_fake_medmnist(tmp_path / "data", "bloodmnist", sizes=(160, 40, 40))
    config = tiny_blood_run(
        tmp_path / "data",
        "fusedspacefed",
        **{
            "num-server-rounds": 1,
            "warmup-epochs": 1,
            "fraction-evaluate": 0.5,
            "min-replies": 1,
            "measure-gamma": False,
            "results-dir": str(tmp_path / "runs"),
            "run-name": "sample",
        },
    )
    run_lean(config, 4)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "sample" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["num_replies"] == 4  # every site trains (fraction-train 1)
    assert rows[-1]["num_evaluated"] == 2  # half of them evaluate the final model
    assert 0 <= rows[-1]["global_acc_mean"] <= 1
