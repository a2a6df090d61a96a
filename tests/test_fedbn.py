"""FedBN: the classifier's BatchNorm parameters and buffers never leave a site, and
each site gets its own back (from memory, or from disk after a restart)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord

from client_app.site import Site
from client_app.state import node_private_state
from core.methods import contract_for
from models import build_model, is_batchnorm_key
from strategies import PrivacyViolation
from tests.fl_harness import all_outgoing_arrays, federation, server_identity, site_context, small_config, state_dict


def _bn_keys() -> list[str]:
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    return [k for k in model.state_dict() if is_batchnorm_key(model, k)]


def test_shared_keys_leave_out_every_batchnorm_array() -> None:
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    shared = set(contract_for("fedbn").shared_keys(model))
    bn = set(_bn_keys())
    assert bn and {k.rsplit(".", 1)[1] for k in bn} == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert shared == set(contract_for("fedavg").shared_keys(model)) - bn


def _site_bn(fed, node: int) -> dict[str, torch.Tensor]:
    """What the site keeps in context.state (for FedBN: its BatchNorm arrays)."""
    return node_private_state(fed.grid.contexts[node].state).model


def test_batchnorm_stays_private_and_is_restored_per_site(tmp_path) -> None:
    cfg = small_config(tmp_path, "fedbn", measure_gamma=True)
    fed = federation(tmp_path, cfg)
    bn = set(_bn_keys())
    assert not bn & set(fed.shared_keys) and not bn & set(state_dict(fed.arrays))
    fed.run_round(1)

    # every site keeps exactly its BatchNorm arrays, and they differ between sites
    saved = {node: _site_bn(fed, node) for node in fed.grid.contexts}
    for private in saved.values():
        assert set(private) == bn
    k = "classifier.stages.0.bn1.running_mean"
    assert not torch.allclose(saved[1][k], saved[2][k])

    # the next round's model at each site carries that site's BatchNorm and the global rest,
    # also after a restart that empties context.state (then it comes from disk)
    with server_identity():
        messages = list(fed.strategy.configure_train(2, fed.arrays, fed.config(), fed.grid))
    global_state = state_dict(fed.arrays)
    restarted = {i + 1: site_context(i, 3, tmp_path / "site-state") for i in range(3)}
    for contexts in (fed.grid.contexts, restarted):
        for msg in messages:
            node = msg.metadata.dst_node_id
            site = Site(msg.content, contexts[node])
            assert site.restored
            state = site.model.state_dict()
            for key, value in saved[node].items():
                torch.testing.assert_close(state[key], value, atol=0, rtol=0)
            for key, value in global_state.items():
                torch.testing.assert_close(state[key], value, atol=0, rtol=0)

    # no BatchNorm array in any reply, in any round
    fed.run_round(2)
    for name, key, _ in all_outgoing_arrays(fed.grid.replies):
        assert name == "gradients" or key not in bn, (name, key)
    for reply in fed.grid.replies:
        assert set(reply.content["arrays"].keys()) == set(fed.shared_keys)
    # the saved BatchNorm moved on with round 2's training (it is trained, not frozen)
    assert not torch.allclose(_site_bn(fed, 1)[k], saved[1][k])


def test_a_reply_with_batchnorm_arrays_is_refused(tmp_path) -> None:
    fed = federation(tmp_path, small_config(tmp_path, "fedbn"))
    replies = fed.run_round(1)
    leaked = dict(replies[0].content["arrays"].items())
    leaked["classifier.bn.running_mean"] = Array(torch.zeros(64).numpy())
    replies[0].content["arrays"] = ArrayRecord(leaked)
    with pytest.raises(PrivacyViolation, match="outside the shared set"):
        fed.strategy.aggregate_train(2, replies)
