"""Gradient dissimilarity (method.md section 3): the decomposition identity, and
Gamma = 0 when every site holds the same data, end to end through the client code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import RunConfig
from strategies.gamma import gamma, gamma_decomposition
from tests.fl_harness import run, small_config, write_fake_medmnist


def _reference_gamma(g: np.ndarray) -> float:
    """(1/N) sum_i ||g_i - g_bar||^2, written out independently of strategies.gamma."""
    n = len(g)
    g_bar = sum(g) / n
    return float(sum(np.dot(gi - g_bar, gi - g_bar) for gi in g) / n)


def test_gamma_by_hand() -> None:
    # g = 1 and 3: g_bar = 2, deviations -1 and +1, Gamma = (1 + 1) / 2 = 1
    assert gamma([torch.tensor([1.0]), torch.tensor([3.0])]) == pytest.approx(1.0)
    # two coordinates, three sites: deviations (-1,0), (0,3), (1,-3): (1 + 9 + 10) / 3
    sites = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0]), torch.tensor([2.0, -3.0])]
    assert gamma(sites) == pytest.approx(20 / 3)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_sites,dim", [(2, 1), (3, 17), (10, 1000)])
def test_decomposition_identity_on_random_vectors(seed: int, num_sites: int, dim: int) -> None:
    rng = np.random.default_rng(seed)
    orig = rng.normal(size=(num_sites, dim)) * rng.uniform(0.1, 10)
    fused = orig + rng.normal(size=(num_sites, dim)) * rng.uniform(0.01, 3) + rng.normal(size=dim)
    parts = gamma_decomposition([torch.from_numpy(v) for v in orig], [torch.from_numpy(v) for v in fused])

    assert parts["gamma"] == pytest.approx(parts["gamma_orig"] + parts["gamma_R"] + parts["gamma_Phi"], rel=1e-10)
    assert parts["gamma"] == pytest.approx(_reference_gamma(fused), rel=1e-10)
    assert parts["gamma_orig"] == pytest.approx(_reference_gamma(orig), rel=1e-10)
    delta = (fused - fused.mean(0)) - (orig - orig.mean(0))
    assert parts["gamma_R"] == pytest.approx(float((delta**2).sum(1).mean()), rel=1e-10)
    assert parts["gamma_R"] >= 0
    # float32 inputs (what the sites send) satisfy it too: the sums run in float64
    parts32 = gamma_decomposition(
        [torch.from_numpy(v).float() for v in orig], [torch.from_numpy(v).float() for v in fused]
    )
    assert parts32["gamma"] == pytest.approx(
        parts32["gamma_orig"] + parts32["gamma_R"] + parts32["gamma_Phi"], rel=1e-9
    )


def test_phi_negative_when_reconstructions_oppose_the_deviations() -> None:
    rng = np.random.default_rng(1)
    orig = rng.normal(size=(4, 50))
    deviations = orig - orig.mean(0)
    fused = orig - 0.5 * deviations  # Delta_i = -delta_i / 2: halves every deviation
    parts = gamma_decomposition([torch.from_numpy(v) for v in orig], [torch.from_numpy(v) for v in fused])
    assert parts["gamma_Phi"] < -parts["gamma_R"] < 0
    assert parts["gamma"] == pytest.approx(parts["gamma_orig"] / 4)


def test_gamma_zero_when_every_site_has_the_same_gradient() -> None:
    g = torch.randn(300, dtype=torch.float64)
    h = torch.randn(300, dtype=torch.float64)
    # zero up to the rounding of the mean (g_bar = (g + g + g) / 3 need not equal g exactly)
    assert gamma([g, g.clone(), g.clone()]) == pytest.approx(0.0, abs=1e-24)
    parts = gamma_decomposition([g] * 3, [h] * 3)
    assert parts == pytest.approx({"gamma": 0.0, "gamma_orig": 0.0, "gamma_R": 0.0, "gamma_Phi": 0.0}, abs=1e-24)
    assert gamma([torch.ones(8)] * 4) == 0.0  # exactly representable mean: exactly zero


# -- end to end: the ClientApp's train handler and the strategy's aggregation ----------


def _flat_gradients(fed, name: str, server_round: int = 1) -> np.ndarray:
    replies = fed.round_replies[server_round - 1]
    return np.stack([np.array(m.content["gradients"][name].numpy(), dtype=np.float64) for m in replies])


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
@pytest.mark.parametrize("method", ["fedavg", "fusedspacefed"])
def test_gamma_zero_when_every_site_holds_the_same_data(tmp_path, method: str) -> None:
    # Every site reads the same file through the deployment path (node config
    # `data-path`) but keeps its own partition-id, hence its own batch order. The
    # gamma batch covers the whole file, so the sites measure the same samples in
    # different orders: same loss, same gradient.
    same_file = write_fake_medmnist(tmp_path / "data") / "breastmnist.npz"
    # encoders from their own seeds (shared-encoder-init off): the test needs sites whose private encoders differ
    cfg = small_config(
        tmp_path,
        method,
        measure_gamma=True,
        gamma_batch_size=256,
        warmup_epochs=0,
        batch_size=128,
        shared_encoder_init=False,
    )
    # round 2: in round 1 every site's x_rec is the same flat image (the decoder's quiet start),
    # so the fused inputs differ only once the decoder has trained
    fed = run(tmp_path, cfg, rounds=2, **{"data-path": str(same_file), "allow-gradients": True})
    metrics = fed.metrics[1]
    orig = _flat_gradients(fed, "orig", server_round=2)
    scale = float((orig**2).sum(1).mean())  # mean ||g_i||^2
    assert scale > 0
    key = "gamma" if method == "fedavg" else "gamma_orig"
    assert metrics[key] <= 1e-8 * scale
    if method == "fusedspacefed":
        # the private encoders differ between sites, so the fused inputs (and Gamma_fused) do
        assert metrics["gamma"] > 1e-6 * scale
        # with Gamma_orig ~ 0, Phi ~ 0 (|Phi| <= 2 sqrt(Gamma_orig R)) and R carries Gamma_fused
        assert abs(metrics["gamma_Phi"]) <= 1e-4 * metrics["gamma"]
        assert metrics["gamma_R"] == pytest.approx(metrics["gamma"], rel=1e-4)


def test_gamma_positive_and_decomposed_when_sites_differ(tmp_path) -> None:
    cfg = small_config(
        tmp_path, "fusedspacefed", measure_gamma=True, gamma_batch_size=256, warmup_epochs=0, batch_size=128
    )
    fed = run(tmp_path, cfg, rounds=1)
    metrics = fed.metrics[0]
    orig, fused = _flat_gradients(fed, "orig"), _flat_gradients(fed, "fused")
    assert metrics["gamma_orig"] == pytest.approx(_reference_gamma(orig), rel=1e-9)
    assert metrics["gamma"] == pytest.approx(_reference_gamma(fused), rel=1e-9)
    assert metrics["gamma_orig"] > 1e-4 * float((orig**2).sum(1).mean())
    total = metrics["gamma_orig"] + metrics["gamma_R"] + metrics["gamma_Phi"]
    assert metrics["gamma"] == pytest.approx(total, rel=1e-9)


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_a_deployed_site_sends_gradients_only_when_its_own_node_config_opts_in(tmp_path) -> None:
    site_file = write_fake_medmnist(tmp_path / "data") / "breastmnist.npz"
    cfg = small_config(tmp_path, "fusedspacefed", measure_gamma=True, warmup_epochs=0)
    refused = run(tmp_path / "a", cfg, rounds=1, **{"data-path": str(site_file)})
    assert all("gradients" not in m.content.array_records for m in refused.grid.replies)
    assert "gamma" not in refused.metrics[0]
    allowed = run(tmp_path / "b", cfg, rounds=1, **{"data-path": str(site_file), "allow-gradients": "true"})
    assert all("gradients" in m.content.array_records for m in allowed.grid.replies)
    assert "gamma" in allowed.metrics[0]
    # simulated sites (no data-path) measure Gamma when the run asks for it; the default is off
    assert "gamma" in run(tmp_path / "c", cfg, rounds=1).metrics[0]
    default = run(tmp_path / "d", cfg.replace(measure_gamma=RunConfig().measure_gamma), rounds=1)
    assert RunConfig().measure_gamma is False
    assert all("gradients" not in m.content.array_records for m in default.grid.replies)
