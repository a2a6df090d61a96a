"""The personalised baselines (LG-FedAvg, FedPer, FedRep, Ditto): what each sends and
keeps, the contract's head/body split, FedRep's two phases, Ditto's pull and personal
evaluation (tests/test_engines.py runs each in Flower's simulation and the lean engine)."""

from __future__ import annotations

import pytest
import torch

from client_app.site import evaluate_round
from client_app.state import node_private_state
from client_app.trainers import LocalRound, trainer_for
from client_app.trainers.ditto import PERSONAL, DittoTrainer
from client_app.trainers.fedrep import head_parameters
from client_app.training import classification_loss, run_epochs, sgd
from core.methods import HEAD, KeySet, contract_for
from models import build_model
from partitions.simulated import simulation_site_data
from tests.fl_harness import all_outgoing_arrays, run, small_config, write_fake_medmnist

PERSONALISED = ("lg-fedavg", "fedper", "fedrep", "ditto")


def _model():
    return build_model(fused=False, in_channels=1, num_classes=2, image_size=28)


def test_the_head_is_the_linear_layer_plus_the_last_blocks():
    keys = list(_model().state_dict())
    head0 = KeySet((HEAD,)).select(keys, 0)
    assert head0 == ["classifier.head.weight", "classifier.head.bias"]
    head2 = set(KeySet((HEAD,)).select(keys, 2))
    assert {k.split(".")[2] for k in head2 if k.startswith("classifier.stages.")} == {"7", "8"}
    assert any(k.startswith("classifier.bn.") for k in head2)
    body2 = set(KeySet(("classifier",), exclude=(HEAD,)).select(keys, 2))
    assert body2 | head2 == set(keys) and not body2 & head2
    with pytest.raises(ValueError, match="head-blocks = 10"):
        KeySet((HEAD,)).select(keys, 10)


@pytest.mark.parametrize(
    ("method", "everywhere"),
    [("fedavg", True), ("fedbn", False), ("fusedspacefed", False)] + [(m, False) for m in PERSONALISED],
)
def test_same_model_everywhere_means_every_key_shared_and_no_personal_model(method, everywhere):
    model = build_model(fused=contract_for(method).uses_encoder, in_channels=1, num_classes=2, image_size=28)
    assert contract_for(method).same_model_everywhere(model) is everywhere


def _private_of(fed, node: int):
    return node_private_state(fed.grid.contexts[node].state)


@pytest.mark.parametrize("method", PERSONALISED)
def test_what_each_personalised_method_sends_and_keeps(tmp_path, method):
    """Two rounds of three sites: every reply carries exactly the contract's shared keys; the
    private part (LG-FedAvg's body, FedPer's and FedRep's head, Ditto's v) is kept at each
    site, differs between sites, and never appears in an outgoing array."""
    cfg = small_config(tmp_path, method, head_blocks=1)
    fed = run(tmp_path, cfg, rounds=2)
    keys = list(_model().state_dict())
    head = set(KeySet((HEAD,)).select(keys, 1))
    expected = {"lg-fedavg": head, "fedper": set(keys) - head, "fedrep": set(keys) - head, "ditto": set(keys)}
    assert set(fed.shared_keys) == expected[method]
    for replies in fed.round_replies:
        for reply in replies:
            assert set(reply.content["arrays"].keys()) == expected[method]
            assert set(reply.content.array_records) == {"arrays"}
    held = {node: _private_of(fed, node) for node in fed.grid.contexts}
    for private in held.values():
        if method == "ditto":
            assert set(private.model) == set()
            v = {k[len(PERSONAL) :] for k in private.extras if k.startswith(PERSONAL)}
            assert {f"classifier.{k}" for k in v} == set(keys)
        else:
            assert set(private.model) == set(keys) - expected[method]
    # the private parts are personal: they differ between sites ...
    first = held[1].flat()
    name = next(k for k in first if k.endswith("weight") and first[k].dim() > 1)
    assert not torch.equal(first[name], held[2].flat()[name])
    # ... and no outgoing array equals any of them
    private_values = [v for p in held.values() for v in p.flat().values() if v.numel() > 4]
    for replies in fed.round_replies[-1:]:
        for _, _, sent in all_outgoing_arrays(replies):
            sent = torch.from_numpy(sent)
            assert not any(v.shape == sent.shape and torch.equal(v, sent) for v in private_values)


def _job(tmp_path, method: str, **changes) -> tuple[LocalRound, object]:
    root = write_fake_medmnist(tmp_path / "data")
    cfg = small_config(tmp_path, method, data_root=str(root), **changes)
    data = simulation_site_data(cfg, 0, 1)
    job = LocalRound(cfg, data, torch.device("cpu"), torch.Generator().manual_seed(3), 1, incoming=None)
    return job, data


def test_fedrep_fits_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(tmp_path):
    torch.set_num_threads(1)
    job, data = _job(tmp_path, "fedrep", fedrep_head_epochs=2, momentum=0.0)
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer_for("fedrep").train(model, job)
    # the reference: the head alone for 2 epochs on the same batches, body frozen
    ref = _model()
    ref.load_state_dict(start)
    ref.train()
    head, body = head_parameters(ref, 0)
    for p in body:
        p.requires_grad_(False)
    optimizer, loss_fn = sgd(head, job.cfg.lr, job.cfg), classification_loss(False)

    def step(x, y):
        loss = loss_fn(ref.classifier(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    run_epochs(data.train, 2, job.cfg.batch_size, torch.device("cpu"), torch.Generator().manual_seed(3), step)
    after = model.state_dict()
    for key in ("classifier.head.weight", "classifier.head.bias"):  # the body phase left the head alone
        torch.testing.assert_close(after[key], ref.state_dict()[key], atol=1e-6, rtol=0)
    assert not torch.equal(after["classifier.stem.weight"], start["classifier.stem.weight"])  # the body trained


def test_ditto_pulls_the_personal_model_towards_the_global_one(tmp_path):
    distances = {}
    for mu in (0.0, 5.0):
        job, _ = _job(tmp_path / f"mu{mu}", "ditto", ditto_mu=mu, ditto_personal_epochs=2, lr=0.1)
        model = _model()
        w = {k: v.clone() for k, v in model.classifier.state_dict().items()}
        result = DittoTrainer().train(model, job)
        v = {k[len(PERSONAL) :]: t for k, t in result.extras.items() if k.startswith(PERSONAL)}
        assert set(v) == set(w)
        distances[mu] = sum(float((v[k] - w[k]).pow(2).sum()) for k, p in _model().classifier.named_parameters())
        personal = DittoTrainer().personal(model, result.extras)  # what the site evaluates: v
        assert torch.equal(personal.classifier.state_dict()["head.weight"], v["head.weight"])
        assert not torch.equal(model.classifier.state_dict()["head.weight"], v["head.weight"])
    assert distances[5.0] < 0.5 * distances[0.0], distances


def test_ditto_sites_evaluate_their_personal_model(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, "ditto")
    fed = run(tmp_path, cfg, rounds=2)
    evaluated = []
    original = DittoTrainer.personal

    def spy(self, model, extras):
        evaluated.append(sorted(k for k in extras if k.startswith(PERSONAL)))
        return original(self, model, extras)

    monkeypatch.setattr(DittoTrainer, "personal", spy)
    evaluation = evaluate_round(fed.grid_message(2), fed.grid.contexts[1])["evaluation"]
    assert len(evaluated) == 1 and len(evaluated[0]) == len(_model().classifier.state_dict())  # the site's v
    assert 0 <= evaluation["local_acc"] <= 1
