"""Numbers that mean something (docs/recipe.md): the health metrics of a run, BatchNorm
statistics recomputed at a site, the default autoencoder's information, the reference
protocol's fixed settings, and the same seed giving the same metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from client_app.evaluation import recalibrated_batchnorm, reconstruction_health
from core.config import ConfigError, RunConfig
from core.methods import contract_for
from core.protocol import PROTOCOLS
from models import build_model
from partitions.tensors import TensorSplit
from tests.conftest import tiny_blood_run, write_fake_medmnist


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FixedReconstruction(nn.Module):
    """A stand-in for SiteModel: `reconstruct` is identity, a constant, or x with noise."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return x
        if self.kind == "constant":
            return x.mean(0, keepdim=True).expand_as(x)
        return x + 0.5 * x.std() * torch.randn_like(x)


def test_reconstruction_health_tells_an_informative_reconstruction_from_a_constant_one():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 28, 28)
    perfect = reconstruction_health(FixedReconstruction("identity"), images)
    constant = reconstruction_health(FixedReconstruction("constant"), images)
    noisy = reconstruction_health(FixedReconstruction("noisy"), images)
    assert perfect == pytest.approx({"r2": 1.0, "dependence": 1.0})
    assert constant["dependence"] == pytest.approx(0.0, abs=1e-6) and constant["r2"] == pytest.approx(0.0, abs=1e-6)
    assert 0.6 < noisy["r2"] < 0.9 and noisy["dependence"] > 1.0


def test_recalibrated_batchnorm_recomputes_inside_and_restores_after():
    torch.manual_seed(0)
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    bn = model.classifier.bn
    bn.running_mean.fill_(5.0)  # statistics that fit no data, as after averaging
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorSplit((torch.rand(40, 1, 28, 28) * 255).to(torch.uint8), torch.zeros(40, dtype=torch.long))
    with recalibrated_batchnorm(model, data, torch.device("cpu"), batch_size=16):
        assert not torch.allclose(bn.running_mean, torch.full_like(bn.running_mean, 5.0))
        assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_group_norm_has_no_batchnorm_and_fedbn_refuses_it():
    cfg = RunConfig(norm="group")
    model = build_model(fused=False, in_channels=3, num_classes=8, image_size=28, norm=cfg.classifier_norm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    with pytest.raises(ConfigError, match="fedbn"):
        RunConfig.from_mapping({"method": "fedbn", "norm": "group"})


def test_the_reference_protocol_fixes_what_the_reference_code_does():
    cfg = RunConfig.from_mapping({"protocol": "reference", "norm": "group", "ae-optimizer": "adam", "lr-ae": 0.003})
    for name, value in PROTOCOLS["reference"].fixed.items():
        assert getattr(cfg, name) == value
    assert cfg.classifier_norm == "batch" and not cfg.recalibrate_bn


def test_cosine_schedule_decays_to_one_percent():
    cfg = RunConfig(lr=0.1, lr_schedule="cosine", num_server_rounds=5)
    lrs = [cfg.round_lr(r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert RunConfig(lr=0.1, lr_schedule="constant").round_lr(3) == 0.1


@pytest.mark.slow
def test_default_fusedspacefed_warm_up_carries_information_at_every_demo_site(real_data_root):
    """Issue 14 item 2: after round 1's warm-up at the demo setting (BloodMNIST, the demo's
    sites, alpha 0.5, the default autoencoder), every site's reconstruction has R^2 >= 0.8 and
    input dependence >= 0.5 on its own images."""
    from client_app.evaluation import health_images
    from client_app.trainers.base import LocalRound
    from client_app.trainers.fusedspacefed import FusedSpaceFedTrainer
    from core.demo import DEMO, DEMO_SITES
    from models import build_run_model
    from partitions.simulated import simulation_site_data

    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping({**DEMO, "data-root": str(real_data_root)})
    trainer = FusedSpaceFedTrainer()
    for site in range(DEMO_SITES):
        data = simulation_site_data(cfg, site, DEMO_SITES)
        model = build_run_model(cfg, data.spec, seed=cfg.seed, contract=contract_for(cfg.method))
        job = LocalRound(
            cfg=cfg,
            data=data,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(site),
            server_round=1,
            incoming=None,
        )
        trainer.warm_up(model, job)
        health = reconstruction_health(model, health_images(data.train))
        assert health["r2"] >= 0.8 and health["dependence"] >= 0.5, (site, health)


VOLATILE = ("seconds",)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(word in k for word in VOLATILE)} for row in rows]


@pytest.mark.slow
def test_same_seed_same_metrics_with_health_in_every_row(tmp_path):
    """Two runs with the same seed on one machine write identical metrics.jsonl (wall-clock
    fields aside), and the health metrics are there: R^2 and input dependence after the
    warm-up and after training, their worst site, and the BatchNorm gap."""
    from benchmarks.diagnose import diagnose
    from benchmarks.lean import run_lean

    write_fake_medmnist(tmp_path / "data", "bloodmnist", sizes=(150, 30, 60))
    config = tiny_blood_run(tmp_path / "data", "fusedspacefed", norm="batch")
    for name in ("first", "second"):
        run_lean({**config, "results-dir": str(tmp_path / name), "run-name": "same"}, 3)
    first, second = _metrics(tmp_path / "first" / "same"), _metrics(tmp_path / "second" / "same")
    assert first == second
    for row in first:
        for key in ("rec_r2", "rec_dependence", "rec_r2_warmup", "rec_r2_worst", "bn_gap", "bn_acc_recal"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert row["rec_r2_worst"] <= row["rec_r2"]
    rows = diagnose(tmp_path / "first" / "same", max_images=40)
    assert len(rows) == 3 and all(0 <= row["recalibrated"] <= 1 and 0 <= row["const x_rec"] <= 1 for row in rows)
    assert all(row["as evaluated"] == pytest.approx(row["as evaluated"]) for row in rows)  # no NaN


def test_demo_settings_take_overrides_once_each():
    """`make run RUN_CONFIG="num-server-rounds=10 alpha=0.1"` replaces the demo's own values
    (Flower refuses a key given twice) and the result is a valid configuration."""
    from flwr.common.config import parse_config_args

    from core.demo import DEMO, run_config_string, with_overrides

    merged = with_overrides("num-server-rounds=10 alpha=0.1 data-root='/data/med mnist'")
    assert merged["num-server-rounds"] == 10 and merged["alpha"] == 0.1 and merged["dataset"] == DEMO["dataset"]
    parsed = parse_config_args([run_config_string(merged)])
    assert parsed == merged
    RunConfig.from_mapping(parsed)


def test_a_fresh_autoencoder_adam_ramps_its_learning_rate_up_and_the_reference_protocol_does_not():
    """Issue 24 item 4: each fresh Adam of the autoencoder starts at lr-ae / ae-lr-ramp and
    reaches lr-ae after ae-lr-ramp steps (its first steps otherwise move every weight by
    about lr-ae and undo the warm-up); the reference code's SGD autoencoder has no ramp."""
    from client_app.training import RoundOptimizers

    weight = nn.Parameter(torch.zeros(3))
    optimizers = RoundOptimizers(RunConfig(lr_ae=0.004, ae_lr_ramp=4), {})
    optimizer = optimizers.autoencoder("autoencoder", [weight])
    ramp = optimizers.autoencoder_ramp(optimizer)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(3)
        optimizer.step()
        ramp.step()
    assert lrs == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.004, 0.004])
    reference = RunConfig.from_mapping({"protocol": "reference", "ae-lr-ramp": 10})
    assert reference.ae_lr_ramp == 0 and reference.warmup_min_steps == 0
    sgd = RoundOptimizers(reference, {})
    assert sgd.autoencoder_ramp(sgd.autoencoder("autoencoder", [weight])) is None


def test_a_small_site_warms_up_for_at_least_the_minimum_steps():
    """A site of 108 images at batch 32 has 4 batches an epoch: 2 warm-up epochs would be 8
    Adam steps; `warmup-min-steps = 100` makes it 25 whole epochs. A large site keeps its epochs,
    and no warm-up stays none."""
    from client_app.training import epochs_for_steps

    small = TensorSplit(torch.zeros(108, 1, 4, 4, dtype=torch.uint8), torch.zeros(108, dtype=torch.long))
    large = TensorSplit(torch.zeros(2392, 1, 4, 4, dtype=torch.uint8), torch.zeros(2392, dtype=torch.long))
    assert epochs_for_steps(small, 2, 32, 100) == 25
    assert epochs_for_steps(small, 2, 32, 0) == 2
    assert epochs_for_steps(large, 2, 32, 100) == 2
    assert epochs_for_steps(small, 0, 32, 100) == 0
