"""The method pages (docs/methods/<method>.md) against the code: every method has a page
with a "Where we differ" list whose file references exist, and one documented deviation per
method is checked here, so that a page cannot drift from what the code trains, sends or scores."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch

import client_app.evaluation as site_evaluation
from client_app.site import evaluate_round
from client_app.trainers.ditto import PERSONAL, DittoTrainer
from client_app.trainers.fedprox import FedProxTrainer
from client_app.trainers.fedrep import head_parameters
from client_app.trainers.fraug import distance, kernel_mmd
from client_app.trainers.scaffold import ScaffoldTrainer
from client_app.training import RoundOptimizers
from core.config import ConfigError, RunConfig
from core.methods import METHODS
from models import build_model
from strategies.feddaf import MixtureVAE
from tests.conftest import REPO
from tests.fl_harness import run, small_config

PAGES = REPO / "docs" / "methods"
SECTION = "## Where we differ"
#: a file reference: `path/to/file.py` or `path/to/file.py:name` (a function, class or
#: constant defined in that file; `Class.method` checks the method)
REFERENCE = re.compile(r"`([\w./-]+\.(?:py|toml|md|sh))(?::([\w.]+))?`")


def where_we_differ(method: str) -> list[str]:
    """The items of a page's "Where we differ" list (a bullet and its continuation lines)."""
    text = (PAGES / f"{method}.md").read_text()
    assert SECTION in text, f"docs/methods/{method}.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    items: list[str] = []
    for line in section.splitlines():
        if line.startswith("- "):
            items.append(line)
        elif items and line.startswith("  "):
            items[-1] += " " + line.strip()
    return items


def defines(path, name: str) -> bool:
    source = path.read_text()
    last = name.rsplit(".", 1)[-1]
    return bool(re.search(rf"^\s*(def|class)\s+{last}\b|^\s*{last}\s*[:=]", source, re.MULTILINE))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_has_a_page_whose_deviations_name_existing_code(method):
    items = where_we_differ(method)
    assert len(items) >= 2, f"docs/methods/{method}.md lists {len(items)} deviations"
    for item in items:
        refs = REFERENCE.findall(item)
        assert refs, f"docs/methods/{method}.md: a deviation without a file reference: {item[:120]!r}"
        for path, name in refs:
            assert (REPO / path).is_file(), f"docs/methods/{method}.md names {path}, which does not exist"
            if name and path.endswith(".py"):
                assert defines(REPO / path, name), f"docs/methods/{method}.md names {path}:{name}, not defined there"


def test_the_readme_links_every_method_page():
    readme = (REPO / "README.md").read_text()
    missing = [m for m in METHODS if f"(docs/methods/{m}.md)" not in readme]
    assert not missing, f"README.md does not link the pages of {missing}"


def test_the_reference_check_would_catch_a_missing_file_or_name(tmp_path):
    assert REFERENCE.findall("see `strategies/fusefl.py:FuseFL.calibrate`") == [
        ("strategies/fusefl.py", "FuseFL.calibrate")
    ]
    assert defines(REPO / "strategies" / "fusefl.py", "FuseFL.calibrate")
    assert not defines(REPO / "strategies" / "fusefl.py", "no_such_function")


# -- one documented deviation per method ---------------------------------------------------


def test_fusedspacefed_default_unet_has_no_dz_latent_and_the_run_says_so():
    """fusedspacefed.md: `dz` does not apply to the default U-Net (the seed README's dz-16
    bottleneck is `ae-arch = "bottleneck"`); the start-up line and summary.json say which ran."""
    shapes = {}
    for arch in ("unet", "bottleneck"):
        for dz in (4, 64):
            model = build_model(fused=True, in_channels=1, num_classes=2, image_size=28, ae_arch=arch, dz=dz)
            shapes[arch, dz] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["unet", 4] == shapes["unet", 64]
    assert shapes["bottleneck", 4] != shapes["bottleneck", 64]
    assert "dz = 16 does not apply" in RunConfig().describe_model()
    assert "dz = 16" in RunConfig(ae_arch="bottleneck").describe_model()
    assert "does not apply" not in RunConfig(ae_arch="bottleneck").describe_model()


def test_fedavg_trains_with_momentum_and_weight_decay_fresh_each_round():
    """fedavg.md: SGD with momentum 0.9 and weight decay 5e-4, new every round (the paper:
    plain SGD); the reference protocol keeps the momentum buffers."""
    net = torch.nn.Linear(3, 2)
    optimizers = RoundOptimizers(RunConfig(method="fedavg"), {})
    group = optimizers.sgd("classifier", net.parameters(), 0.05).param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 5e-4)
    net(torch.ones(4, 3)).sum().backward()
    optimizers.optimizers["classifier"].step()
    assert optimizers.saved() == {}  # nothing carried to the next round
    assert RunConfig(method="fedavg").recalibrate_bn  # scored with each site's recomputed statistics


def test_fedprox_pulls_the_parameters_not_the_batchnorm_statistics():
    """fedprox.md: (mu/2) ||w - w_global||^2 over the classifier's parameters; BatchNorm's
    running statistics are buffers, averaged but not pulled."""
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    trainer = FedProxTrainer()
    trainer.start(model, type("Job", (), {"cfg": RunConfig(method="fedprox", proximal_mu=0.5)})())
    with torch.no_grad():
        for name, buffer in model.classifier.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(3.0)
    assert float(trainer.penalty(model)) == 0.0
    with torch.no_grad():
        model.classifier.head.bias.add_(2.0)
    assert float(trainer.penalty(model)) == pytest.approx(0.5 * 0.5 * 4.0 * 2)


def test_scaffold_drops_momentum_but_keeps_weight_decay():
    """scaffold.md: the corrected step is plain SGD (momentum ignored), weight decay kept."""
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    trainer = ScaffoldTrainer()
    trainer.optimizers = RoundOptimizers(RunConfig(method="scaffold"), {})
    group = trainer.optimizer(model, RunConfig(method="scaffold")).param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.0, 5e-4)


def test_fedbn_keeps_every_batchnorm_array_private():
    """fedbn.md: BatchNorm weights, biases and running statistics all stay at the site."""
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    shared = set(METHODS["fedbn"].shared_keys(model))
    batchnorm = model.batchnorm_keys()
    assert any(k.endswith("running_mean") for k in batchnorm) and any(k.endswith("weight") for k in batchnorm)
    assert not shared & batchnorm
    assert shared | batchnorm == set(model.state_dict())


def test_lg_fedavg_shares_the_linear_head_only_by_default():
    """lg-fedavg.md: the global part is the classifier's linear layer (head-blocks 0), not
    the paper's several top layers."""
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    assert set(METHODS["lg-fedavg"].shared_keys(model)) == {"classifier.head.weight", "classifier.head.bias"}
    assert len(METHODS["lg-fedavg"].shared_keys(model, head_blocks=1)) > 2


def test_fedper_keeps_the_linear_head_and_shares_the_rest():
    """fedper.md: the personal layers are the linear head only; the body's BatchNorm statistics
    are averaged with it."""
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    shared = set(METHODS["fedper"].shared_keys(model))
    assert shared == set(model.state_dict()) - {"classifier.head.weight", "classifier.head.bias"}


def test_fedrep_fits_the_head_for_one_epoch_by_default():
    """fedrep.md: one head epoch per round (`fedrep-head-epochs`; the paper and PFLlib use
    more), the head being the linear layer."""
    assert RunConfig().fedrep_head_epochs == 1
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    head, body = head_parameters(model, 0)
    assert [tuple(p.shape) for p in head] == [(2, 64), (2,)]
    assert len(body) > 2


def test_ditto_scores_the_personal_model_it_keeps():
    """ditto.md: the site evaluates v (its private model, BatchNorm statistics included),
    not the global w."""
    assert METHODS["ditto"].personal_model
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    v = {
        PERSONAL + k: torch.full_like(t, 0.25) if t.is_floating_point() else t
        for k, t in model.classifier.state_dict().items()
    }
    personal = DittoTrainer().personal(model, v)
    assert torch.all(personal.classifier.head.weight == 0.25)
    assert torch.all(personal.classifier.bn.running_var == 0.25)
    assert not torch.all(model.classifier.head.weight == 0.25)


def test_fraug_distance_is_mse_or_kernel_mmd_as_configured():
    """fraug.md: MSE (our default, in both losses) or kernel MMD (`fraug-distance-g`,
    `fraug-distance-ft`); anything else is refused at configuration time."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    assert torch.equal(distance("mse", x, y), torch.nn.functional.mse_loss(x, y))
    assert torch.equal(distance("mmd", x, y), kernel_mmd(x, y))
    assert float(kernel_mmd(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(kernel_mmd(x, y + 2.0)) > float(kernel_mmd(x, y)) > 0
    assert (RunConfig().fraug_distance_g, RunConfig().fraug_distance_ft) == ("mse", "mse")
    with pytest.raises(ConfigError, match="fraug-distance-g must be one of"):
        RunConfig.from_mapping({"method": "fraug", "fraug-distance-g": "l1"})


def test_a_fraug_round_with_kernel_mmd_in_both_losses_trains(tmp_path):
    cfg = small_config(tmp_path, "fraug", fraug_distance_g="mmd", fraug_distance_ft="mmd")
    fed = run(tmp_path, cfg, rounds=1)
    for reply in fed.round_replies[0]:
        metrics = reply.content["metrics"]
        assert all(math.isfinite(metrics[k]) for k in ("train_loss", "generator_loss", "transform_loss"))


def test_feddaf_pi_is_stick_breaking_not_the_product_of_fractions():
    """feddaf.md: pi_m = v_m prod_{j<m} (1 - v_j) (stick-breaking), not the seed text's
    product of the fractions prod_{j<=m} v_j (the Indian-buffet form)."""
    v = torch.tensor([0.5, 0.2, 0.8, 0.1])
    pi = MixtureVAE(3, components=4).stick_weights(v)
    torch.testing.assert_close(pi, torch.tensor([0.5, 0.1, 0.32, 0.008]))
    assert not torch.allclose(pi, torch.cumprod(v, 0))


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_fusefl_is_scored_as_the_model_it_calibrated(tmp_path, monkeypatch):
    """fusefl.md: by default (`norm = "auto"` = "batch") every site scores the one fused model
    with the BatchNorm statistics its head was calibrated on, so every site's test split
    scores alike; `batch-recal` (each site recomputes the statistics) is an option. The
    calibration's SGD has momentum 0.9 (the authors' CCVR code: plain SGD)."""
    momenta = []
    real_sgd = torch.optim.SGD

    def recording_sgd(params, **kwargs):
        if sys._getframe(1).f_globals["__name__"] == "strategies.fusefl":  # the server's, not the sites'
            momenta.append(kwargs.get("momentum", 0.0))
        return real_sgd(params, **kwargs)

    monkeypatch.setattr("strategies.fusefl.torch.optim.SGD", recording_sgd)
    cfg = small_config(tmp_path, "fusefl", num_server_rounds=3, fusefl_columns=3, fusefl_blocks=2, min_replies=3)
    assert cfg.norm == "batch" and not cfg.recalibrate_bn
    fed = run(tmp_path, cfg, rounds=3)
    assert momenta == [0.9]  # the server's calibration of the head
    calibrated = statistics_sum(
        {k: v for k, v in fed.arrays.to_torch_state_dict().items() if k.endswith(("running_mean", "running_var"))}
    )
    scored_with: dict[str, list[float]] = {}
    real_scores = site_evaluation.split_scores

    def recording_scores(model, splits, task, device):
        for name in splits:
            values = {n: b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
            scored_with.setdefault(name, []).append(statistics_sum(values))
        return real_scores(model, splits, task, device)

    monkeypatch.setattr(site_evaluation, "split_scores", recording_scores)
    for site in (1, 2, 3):
        evaluate_round(fed.grid_message(3), fed.grid.contexts[site])
    assert scored_with["test"] == pytest.approx([calibrated] * 3, rel=1e-9)
    scored_with.clear()
    fed.cfg = fed.cfg.replace(norm="batch-recal")  # the option: each site's own recomputed statistics
    for site in (1, 2, 3):
        evaluate_round(fed.grid_message(3), fed.grid.contexts[site])
    assert len(scored_with["test"]) == 3
    assert all(abs(value - calibrated) > 1e-6 * abs(calibrated) for value in scored_with["test"])


def statistics_sum(buffers: dict[str, torch.Tensor]) -> float:
    """One number that changes when any BatchNorm running statistic does."""
    assert buffers
    return float(sum(b.double().abs().sum() for b in buffers.values()))
