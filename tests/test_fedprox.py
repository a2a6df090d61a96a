"""FedProx: (mu/2) ||w - w_global||^2 in the local loss. mu = 0 is FedAvg exactly;
mu > 0 keeps each site's model closer to the global one, more so as mu grows."""

from __future__ import annotations

import pytest
import torch

from client_app.trainers import LocalRound
from client_app.trainers.fedprox import FedProxTrainer
from models import build_model
from tests.fl_harness import federation, small_config, state_dict


def _parameter_keys() -> list[str]:
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    return [f"classifier.{name}" for name, _ in model.classifier.named_parameters()]


def _local_distances(tmp_path, method: str, **changes) -> tuple[list[float], object]:
    """||w_i - w_global|| over the classifier's parameters after one local round, per site."""
    fed = federation(tmp_path, small_config(tmp_path, method, batch_size=8, **changes))  # 4 local steps
    w_global = state_dict(fed.arrays)
    replies = sorted(fed.run_round(1), key=lambda m: m.metadata.src_node_id)
    out = []
    for reply in replies:
        w = state_dict(reply.content["arrays"])
        out.append(sum(float(((w[k] - w_global[k]) ** 2).sum()) for k in _parameter_keys()) ** 0.5)
    return out, fed


def test_penalty_is_half_mu_squared_distance_with_gradient_mu_times_difference(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    trainer = FedProxTrainer()
    cfg = small_config(tmp_path, "fedprox", proximal_mu=0.3)
    trainer.start(model, LocalRound(cfg, None, torch.device("cpu"), torch.Generator(), 1, None))
    shifts = [0.01 * torch.randn_like(p) for p in model.classifier.parameters()]
    with torch.no_grad():
        for p, s in zip(model.classifier.parameters(), shifts):
            p.add_(s)
    penalty = trainer.penalty(model)
    assert float(penalty) == pytest.approx(0.15 * sum(float((s**2).sum()) for s in shifts), rel=1e-5)
    penalty.backward()
    for p, s in zip(model.classifier.parameters(), shifts):
        torch.testing.assert_close(p.grad, 0.3 * s, atol=1e-7, rtol=1e-5)


def test_mu_zero_is_fedavg(tmp_path) -> None:
    fedavg, a = _local_distances(tmp_path / "a", "fedavg")
    prox, b = _local_distances(tmp_path / "b", "fedprox", proximal_mu=0.0)
    assert prox == fedavg
    for key, value in state_dict(a.arrays).items():
        torch.testing.assert_close(state_dict(b.arrays)[key], value, atol=1e-7, rtol=0)


def test_positive_mu_moves_the_local_model_less(tmp_path) -> None:
    fedavg, _ = _local_distances(tmp_path / "a", "fedavg")
    small, _ = _local_distances(tmp_path / "b", "fedprox", proximal_mu=0.1)
    large, _ = _local_distances(tmp_path / "c", "fedprox", proximal_mu=1.0)
    for site in range(3):
        assert 0 < large[site] < small[site] < fedavg[site]
