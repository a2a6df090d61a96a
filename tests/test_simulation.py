"""A real multi-round Flower simulation (Ray backend, in-process ServerApp) with 3 sites.

A Flower mod wrapped around the real handlers inspects every reply a site sends and
the site's private state before and after each round.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Message

from client_app.state import FILE_NAME, forget_node_state, node_private_state, read_state_file
from core.settings import SETTINGS_RECORD
from core.transport import is_packed, unpack
from tests.conftest import simulate_with_recorder, write_fake_medmnist

pytestmark = pytest.mark.slow  # one Flower (Ray) simulation shared by the module, ~30 s

REQUIRED_ROUND_KEYS = {
    "round",
    "round_seconds",
    "train_loss",
    "global_acc_mean",
    "global_acc_worst",
    "local_acc_mean",
    "macro_f1",
    "balanced_acc",
}


def _digest(arrays: dict[str, torch.Tensor] | None) -> str | None:
    if not arrays:
        return None
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(arrays[key].numpy().tobytes())
    return h.hexdigest()


def recording_mod(log_path: str):
    """A Flower mod that records every reply and the site state (and, once, wipes the state)."""

    def recorder(msg: Message, ctx: Context, call_next) -> Message:
        site = int(ctx.node_config["partition-id"])
        kind = msg.metadata.message_type
        server_round = int(msg.content["config"]["server-round"])
        wiped = kind == "train" and server_round == 2 and site == 0
        disk_digest = None
        if wiped:  # simulate a SuperNode restart: the in-memory state is gone
            forget_node_state(ctx.state)
            state_file = next(p for p in _state_files(ctx) if p.parent.name == "site-0")
            disk_digest = _digest(read_state_file(state_file)[0].flat())
        held = node_private_state(ctx.state)
        before = held.flat() if held is not None else None
        reply = call_next(msg, ctx)
        # what really travels is packed into one array (core.transport): inspect what it holds
        assert is_packed(msg.content) and (is_packed(reply.content) or not reply.content.array_records)
        reply_content = unpack(reply.content)
        held = node_private_state(ctx.state)
        private = held.flat() if held is not None else {}
        private_values = [v.numpy() for v in private.values()]
        sent_keys, leaked_values = [], 0
        for name, record in reply_content.array_records.items():
            for key, array in record.items():
                sent_keys.append(f"{name}/{key}")
                value = array.numpy()
                leaked_values += any(p.shape == value.shape and np.array_equal(p, value) for p in private_values)
        row = {
            "site": site,
            "kind": kind,
            "round": server_round,
            "wiped": wiped,
            "disk_digest": disk_digest,
            "before": _digest(before),
            "after": _digest(private),
            "private_keys": sorted(private),
            "sent_keys": sent_keys,
            "leaked_values": int(leaked_values),
            "restored": int(reply_content["metrics"]["restored"]) if kind == "train" else None,
        }
        with open(log_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return reply

    def _state_files(ctx: Context):
        from pathlib import Path

        settings = ctx.state.config_records[SETTINGS_RECORD]  # kept since the run's first message
        return Path(settings["results-dir"]).rglob(FILE_NAME)

    return recorder


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    write_fake_medmnist(tmp / "data", "bloodmnist", sizes=(180, 30, 60))
    log_path = tmp / "messages.jsonl"
    overrides = {
        "dataset": "bloodmnist",
        "data-root": str(tmp / "data"),
        "download": False,
        "partition": "dirichlet",
        "alpha": 1.0,
        "num-server-rounds": 3,
        "local-epochs": 1,
        "warmup-min-steps": 0,  # a warm-up of 1 epoch, not the recipe's 100 batches (50 epochs here)
        "batch-size": 32,
        "results-dir": str(tmp / "results"),
        "run-name": "sim",
        "device": "cpu",
        "num-threads": 1,
        "measure-gamma": True,  # simulated sites may send gradients when the run asks
    }
    rows = simulate_with_recorder(overrides, recording_mod(str(log_path)), log_path)
    return tmp / "results" / "sim", rows


def test_every_round_of_every_site_ran(simulation):
    _, rows = simulation
    train = [r for r in rows if r["kind"] == "train"]
    assert sorted((r["round"], r["site"]) for r in train) == [(r, s) for r in (1, 2, 3) for s in (0, 1, 2)]


def test_no_reply_carries_an_encoder_array(simulation):
    _, rows = simulation
    for row in rows:
        assert not any("encoder" in key for key in row["sent_keys"]), row["sent_keys"]
        assert row["leaked_values"] == 0
        if row["kind"] == "evaluate":
            assert row["sent_keys"] == []
        else:
            assert {k.split("/")[0] for k in row["sent_keys"]} <= {"arrays", "gradients"}
            assert {k.split("/")[1].split(".")[0] for k in row["sent_keys"] if k.startswith("arrays/")} == {
                "decoder",
                "classifier",
            }
    assert all(k.startswith("encoder.") for r in rows for k in r["private_keys"])


def test_encoder_persists_across_rounds_and_differs_between_sites(simulation):
    _, rows = simulation
    train = {(r["round"], r["site"]): r for r in rows if r["kind"] == "train"}
    for site in (0, 1, 2):
        assert train[(1, site)]["before"] is None and train[(1, site)]["restored"] == 0
        for rnd in (2, 3):
            row = train[(rnd, site)]
            assert row["restored"] == 1
            if not row["wiped"]:
                assert row["before"] == train[(rnd - 1, site)]["after"]
            assert row["after"] != row["before"]  # the round trained the encoder
    finals = {train[(3, s)]["after"] for s in (0, 1, 2)}
    assert len(finals) == 3


def test_encoder_comes_back_from_disk_after_state_is_wiped(simulation):
    _, rows = simulation
    wiped = [r for r in rows if r["wiped"]]
    assert len(wiped) == 1
    row = wiped[0]
    round1 = next(r for r in rows if r["kind"] == "train" and r["round"] == 1 and r["site"] == 0)
    assert row["before"] is None  # memory was empty ...
    assert row["disk_digest"] == round1["after"]  # ... the disk held exactly round 1's encoder
    assert row["restored"] == 1  # ... and the site restored it instead of starting afresh


def test_results_files_are_written(simulation):
    run_dir, _ = simulation
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-server-rounds"] == 3 and config["run-name"] == "sim"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for row in rounds:
        assert REQUIRED_ROUND_KEYS <= set(row), REQUIRED_ROUND_KEYS - set(row)
        assert 0 <= row["global_acc_worst"] <= row["global_acc_mean"] + 1e-9 <= 1 + 1e-9
        assert {"gamma", "gamma_orig", "gamma_R", "gamma_Phi"} <= set(row)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["round"] == 3 and "optimistic" in summary["best_by_test"]["selected_by"]
    assert summary["best_by_val"]["selected_by"].startswith("highest val_acc_mean")
    model = torch.load(run_dir / "global_model.pt", weights_only=True)
    assert model and {k.split(".")[0] for k in model} == {"decoder", "classifier"}
    assert (run_dir / "partition.png").exists() and (run_dir / "partition.json").exists()
