"""What a run says about its data (issue 30.3): the majority-class warning on the round line
and in the summary, and the data described as the sites report it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.superlink.grid import HttpGrid, InMemoryGrid

from core.config import RunConfig
from core.data_report import config_mismatch, describe_sites, describe_split, majority_class, site_data_record
from core.methods import check_site_metrics
from core.metrics import majority_share
from partitions import split
from server_app.listeners import progress_line
from server_app.results import summarise
from server_app.server_data import dataset_on_server, deployed
from tests.fl_harness import small_config
from tests.test_server_resume import LocalGrid, run

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


# -- a deployment: the grid says so, the sites say what the data is (issue 30.3) ----------------


@dataclass
class DeployedGrid(LocalGrid, HttpGrid):
    """Flower's deployed grid as the ServerApp sees it (an `HttpGrid`), with the hospitals
    in this process: each reads its own partitions.split file (node config `data-path`),
    as a SuperNode does. LocalGrid delivers every message, so it never connects."""

    site_files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        HttpGrid.__init__(self, token="in-process")
        for i, path in enumerate(self.site_files):
            node_config = {"data-path": str(path), "site-name": f"hospital-{'ab'[i]}", "state-dir": str(self.state_dir)}
            self.contexts[i + 1] = Context(
                run_id=1, node_id=i + 1, node_config=node_config, state=RecordDict(), run_config={}
            )


def write_blank_breastmnist(root: Path) -> Path:
    """breastmnist.npz whose images are all the same grey (nothing to learn from), with
    BreastMNIST's test labels: 114 of 156 images benign (class 1), as in the official file."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n, ones in (("train", 96, 72), ("val", 24, 18), ("test", 156, 114)):
        labels = np.zeros((n, 1), np.uint8)
        labels[rng.permutation(n)[:ones]] = 1
        arrays[f"{name}_images"] = np.full((n, 28, 28), 128, np.uint8)
        arrays[f"{name}_labels"] = labels
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "breastmnist.npz", **arrays)
    return root


@pytest.mark.slow  # about 4 s or more idle (several lean rounds); `make test` runs it, the fast tier leaves it
def test_a_deployed_breastmnist_run_that_learns_nothing_says_so_and_names_the_sites_data(tmp_path, capsys):
    """The coordinator holds the dataset file (it split it for the hospitals), yet the run
    is a deployment because Flower's deployed grid says so: its name leaves the run
    config's partition settings out, its summary describes the split as the sites report it
    (alpha 0.5, not the config's 0.05), and a model that can only predict the most common
    class is flagged on its round line and in summary.json."""
    data_root = write_blank_breastmnist(tmp_path / "data")
    assert (
        split.main(  # what docs/pilot.md section 5 runs on the coordinator
            ["--dataset", "breastmnist", "--data-root", str(data_root), "--num-sites", "2"]
            + ["--partition", "dirichlet-equal", "--alpha", "0.5", "--seed", "0", "--out", str(tmp_path / "sites")]
        )
        == 0
    )
    files = sorted((tmp_path / "sites").glob("site-*.npz"))
    cfg = small_config(tmp_path, "fedavg", partition="dirichlet-equal", alpha=0.05, num_server_rounds=1, run_name="")
    assert dataset_on_server(cfg)  # the old guess would have called this a simulation
    run(cfg, DeployedGrid(tmp_path / "state", num_sites=0, site_files=files))
    err = re.sub(r"\s+", " ", capsys.readouterr().err)

    run_dir = tmp_path / "results" / "fedavg-breastmnist-site-data-s0"  # no a0.05: the config's, not the data's
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "round 1/1" in err and "= majority class (73.08 %): learnt nothing yet" in err
    assert "equals the test split's majority-class share" in summary["warning"]
    assert summary["final"]["test_majority_share"] == pytest.approx(BREAST_TEST_SHARE)
    assert summary["final"]["global_acc_mean"] == pytest.approx(BREAST_TEST_SHARE)
    assert f"warning: fedavg (fedavg-breastmnist-site-data-s0): {summary['warning']}" in err
    assert summary["data"]["source"] == "site files"
    assert summary["data"]["split"]["alpha"] == 0.5 and summary["data"]["split"]["partition"] == "dirichlet-equal"
    assert sum(s["train"] for s in summary["data"]["sites"]) == 96
    assert "data as the sites report it: dirichlet-equal alpha 0.5, seed 0, 2 sites" in err
    assert "the run config's alpha a0.05 (the sites' a0.5) do not apply" in err
    assert "the sites' own data" in err and "(dirichlet-equal)" not in err
    assert not list(run_dir.glob("partition*"))  # no table of a partitioning the server did not make


def test_the_grid_decides_simulation_or_deployment():
    assert deployed(DeployedGrid(Path("unused"), num_sites=0))
    assert not deployed(LocalGrid(Path("unused"), num_sites=0))
    assert not deployed(InMemoryGrid.__new__(InMemoryGrid))  # (what a simulation hands the ServerApp)
