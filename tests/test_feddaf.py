"""FedDAF (FedFusion): the server's mixture weights sum to one and drive the aggregate, the
Kumaraswamy-Beta KL is a KL, the VAE's state survives a checkpoint, and the sites send what
FedAvg's send."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.aggregation import average_arrays
from strategies.feddaf import FedDAF, MixtureVAE, kumaraswamy_beta_kl, mixture_weights
from tests.fl_harness import run, small_config, state_dict


def test_the_kumaraswamy_beta_kl_is_zero_for_equal_laws_and_positive_otherwise():
    one = torch.ones(1)
    assert abs(float(kumaraswamy_beta_kl(one, one, 1.0))) < 1e-6  # Kumaraswamy(1, 1) = Beta(1, 1) = uniform
    for a, b in ((2.0, 3.0), (0.5, 1.0), (1.0, 5.0)):
        assert float(kumaraswamy_beta_kl(torch.tensor([a]), torch.tensor([b]), 1.0)) > 0


def test_mixture_weights_are_a_distribution_mixing_example_weighted_components():
    q = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # sites 0, 1 in component 0, site 2 in 1
    counts = np.array([10.0, 30.0, 5.0])
    w = mixture_weights(q, np.array([0.5, 0.5]), counts)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    np.testing.assert_allclose(w, [0.5 * 10 / 40, 0.5 * 30 / 40, 0.5])
    # components that hold nobody drop out; no component at all falls back to the counts
    np.testing.assert_allclose(mixture_weights(q, np.array([0.25, 0.25]), counts).sum(), 1.0)
    np.testing.assert_allclose(mixture_weights(np.zeros((3, 2)), np.array([0.5, 0.5]), counts), counts / 45)


def test_the_vae_separates_sites_whose_statistics_differ():
    rng = np.random.default_rng(0)
    stats = np.concatenate([rng.normal(0, 0.1, (3, 20)), rng.normal(3, 0.1, (3, 20))])
    strategy = FedDAF.__new__(FedDAF)
    strategy.vae, strategy.generator = None, torch.Generator().manual_seed(0)
    q, pi = strategy.fit(stats)
    assert q.shape == (6, 4) and pi.shape == (4,) and (pi > 0).all() and pi.sum() <= 1 + 1e-6
    first, second = q[:3].mean(0), q[3:].mean(0)
    assert np.abs(first - second).max() > 0.3  # the two groups load different components


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_a_feddaf_round_aggregates_with_the_inferred_weights_and_resumes_exactly(tmp_path):
    cfg = small_config(tmp_path, "feddaf")
    fed = run(tmp_path, cfg, rounds=2)
    strategy = fed.strategy
    assert isinstance(strategy, FedDAF)
    weights = strategy.last_weights
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0) and min(weights) >= 0
    assert fed.metrics[-1]["mixture_weight_max"] == max(weights)
    replies = [r.content["arrays"] for r in fed.round_replies[-1]]
    expected = state_dict(average_arrays(replies, weights))
    for key, value in state_dict(fed.arrays).items():
        torch.testing.assert_close(value, expected[key])
    for reply in fed.round_replies[-1]:  # the sites send what FedAvg's send
        assert set(reply.content.array_records) == {"arrays"}
        assert set(reply.content["arrays"].keys()) == set(fed.shared_keys)
    # the VAE and its noise generator are server state: a restored strategy fits identically
    state = strategy.checkpoint_state()
    twin = FedDAF(strategy.contract, fed.history[0])
    twin.restore_state(state)
    stats = np.random.default_rng(1).normal(size=(3, 12))
    np.testing.assert_array_equal(strategy.fit(stats)[0], twin.fit(stats)[0])
    assert isinstance(twin.vae, MixtureVAE)


def test_feddaf_refuses_a_robust_rule_that_would_ignore_its_weights(tmp_path):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="weights of its own"):
        small_config(tmp_path, "feddaf", aggregation="median").validate()
