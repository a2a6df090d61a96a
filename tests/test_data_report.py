"""What a run says about its data (issue 30.3): the majority-class warning on the round line
and in the summary, and the data described as the sites report it."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import RunConfig
from core.data_report import config_mismatch, describe_sites, describe_split, majority_class, site_data_record
from core.methods import check_site_metrics
from core.metrics import majority_share
from server_app.listeners import progress_line
from server_app.results import summarise

BREAST_TEST_SHARE = 114 / 156  # breastmnist's test split: 114 of 156 images are its majority class


def row(acc: float, share: float = BREAST_TEST_SHARE, **more) -> dict:
    return {"round": 2, "round_seconds": 27.2, "global_acc_mean": acc, "test_majority_share": share, **more}


def test_majority_share_single_and_multi_label():
    assert majority_share(np.array([[1]] * 114 + [[0]] * 42), "binary-class") == pytest.approx(BREAST_TEST_SHARE)
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 1]])
    assert majority_share(labels, "multi-label, binary-class") == pytest.approx(0.75)


def test_a_round_at_the_majority_share_says_so_and_one_above_does_not():
    nothing = progress_line(row(BREAST_TEST_SHARE, train_loss=0.6), 2)
    assert "= majority class (73.08 %): learnt nothing yet" in nothing
    assert "majority class" not in progress_line(row(0.80), 2)
    assert "majority class" not in progress_line({"round": 1, "round_seconds": 3.0}, 2)  # not evaluated


def test_the_summary_warns_when_the_final_round_learnt_nothing():
    rows = [row(0.80) | {"round": 1}, row(BREAST_TEST_SHARE)]
    summary = summarise(rows)
    assert "equals the test split's majority-class share" in summary["warning"]
    assert summary["final"]["test_majority_share"] == pytest.approx(BREAST_TEST_SHARE)
    assert "warning" not in summarise([row(BREAST_TEST_SHARE) | {"round": 1}, row(0.80)])
    assert majority_class(row(float("nan"))) is False


def test_sites_report_their_split_and_the_server_names_what_does_not_apply():
    meta = {"dataset": "breastmnist", "site": 0, "num_sites": 2, "partition": "dirichlet-equal", "alpha": 0.5}
    meta |= {"classes_per_client": 2, "seed": 0, "holdout": "shared"}
    sizes = {"train": 273, "val": 78, "test": 156, "local-test": 78}
    record = site_data_record(sizes, BREAST_TEST_SHARE, meta)
    check_site_metrics("site-data", record)  # the server accepts it as a site's metric record
    other = site_data_record(sizes | {"train": 273}, BREAST_TEST_SHARE, meta | {"site": 1})
    data = describe_sites({0: record, 1: other})
    assert data["source"] == "site files"
    assert data["split"] == {
        "partition": "dirichlet-equal",
        "alpha": 0.5,
        "seed": 0,
        "num_sites": 2,
        "classes_per_client": 2,
        "holdout": "shared",
    }
    assert data["sites"][0]["train"] == 273 and data["sites"][1]["test"] == 156
    assert describe_split(data["split"]) == "dirichlet-equal alpha 0.5, seed 0, 2 sites"
    defaults = RunConfig(dataset="breastmnist")  # alpha 0.05 by default
    assert config_mismatch(defaults, data["split"]) == ["alpha a0.05 (the sites' a0.5)"]
    assert config_mismatch(defaults.replace(alpha=0.5), data["split"]) == []


def test_simulated_sites_report_sizes_only():
    data = describe_sites({0: site_data_record({"train": 10, "test": 5}, 0.6, {})})
    assert data == {"source": "run config", "sites": [{"site": 0, "train": 10, "test": 5, "test_majority_share": 0.6}]}


def test_a_deployment_run_name_leaves_out_the_partition_settings():
    cfg = RunConfig(dataset="breastmnist", method="fedavg")
    assert cfg.default_run_name() == "fedavg-breastmnist-dirichlet-equal-a0.05-s0"
    assert cfg.default_run_name(simulated=False) == "fedavg-breastmnist-site-data-s0"
