"""client_app/evaluation.py: what a site evaluates and reports, in one place."""

from __future__ import annotations

import torch

from client_app.evaluation import evaluate_site, majority_share_of_test
from core.config import RunConfig
from core.data_report import MAJORITY_KEY
from core.methods import contract_for
from models import build_run_model
from partitions.simulated import simulation_site_data
from tests.conftest import tiny_blood_run, write_fake_medmnist


def _site(tmp_path, norm: str):
    write_fake_medmnist(tmp_path / "data", "bloodmnist", sizes=(60, 16, 20))
    cfg = RunConfig.from_mapping({**tiny_blood_run(tmp_path / "data", "fedavg"), "norm": norm})
    data = simulation_site_data(cfg, 0, 2)
    return cfg, data, build_run_model(cfg, data.spec, seed=0, contract=contract_for(cfg.method))


def test_the_local_shard_always_and_the_shared_splits_only_when_asked(tmp_path):
    cfg, data, model = _site(tmp_path, "batch")
    cpu = torch.device("cpu")
    local_only = evaluate_site(model, data, shared_splits=False, recalibrate_bn=False, device=cpu)
    assert "local_acc" in local_only and not any(k.startswith(("test_", "val_")) for k in local_only)
    assert MAJORITY_KEY not in local_only
    every = evaluate_site(model, data, shared_splits=True, recalibrate_bn=False, device=cpu)
    assert {"local_acc", "test_acc", "val_acc"} <= set(every)
    assert every[MAJORITY_KEY] == majority_share_of_test(data)
    labels = data.test.labels.numpy()
    assert every[MAJORITY_KEY] == max((labels == c).mean() for c in set(labels.tolist()))


def test_the_batchnorm_gap_compares_received_and_recomputed_statistics(tmp_path):
    cfg, data, model = _site(tmp_path, "batch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    metrics = evaluate_site(model, data, shared_splits=True, recalibrate_bn=False, device=cpu)
    assert metrics["bn_gap"] == metrics["bn_acc_recal"] - metrics["bn_acc_running"]
    assert metrics["bn_acc_running"] == metrics["local_acc"]  # scored with the received statistics
    recal = evaluate_site(model, data, shared_splits=True, recalibrate_bn=True, device=cpu)
    assert recal["local_acc"] == recal["bn_acc_recal"]  # batch-recal: every split with the recomputed ones
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # statistics restored after


def test_a_model_without_batchnorm_has_no_gap(tmp_path):
    cfg, data, model = _site(tmp_path, "group")
    metrics = evaluate_site(model, data, shared_splits=False, recalibrate_bn=False, device=torch.device("cpu"))
    assert "local_acc" in metrics and "bn_gap" not in metrics
