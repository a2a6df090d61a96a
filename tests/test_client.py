"""The site's round, called directly (no Ray): warm-up, fused training, private state."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client_app.site import Site, evaluate_round, train_round
from client_app.state import FILE_NAME, MODEL_RECORD, StateError
from client_app.trainers import LocalRound
from client_app.trainers.fusedspacefed import FusedSpaceFedTrainer, decoupled_losses, task_aware_loss
from client_app.training import classification_loss
from core.config import RunConfig
from models import build_model, part_of
from partitions.simulated import simulation_site_data
from server_app.rounds import initial_model_arrays
from tests.fl_harness import first_message


def make_cfg(root, tmp_path, **changes) -> RunConfig:
    base = dict(
        dataset="bloodmnist",
        data_root=str(root),
        download=False,
        partition="iid",
        local_epochs=1,
        warmup_epochs=1,
        batch_size=32,
        warmup_min_steps=0,  # the recipe's 100-batch minimum: dozens of epochs on this tiny data
        results_dir=str(tmp_path / "results"),
        run_name="test-run",
        device="cpu",
    )
    base.update(changes)
    return RunConfig(**base)


def message(cfg: RunConfig, arrays: ArrayRecord, server_round: int = 1) -> RecordDict:
    return first_message(cfg, arrays, server_round)


def context(site: int, num_sites: int = 3, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=100 + site,
        node_config={"partition-id": site, "num-partitions": num_sites},
        state=state if state is not None else RecordDict(),
        run_config={},
    )


def job(cfg, site_id=0, server_round=1) -> LocalRound:
    data = simulation_site_data(cfg, site_id, 3)
    return LocalRound(cfg, data, torch.device("cpu"), torch.Generator().manual_seed(0), server_round, RecordDict())


@pytest.mark.parametrize(
    ("server_round", "protocol", "trained"),
    [
        (2, "standard", {"encoder"}),  # re-aligns E_i to the averaged decoder: D and C frozen
        (1, "standard", {"encoder", "decoder"}),  # no global decoder yet: D trains too (docs/recipe.md)
        (1, "reference", {"encoder"}),  # the reference code's warm-up, unchanged
    ],
)
def test_warm_up_changes_only_the_encoder_once_a_global_decoder_exists(
    fake_root, tmp_path, server_round, protocol, trained
):
    cfg = make_cfg(fake_root, tmp_path).replace(protocol=protocol)
    model = build_model(fused=True, in_channels=3, num_classes=8, image_size=28, ae_arch=cfg.ae_arch)
    before = copy.deepcopy(model.state_dict())
    FusedSpaceFedTrainer().warm_up(model, job(cfg, server_round=server_round))
    after = model.state_dict()
    changed = {part_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == trained
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen


def _grad_norms(model):
    return {
        part: sum(float(p.grad.abs().sum()) for p in getattr(model, part).parameters() if p.grad is not None)
        for part in ("encoder", "decoder", "classifier")
    }


def test_task_aware_sends_classification_gradients_into_decoder_and_encoder():
    torch.manual_seed(0)
    model = build_model(fused=True, in_channels=1, num_classes=3, image_size=28)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 3, (8,))
    _, cls, _ = task_aware_loss(model, x, y, classification_loss(False), lambda_rec=0.0)
    cls.backward()
    norms = _grad_norms(model)
    assert norms["encoder"] > 0 and norms["decoder"] > 0 and norms["classifier"] > 0


def test_decoupled_mode_keeps_classification_gradients_out_of_the_autoencoder():
    torch.manual_seed(0)
    model = build_model(fused=True, in_channels=1, num_classes=3, image_size=28)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 3, (8,))
    _, cls = decoupled_losses(model, x, y, classification_loss(False))
    cls.backward()
    norms = _grad_norms(model)
    assert norms["encoder"] == 0 and norms["decoder"] == 0 and norms["classifier"] > 0


@pytest.mark.slow  # a full FusedSpaceFed round, ~10 s on 2 busy cores
def test_round_replies_with_shared_parts_only_and_persists_the_encoder(fake_root, tmp_path):
    cfg = make_cfg(fake_root, tmp_path)
    arrays, shared = initial_model_arrays(cfg)
    ctx = context(0)
    reply = train_round(message(cfg, arrays), ctx)
    sent = {k for name in reply.array_records if name == "arrays" for k in reply["arrays"].keys()}
    assert sent == set(shared) and not any(k.startswith("encoder.") for k in sent)
    assert set(reply.array_records) <= {"arrays", "gradients"}
    saved = ctx.state[MODEL_RECORD].to_torch_state_dict()
    assert saved and all(k.startswith("encoder.") for k in saved)
    state_file = tmp_path / "results" / "test-run" / "site-state" / "test-run" / "site-0" / FILE_NAME
    assert state_file.exists()

    # A restarted node (empty context.state) continues with exactly the saved encoder.
    fresh = context(0)
    site = Site(message(cfg, arrays, server_round=2), fresh)
    assert site.restored
    restored = {k: v for k, v in site.model.state_dict().items() if k.startswith("encoder.")}
    assert all(torch.equal(restored[k], saved[k]) for k in saved)

    metrics = evaluate_round(message(cfg, arrays), fresh)["evaluation"]
    assert 0 <= metrics["test_acc"] <= 1 and 0 <= metrics["local_acc"] <= 1


@pytest.mark.slow  # two FusedSpaceFed rounds, ~10 s on 2 busy cores
def test_corrupt_state_file_is_reported_and_kept(fake_root, tmp_path):
    cfg = make_cfg(fake_root, tmp_path)
    arrays, _ = initial_model_arrays(cfg)
    train_round(message(cfg, arrays), context(1))
    state_file = next((tmp_path / "results").rglob(f"site-1/{FILE_NAME}"))
    state_file.write_bytes(b"garbage")
    with pytest.raises(StateError, match="unreadable.*left in place"):
        train_round(message(cfg, arrays, server_round=2), context(1))
    assert state_file.read_bytes() == b"garbage"


@pytest.mark.slow  # a U-Net round on 3-channel images: about 9 s
def test_decoupled_round_runs(fake_root, tmp_path):
    cfg = make_cfg(fake_root, tmp_path, task_aware=False, ae_arch="unet")
    arrays, _ = initial_model_arrays(cfg)
    reply = train_round(message(cfg, arrays), context(2))
    assert reply["metrics"]["train_loss"] > 0 and reply["metrics"]["rec_loss"] > 0
