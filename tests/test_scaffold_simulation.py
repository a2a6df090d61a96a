"""SCAFFOLD through a real Flower simulation (Ray backend, in-process ServerApp, 3 sites,
2 rounds): the server's c travels in every train message, the sites' dc_i come back,
c_i stays in each site's private state and is never in a reply, and the server's c
lands in the round checkpoints.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Message

from client_app.state import node_private_state
from core.methods import contract_for
from core.transport import is_packed, unpack
from server_app.checkpoint import checkpoint_path
from tests.conftest import simulate_with_recorder
from tests.fl_harness import write_fake_medmnist

pytestmark = pytest.mark.slow  # one Flower (Ray) simulation shared by the module, ~20 s

CONTROL_RECORD = contract_for("scaffold").to_site[0].name  # c, server -> site
CONTROL_UPDATE_RECORD = contract_for("scaffold").to_server[0].name  # dc_i, site -> server


def recording_mod(log_path: str):
    """The real handlers behind a mod that logs what comes in, what goes out and what stays."""

    def recorder(msg: Message, ctx: Context, call_next) -> Message:
        reply = call_next(msg, ctx)
        # what really travels is packed into one array (core.transport): inspect what it holds
        assert is_packed(msg.content) and (is_packed(reply.content) or not reply.content.array_records)
        reply_content, msg_content = unpack(reply.content), unpack(msg.content)
        if msg.metadata.message_type != "train":
            return reply
        private = node_private_state(ctx.state).flat()
        sent = [
            (name, key, np.array(array.numpy()))
            for name, record in reply_content.array_records.items()
            for key, array in record.items()
        ]
        equal_to_private = sum(
            any(p.shape == v.shape and p.abs().max() > 0 and np.array_equal(p.numpy(), v) for p in private.values())
            for _, _, v in sent
        )
        row = {
            "site": int(ctx.node_config["partition-id"]),
            "round": int(msg_content["config"]["server-round"]),
            "incoming": sorted(msg_content.array_records),
            "c_size": len(msg_content[CONTROL_RECORD]) if CONTROL_RECORD in msg_content.array_records else -1,
            "sent_records": sorted(reply_content.array_records),
            "sent_keys": sorted({key for name, key, _ in sent if name != "gradients"}),
            "private_keys": sorted(private),
            "equal_to_private": int(equal_to_private),
        }
        with open(log_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return reply

    return recorder


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaffold-sim")
    write_fake_medmnist(tmp / "data")
    log_path = tmp / "messages.jsonl"
    overrides = {
        "method": "scaffold",
        "dataset": "breastmnist",
        "data-root": str(tmp / "data"),
        "download": False,
        "partition": "iid",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "batch-size": 16,
        "results-dir": str(tmp / "results"),
        "run-name": "scaffold-sim",
        "device": "cpu",
        "num-threads": 1,
        "measure-gamma": True,
    }
    rows = simulate_with_recorder(overrides, recording_mod(str(log_path)), log_path)
    return tmp / "results", rows


def test_c_goes_out_and_dc_comes_back_every_round(simulation):
    _, rows = simulation
    assert sorted((r["round"], r["site"]) for r in rows) == [(r, s) for r in (1, 2) for s in (0, 1, 2)]
    for row in rows:
        assert row["incoming"] == ["arrays", CONTROL_RECORD]
        assert row["c_size"] == (0 if row["round"] == 1 else 61)  # round 1: c = 0, sent empty
        assert row["sent_records"] == sorted(["arrays", "gradients", CONTROL_UPDATE_RECORD])


def test_c_i_stays_private_and_is_never_sent(simulation):
    _, rows = simulation
    for row in rows:
        assert len(row["private_keys"]) == 61 and all(k.startswith("extras/classifier.") for k in row["private_keys"])
        if row["round"] > 1:  # in round 1, c_i = 0 so dc_i equals the new c_i by definition
            assert row["equal_to_private"] == 0


def test_server_control_variate_is_checkpointed(simulation):
    results, _ = simulation
    rounds = [json.loads(line) for line in (results / "scaffold-sim" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["control_norm"] > 0 for r in rounds)
    for row in rounds:
        saved = torch.load(checkpoint_path(results, "scaffold-sim", row["round"]), weights_only=True)
        state = saved["strategy_state"]
        assert len(state) == 61 and all(k.startswith("control/classifier.") for k in state)
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())))
        assert norm == pytest.approx(row["control_norm"], rel=1e-6)
