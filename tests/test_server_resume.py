"""Server checkpoints, resume and faulty sites, with the real round loop
(`run_federation`) and the real ClientApp handlers over an in-process grid."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

import client_app.app as client
from core.config import ConfigError, RunConfig
from server_app import faults
from server_app.app import run_federation
from server_app.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from server_app.faults import TooFewReplies
from tests.fl_harness import server_identity, small_config, write_fake_medmnist


class FakeClock:
    """Stands in for the `time` module of server_app.faults: sleeping advances it, so a
    site that never answers fails after exactly `round-timeout` without the wait."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(faults, "time", fake)
    return fake


@dataclass
class LocalGrid:
    """Delivers train and evaluate messages to the real handlers through the Grid's
    push/pull; `down[node]` lists the rounds in which that node does not answer (as if
    its SuperNode had died)."""

    state_dir: Path
    num_sites: int = 3
    down: dict[int, set[int]] = field(default_factory=dict)
    contexts: dict[int, Context] = field(default_factory=dict)
    outbox: dict[str, Message] = field(default_factory=dict)
    pushed: int = 0

    def __post_init__(self) -> None:
        for i in range(self.num_sites):
            node_config = {"partition-id": i, "num-partitions": self.num_sites, "state-dir": str(self.state_dir)}
            self.contexts[i + 1] = Context(
                run_id=1, node_id=i + 1, node_config=node_config, state=RecordDict(), run_config={}
            )

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            self.pushed += 1
            ids.append(f"message-{self.pushed}")
            node = msg.metadata.dst_node_id
            if int(msg.content["config"]["server-round"]) in self.down.get(node, set()):
                self.contexts[node].state = RecordDict()  # the restarted node lost its memory
                continue
            delivered = copy.copy(msg)
            delivered.content = copy.deepcopy(msg.content)
            handler = client.train if msg.metadata.message_type == "train" else client.evaluate
            self.outbox[ids[-1]] = handler(delivered, self.contexts[node])
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def run(cfg: RunConfig, grid: LocalGrid) -> dict:
    with server_identity():
        return run_federation(grid, cfg)


def rows(cfg: RunConfig) -> list[dict]:
    path = Path(cfg.results_dir) / cfg.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cfg(tmp_path) -> RunConfig:
    write_fake_medmnist(tmp_path / "data")
    return small_config(tmp_path, "fusedspacefed", run_name="resume", round_timeout=30.0)


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_checkpoints_every_round_and_an_exact_resume(cfg, tmp_path, clock):
    grid = LocalGrid(tmp_path / "site-state")
    run(cfg, grid)
    assert clock.now < 1.0  # every site answered at once: nobody waited for round-timeout
    assert [r for r, _ in list_checkpoints(cfg.results_dir, cfg.run_name)] == [0, 1, 2]
    first = rows(cfg)
    final_model = torch.load(Path(cfg.results_dir) / cfg.run_name / "global_model.pt", weights_only=True)
    ckpt = read_checkpoint(list_checkpoints(cfg.results_dir, cfg.run_name)[1][1])
    assert ckpt.server_round == 1 and ckpt.run_name == "resume" and len(ckpt.rows) == 1

    # A fresh server and restarted sites (empty memory, same disks) continue from round 1.
    resumed_cfg = cfg.replace(run_name="", resume_from=str(ckpt.path))
    run(resumed_cfg, LocalGrid(tmp_path / "site-state"))
    again = rows(cfg)
    assert [r["round"] for r in again] == [1, 2]
    assert again[0] == first[0]
    skip = {"round_seconds"}
    assert {k: v for k, v in again[1].items() if k not in skip} == {k: v for k, v in first[1].items() if k not in skip}
    resumed_model = torch.load(Path(cfg.results_dir) / cfg.run_name / "global_model.pt", weights_only=True)
    assert all(torch.equal(final_model[k], resumed_model[k]) for k in final_model)
    assert json.loads((Path(cfg.results_dir) / "resume" / "summary.json").read_text())["rounds"] == 2


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_a_failed_site_does_not_end_the_run(cfg, tmp_path, clock):
    cfg = cfg.replace(min_replies=2, num_server_rounds=3)
    grid = LocalGrid(tmp_path / "site-state", down={3: {2}})
    run(cfg, grid)
    history = rows(cfg)
    assert [r["num_replies"] for r in history] == [3, 2, 3]
    assert history[1]["failed_sites"] == ["node 3 (site 2): no reply within 30 s"]
    assert 30.0 <= clock.now < 31.0  # the round waited round-timeout for the dead site, once
    # round 1's model is evaluated by round 2's messages, which site 2 never answered
    assert history[0]["failed_eval_sites"] == history[1]["failed_sites"] and history[0]["failed_sites"] == []
    assert [r["num_evaluated"] for r in history] == [2, 3, 3]
    assert all(r["global_acc_mean"] is not None for r in history)


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_too_few_replies_stops_with_a_resumable_checkpoint(cfg, tmp_path):
    cfg = cfg.replace(min_replies=3)
    with pytest.raises(TooFewReplies, match=r"round 2: 2 of 3 sites replied, fewer than min-replies = 3.*resume-from"):
        run(cfg, LocalGrid(tmp_path / "site-state", down={2: {2}}))
    assert [r for r, _ in list_checkpoints(cfg.results_dir, cfg.run_name)] == [0, 1]
    run(cfg.replace(resume_from="latest"), LocalGrid(tmp_path / "site-state"))
    assert [r["round"] for r in rows(cfg)] == [1, 2]


def test_resume_refuses_a_different_configuration(cfg, tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        run(cfg.replace(resume_from="latest"), LocalGrid(tmp_path / "site-state"))
    run(cfg.replace(num_server_rounds=1), LocalGrid(tmp_path / "site-state"))
    with pytest.raises(ConfigError, match=rf"configuration differs \(lr: checkpoint {cfg.lr}, now 0.2\)"):
        run(cfg.replace(resume_from="latest", lr=0.2), LocalGrid(tmp_path / "site-state"))
    path = list_checkpoints(cfg.results_dir, cfg.run_name)[-1][1]
    with pytest.raises(ConfigError, match="differs from the checkpoint's run 'resume'"):
        run(cfg.replace(resume_from=str(path), run_name="other"), LocalGrid(tmp_path / "site-state"))
    path.write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        run(cfg.replace(resume_from=str(path)), LocalGrid(tmp_path / "site-state"))
    assert path.read_bytes() == b"broken"


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_a_fresh_start_never_writes_over_an_earlier_run(cfg, tmp_path):
    """Starting a run (no resume-from) under the name of a finished one stops with one line
    that says what to do, and the finished run's files are untouched."""
    run(cfg.replace(num_server_rounds=1), LocalGrid(tmp_path / "site-state"))
    run_dir = Path(cfg.results_dir) / cfg.run_name
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, checkpoints\).*resume-from"):
        run(cfg.replace(num_server_rounds=2), LocalGrid(tmp_path / "site-state"))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    run(cfg.replace(num_server_rounds=1, run_name="another"), LocalGrid(tmp_path / "site-state"))


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_a_private_run_resumes_only_from_its_newest_checkpoint(tmp_path):
    """Security review, finding 4: a resume from an older checkpoint restored the noise
    generator and the accountant, so the re-run rounds drew the same noise (with another set
    of replying sites, n1*M1 - n2*M2 gives an absent site's clipped update) and epsilon left
    the abandoned releases out. Such a resume is refused; the newest checkpoint resumes."""
    write_fake_medmnist(tmp_path / "data")
    cfg = small_config(
        tmp_path, "fedavg", run_name="private", num_server_rounds=2, dp_clip_norm=0.5, dp_noise_multiplier=1.0
    )
    run(cfg, LocalGrid(tmp_path / "site-state"))
    older = dict(list_checkpoints(cfg.results_dir, cfg.run_name))[1]
    with pytest.raises(CheckpointError, match="newer checkpoint \\(round 2\\).*same noise"):
        run(cfg.replace(resume_from=str(older), num_server_rounds=3), LocalGrid(tmp_path / "site-state"))
    run(cfg.replace(resume_from="latest", num_server_rounds=3), LocalGrid(tmp_path / "site-state"))
    assert [r["round"] for r in rows(cfg)] == [1, 2, 3]
    # without DP nothing is reused that matters: an older checkpoint still resumes
    plain = cfg.replace(run_name="plain", dp_clip_norm=0.0, dp_noise_multiplier=0.0)
    run(plain, LocalGrid(tmp_path / "site-state-plain"))
    older = dict(list_checkpoints(plain.results_dir, plain.run_name))[1]
    run(plain.replace(resume_from=str(older)), LocalGrid(tmp_path / "site-state-plain"))
