"""FRAug: what a site sends (the classifier and the generator, without BatchNorm running
statistics) and keeps (the transformation, class means, statistics), its schedule, class
means and one local round that trains all three networks."""

from __future__ import annotations

import pytest
import torch

from client_app.state import node_private_state
from client_app.trainers.fraug import CLASS_MEANS, augmentation_share, update_class_means
from core.methods import contract_for
from models import build_run_model
from partitions.inputs import input_spec
from tests.fl_harness import all_outgoing_arrays, run, small_config


def test_the_augmented_share_grows_to_a_half_at_the_end_of_the_run(tmp_path):
    cfg = small_config(tmp_path, "fraug", num_server_rounds=300, fraug_gamma=0.01)
    assert augmentation_share(cfg, 1) == pytest.approx(torch.exp(torch.tensor(-2.99)).item(), rel=1e-5)
    assert augmentation_share(cfg, 300) == 0.5 and augmentation_share(cfg, 231) == 0.5
    assert augmentation_share(cfg, 100) < augmentation_share(cfg, 200) < 0.5


def test_class_means_move_by_the_momentum_for_the_classes_present():
    means = torch.zeros(3, 2)
    update_class_means(means, torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, 0.0]]), torch.tensor([0, 0, 2]))
    torch.testing.assert_close(means, torch.tensor([[0.6, 0.6], [0.0, 0.0], [1.5, 0.0]]))


def test_a_fraug_site_sends_the_classifier_and_generator_and_keeps_the_rest(tmp_path):
    cfg = small_config(tmp_path, "fraug")
    model = build_run_model(cfg, input_spec("breastmnist"), seed=0, contract=contract_for(cfg.method))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fed = run(tmp_path, cfg, rounds=2)
    keys = set(model.state_dict())
    statistics = {k for k in keys if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    transform = {k for k in keys if k.startswith("aux.transform.")}
    assert set(fed.shared_keys) == keys - statistics - transform
    assert any(k.startswith("aux.generator.") for k in fed.shared_keys)
    for reply in fed.round_replies[-1]:
        assert set(reply.content.array_records) == {"arrays"}
        assert set(reply.content["arrays"].keys()) == set(fed.shared_keys)
    private = node_private_state(fed.grid.contexts[1].state)
    assert set(private.model) == statistics | transform
    means = private.extras[CLASS_MEANS]
    assert means.shape == (2, 64) and (means.abs().sum(dim=1) > 0).all()  # both classes seen
    # all three networks trained
    after = fed.arrays.to_torch_state_dict()
    for key in ("classifier.head.weight", "aux.generator.net.0.weight"):
        assert not torch.equal(after[key], before[key]), key
    assert not torch.equal(private.model["aux.transform.net.0.weight"], before["aux.transform.net.0.weight"])
    # nothing private in any outgoing array
    private_values = [v for v in private.flat().values() if v.numel() > 4]
    for _, _, sent in all_outgoing_arrays(fed.round_replies[-1]):
        sent = torch.from_numpy(sent)
        assert not any(v.shape == sent.shape and torch.equal(v, sent) for v in private_values)
    assert contract_for("fraug").same_model_everywhere(model) is False


def test_balanced_augmentation_uses_only_the_classes_a_site_has_seen(tmp_path):
    """A site holding one class never asks G for the other (it has no mean feature for it)."""
    from client_app.trainers import LocalRound
    from client_app.trainers.fraug import CLASS_SEEN, FRAugTrainer
    from partitions.tensors import TensorSplit

    cfg = small_config(tmp_path, "fraug")
    model = build_run_model(cfg, input_spec("breastmnist"), seed=0, contract=contract_for(cfg.method))
    images = torch.randint(0, 255, (40, 1, 28, 28), dtype=torch.uint8)
    train = TensorSplit(images, torch.zeros(40, dtype=torch.long))  # class 0 only
    spec = input_spec("breastmnist")
    data = type("Data", (), {"spec": spec, "train": train})()
    asked = []
    generator = model.aux["generator"]
    original = generator.forward

    def spy(z, y):
        asked.append(set(y.tolist()))
        return original(z, y)

    generator.forward = spy
    job = LocalRound(cfg, data, torch.device("cpu"), torch.Generator().manual_seed(0), 1, incoming=None)
    result = FRAugTrainer().train(model, job)
    assert asked and all(labels == {0} for labels in asked)
    assert result.extras[CLASS_SEEN].tolist() == [40.0, 0.0]
    assert (result.extras[CLASS_MEANS][1] == 0).all()
