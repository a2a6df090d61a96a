"""The reference code's protocol (method.md section 7) on this engine, and the
FusedSpaceFed options usable in either protocol (no warm-up, L2-SP)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from client_app.site import Site
from client_app.state import node_private_state
from client_app.training import RoundOptimizers
from core.config import ConfigError, RunConfig
from core.methods import contract_for
from core.seeds import site_init_seed
from models import build_run_model
from partitions.inputs import input_spec, reference_inputs
from partitions.medmnist_data import Split
from server_app.results import summarise
from tests.fl_harness import federation, first_message, small_config, state_dict


def test_reference_inputs_are_32_px_3_channel_uint8():
    rng = np.random.default_rng(0)
    gray = Split(rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8), np.arange(5))
    out = reference_inputs(gray)
    assert out.images.shape == (5, 3, 32, 32) and out.images.dtype == np.uint8
    assert np.array_equal(out.images[:, 0], out.images[:, 2])  # grayscale repeated
    flat = Split(np.full((2, 1, 28, 28), 77, dtype=np.uint8), np.arange(2))
    assert (reference_inputs(flat).images == 77).all()  # bilinear keeps a constant image constant
    spec = input_spec("breastmnist", 28, reference=True)
    assert (spec.channels, spec.image_size) == (3, 32) and input_spec("breastmnist", 28).channels == 1


def test_config_checks_and_plain_mean():
    assert RunConfig(protocol="reference").weighted_mean is False and RunConfig().weighted_mean is True
    with pytest.raises(ConfigError, match="protocol must be one of"):
        RunConfig.from_mapping({"protocol": "published"})
    with pytest.raises(ConfigError, match="l2sp-lambda must be >= 0"):
        RunConfig.from_mapping({"l2sp-lambda": -1})


def test_momentum_buffers_are_kept_across_rounds_as_private_extras(tmp_path):
    cfg = small_config(tmp_path, "fedavg", protocol="reference")
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    first = RoundOptimizers(cfg, {})
    opt = first.sgd("classifier", params, 0.1)
    sum((p**2).sum() for p in params).backward()
    opt.step()
    saved = first.saved()
    assert set(saved) == {"optimizer/classifier/0", "optimizer/classifier/1"}
    again = RoundOptimizers(cfg, saved).sgd("classifier", params, 0.1)
    for i, p in enumerate(params):
        assert torch.equal(again.state[p]["momentum_buffer"], saved[f"optimizer/classifier/{i}"])
    assert RoundOptimizers(cfg.replace(protocol="standard"), {}).saved() == {}


def test_a_reference_run_keeps_optimisers_starts_sites_independently_and_averages_plainly(tmp_path):
    cfg = small_config(tmp_path, "fusedspacefed", protocol="reference", task_aware=False, ae_arch="unet")
    fed = federation(tmp_path, cfg)
    assert fed.strategy.weighted is False
    # round 1: each site trains from its own seeded initialisation, not the server's
    site = Site(fed.grid_message(1), fed.grid.contexts[2])  # site 1
    own = build_run_model(
        cfg, input_spec("breastmnist", 28, True), seed=site_init_seed(cfg.seed, 1), contract=contract_for(cfg.method)
    ).state_dict()
    sent = state_dict(fed.arrays)
    model = site.model.state_dict()
    some = next(k for k in sent if k.endswith("weight") and "conv" in k)
    assert torch.equal(model[some], own[some]) and not torch.equal(model[some], sent[some])
    assert model["classifier.stem.weight"].shape[1] == 3  # 3 input channels
    replies = fed.run_round(1)
    private = node_private_state(fed.grid.contexts[1].state)
    kept = {k for k in private.extras if k.startswith("optimizer/")}
    assert {k.split("/")[1] for k in kept} == {"warmup", "autoencoder", "classifier"}
    # plain mean: the aggregate is the unweighted mean of the replies
    key = some
    mean = np.mean([state_dict(m.content["arrays"])[key].numpy() for m in replies], axis=0)
    assert np.allclose(state_dict(fed.arrays)[key].numpy(), mean, atol=1e-6)
    fed.run_round(2)
    later = node_private_state(fed.grid.contexts[1].state).extras
    assert any(not torch.equal(later[k], private.extras[k]) for k in kept)  # buffers carried on and moved


def test_l2sp_anchors_at_the_site_initial_encoder_and_no_warmup_skips_it(tmp_path):
    cfg = small_config(tmp_path, "fusedspacefed", l2sp_lambda=1e-3, warmup_epochs=0)
    fed = federation(tmp_path, cfg)
    initial = Site(fed.grid_message(1), fed.grid.contexts[1]).model.encoder.state_dict()
    replies = fed.run_round(1)
    extras = node_private_state(fed.grid.contexts[1].state).extras
    anchor = {k[len("l2sp/") :]: v for k, v in extras.items() if k.startswith("l2sp/")}
    assert anchor and all(torch.equal(anchor[k], initial[k]) for k in anchor)
    assert all("warmup_loss" not in m.content["metrics"] for m in replies)
    fed.run_round(2)
    extras_2 = node_private_state(fed.grid.contexts[1].state).extras
    assert all(torch.equal(extras_2[f"l2sp/{k}"], anchor[k]) for k in anchor)  # the anchor does not move


def test_summary_reports_the_reference_selection():
    rows = [
        {"round": 1, "global_acc_mean": 0.5, "global_acc_first5": 0.6, "val_acc_mean": 0.5},
        {"round": 2, "global_acc_mean": 0.7, "global_acc_first5": 0.55, "val_acc_mean": 0.4},
        {"round": 3, "global_acc_mean": 0.6, "global_acc_first5": float("nan"), "val_acc_mean": 0.6},
    ]
    summary = summarise(rows)
    assert summary["reference_selection"]["round"] == 1 and summary["reference_selection"]["acc"] == 0.6
    assert "optimistic" in summary["reference_selection"]["selected_by"]
    assert summary["best_by_test"]["round"] == 2 and summary["best_by_val"]["round"] == 3


def test_first5_is_the_mean_over_sites_0_to_4(tmp_path):
    cfg = small_config(tmp_path, "fedbn")
    fed = federation(tmp_path, cfg, num_sites=6)
    fed.run_round(1)

    from client_app.site import evaluate_round

    content = first_message(cfg, fed.arrays, 1)
    replies = []
    for node, ctx in fed.grid.contexts.items():
        reply = evaluate_round(content, ctx)
        replies.append(SimpleNamespace(content=reply, metadata=SimpleNamespace(src_node_id=node)))
    metrics = fed.strategy.aggregate_evaluate(1, replies)
    accs = {int(r.content["evaluation"]["site-id"]): r.content["evaluation"]["test_acc"] for r in replies}
    assert metrics["global_acc_first5"] == pytest.approx(np.mean([accs[i] for i in range(5)]))
    assert metrics["global_acc_mean"] == pytest.approx(np.mean(list(accs.values())))


def test_sites_start_from_one_encoder_under_the_standard_recipe_and_their_own_under_the_reference(tmp_path):
    """Issue 24 item 4: `shared-encoder-init` (the standard recipe's default) starts every
    site's private encoder from the run's initial model, so that round 1's decoders read the
    same features and their average fits each encoder; the reference protocol pins it off
    (each site's own seeded encoder, as the reference code)."""
    from server_app.rounds import initial_model

    cfg = small_config(tmp_path, "fusedspacefed")
    assert cfg.shared_encoder_init
    fed = federation(tmp_path, cfg)
    first, second = (Site(fed.grid_message(1), fed.grid.contexts[i]).model.encoder.state_dict() for i in (1, 2))
    run_initial = initial_model(cfg).encoder.state_dict()
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], run_initial[k]) for k in first)

    own = small_config(tmp_path, "fusedspacefed", shared_encoder_init=False)
    fed = federation(tmp_path, own)
    first, second = (Site(fed.grid_message(1), fed.grid.contexts[i]).model.encoder.state_dict() for i in (1, 2))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    reference = RunConfig.from_mapping({"protocol": "reference", "shared-encoder-init": True})
    assert reference.shared_encoder_init is False
