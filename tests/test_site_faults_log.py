"""What the server says about late, missing and offline sites, and a resumed run that
waits for its sites: the real round loop over the in-process grid of
tests/test_server_resume.py, on a fake clock (no real waiting)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Error, Message

from core.metrics import majority_share
from server_app import faults, rounds
from server_app.checkpoint import list_checkpoints
from tests.fl_harness import write_fake_medmnist
from tests.test_server_resume import FakeClock, LocalGrid, rows, run, small_config


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(faults, "time", fake)
    monkeypatch.setattr(rounds, "time", fake)
    return fake


@pytest.fixture
def cfg(tmp_path):
    write_fake_medmnist(tmp_path / "data")
    return small_config(tmp_path, "fedavg", run_name="faults", round_timeout=60.0)


def text(capsys) -> str:
    return re.sub(r"\s+", " ", capsys.readouterr().err)


def test_a_late_site_and_a_missing_site_each_get_a_line(cfg, tmp_path, clock, capsys, monkeypatch):
    monkeypatch.setattr(faults, "LATE_AFTER", 5.0)
    run(cfg, LocalGrid(tmp_path / "state", down={3: {2}}))
    err = text(capsys)
    assert "round 2: node 3 (site 2) is late: no reply after 5 s; the others answered within 0 s" in err
    assert "round 2: node 3 (site 2) is missing: no reply within 60 s" in err
    assert "round 1: node" not in err  # nobody was late in round 1
    assert rows(cfg)[1]["failed_sites"] == ["node 3 (site 2): no reply within 60 s"]


@dataclass
class DroppingGrid(LocalGrid):
    """Node 3 disconnects (the SuperLink stops listing it) once it has answered round 1."""

    answered: int = 0

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        self.answered += sum(m.metadata.src_node_id == 3 for m in out)
        return out

    def get_node_ids(self):
        return [n for n in super().get_node_ids() if not (n == 3 and self.answered)]


def test_an_offline_site_is_named_each_round(cfg, tmp_path, clock, capsys):
    run(cfg.replace(num_server_rounds=3), DroppingGrid(tmp_path / "state"))
    err = text(capsys)
    for server_round in (2, 3):
        assert f"round {server_round}: node 3 (site 2) is offline (not connected to the SuperLink)" in err
    history = rows(cfg)
    assert [r["num_replies"] for r in history] == [3, 2, 2]
    assert [r["offline_sites"] for r in history] == [[], ["node 3 (site 2)"], ["node 3 (site 2)"]]


@dataclass
class ReconnectingGrid(LocalGrid):
    """Node 3 comes back `after` fake seconds (a SuperNode reconnecting after the
    SuperLink restarted)."""

    after: float = 0.0
    clock: FakeClock | None = None

    def get_node_ids(self):
        nodes = super().get_node_ids()
        return nodes if self.clock.now >= self.after else [n for n in nodes if n != 3]


@pytest.mark.slow  # about 4 s or more idle (several lean rounds); `make test` runs it, the fast tier leaves it
def test_a_resumed_run_waits_for_the_sites_of_its_last_round(cfg, tmp_path, clock, capsys):
    run(cfg.replace(num_server_rounds=1), LocalGrid(tmp_path / "state"))
    assert [r for r, _ in list_checkpoints(cfg.results_dir, cfg.run_name)] == [0, 1]
    capsys.readouterr()
    resumed = cfg.replace(num_server_rounds=2, resume_from="latest")
    run(resumed, ReconnectingGrid(tmp_path / "state", after=40.0, clock=clock))
    err = text(capsys)
    assert "resuming: 2 of the 3 sites that answered round 1 are connected; waiting up to 60 s" in err
    assert 40.0 <= clock.now < 45.0
    assert [r["num_replies"] for r in rows(cfg)] == [3, 3]


def test_a_resumed_run_goes_on_without_a_site_that_does_not_come_back(cfg, tmp_path, clock, capsys):
    run(cfg.replace(num_server_rounds=1), LocalGrid(tmp_path / "state"))
    resumed = cfg.replace(num_server_rounds=2, resume_from="latest")
    run(resumed, ReconnectingGrid(tmp_path / "state", after=1e9, clock=clock))
    assert "resuming with 2 of 3 sites connected" in text(capsys)
    assert [r["num_replies"] for r in rows(cfg)] == [3, 2]


# -- late means late (issue 28.1), each site named once (issue 30.4) ------------------------


@dataclass
class SlowGrid(LocalGrid):
    """Replies reach the server `delay[(node, round)]` fake seconds after the push (0 unless
    given); `errors` lists (node, round) whose reply is an error, as the SuperLink sends for
    a node it lost."""

    clock: FakeClock | None = None
    delay: dict[tuple[int, int], float] = field(default_factory=dict)
    errors: set[tuple[int, int]] = field(default_factory=set)
    due: dict[str, float] = field(default_factory=dict)

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for mid, msg in zip(ids, messages):
            key = (msg.metadata.dst_node_id, int(msg.content["config"]["server-round"]))
            self.due[mid] = self.clock.now + self.delay.get(key, 0.0)
            if key in self.errors and mid in self.outbox:
                self.outbox[mid] = Message(Error(0, "Node Unavailable"), reply_to=msg)
        return ids

    def pull_messages(self, message_ids):
        ready = [i for i in message_ids if self.due.get(i, 0.0) <= self.clock.now]
        return super().pull_messages(ready)


def test_sites_that_answer_together_are_not_late(cfg, tmp_path, clock, capsys):
    """A cold start (nobody answers for 100 s) and sites answering in waves, as sites
    sharing CPUs do: no site is called late."""
    delay = {(node, 1): 100.0 for node in (1, 2, 3)}
    delay.update({(1, 2): 40.0, (2, 2): 80.0, (3, 2): 119.0})
    cfg = cfg.replace(round_timeout=600.0)  # late regardless of the others after half of it
    run(cfg, SlowGrid(tmp_path / "state", clock=clock, delay=delay))
    err = text(capsys)
    assert " late" not in err and "missing" not in err and "failed" not in err
    assert [r["failed_sites"] for r in rows(cfg)] == [[], []]


def test_a_round_where_nobody_answers_for_long_says_so_once(cfg, tmp_path, clock, capsys):
    cfg = cfg.replace(round_timeout=600.0)
    run(cfg, SlowGrid(tmp_path / "state", clock=clock, delay={(n, 1): 250.0 for n in (1, 2, 3)}))
    err = text(capsys)
    assert err.count("round 1: no reply yet from any of the 3 sites after 120 s") == 1
    assert "not a fault" in err and " late" not in err


def test_a_site_far_behind_the_others_is_late_and_then_answers(cfg, tmp_path, clock, capsys):
    cfg = cfg.replace(round_timeout=600.0)
    run(cfg, SlowGrid(tmp_path / "state", clock=clock, delay={(1, 2): 10.0, (2, 2): 12.0, (3, 2): 50.0}))
    err = text(capsys)
    # late once 30 s (LATE_AFTER) have passed and 3 x the median reply (11 s) too
    late = r"(?<!of )round 2: node 3 \(site 2\) is late: no reply after (\d+) s; the others answered within 12 s"
    assert [int(s) for s in re.findall(late, err)] in ([33], [34])
    assert len(re.findall(r"(?<!of )round 2: node 3 \(site 2\) answered late, after 50 s", err)) == 1
    assert "node 1 (site 0) is late" not in err and "failed" not in err
    assert rows(cfg)[1]["failed_sites"] == []


def test_a_site_that_fails_is_named_failed_not_answered(cfg, tmp_path, clock, capsys):
    grid = SlowGrid(tmp_path / "state", clock=clock, delay={(3, 2): 45.0}, errors={(3, 2)})
    run(cfg, grid)
    err = text(capsys)
    assert "round 2: node 3 (site 2) is late" in err
    assert "answered late" not in err
    # (the final evaluation's messages are round 2's too: it fails there again, named as such)
    assert len(re.findall(r"(?<!of )round 2: node 3 \(site 2\) failed: Node Unavailable", err)) == 1
    assert rows(cfg)[1]["failed_sites"] == ["node 3 (site 2): Node Unavailable"]


def test_a_missing_site_is_named_missing_once(cfg, tmp_path, clock, capsys):
    run(cfg, LocalGrid(tmp_path / "state", down={3: {2}}))
    err = text(capsys)
    assert len(re.findall(r"(?<!of )round 2: node 3 \(site 2\) is missing", err)) == 1 and "failed" not in err


@dataclass
class NeverAnsweringGrid(LocalGrid):
    """Node 3 never answers and drops off the SuperLink after round 1 (a SuperNode
    SIGKILLed during its first round)."""

    rounds_seen: int = 0

    def push_messages(self, messages):
        messages = list(messages)
        self.rounds_seen = max(self.rounds_seen, *(int(m.content["config"]["server-round"]) for m in messages))
        return super().push_messages(messages)

    def get_node_ids(self):
        nodes = super().get_node_ids()
        return nodes if self.rounds_seen < 1 else [n for n in nodes if n != 3]


def test_a_site_lost_before_it_ever_answered_is_offline_next_round(cfg, tmp_path, clock, capsys):
    grid = NeverAnsweringGrid(tmp_path / "state", down={3: {1, 2, 3}})
    run(cfg.replace(num_server_rounds=3), grid)
    err = text(capsys)
    history = rows(cfg)
    assert history[0]["failed_sites"] == ["node 3: no reply within 60 s"]  # no reply yet says which site it is
    assert [r["offline_sites"] for r in history] == [[], ["node 3"], ["node 3"]]
    assert "round 2: node 3 is offline (not connected to the SuperLink): not asked this round" in err
    assert [r["num_replies"] for r in history] == [2, 2, 2]


# -- one round time (issue 30.6) -------------------------------------------------------------


@pytest.mark.slow  # about 4 s or more idle (several lean rounds); `make test` runs it, the fast tier leaves it
def test_the_console_and_metrics_give_the_same_round_time(cfg, tmp_path, clock, capsys):
    """Every round's time on its progress line is metrics.jsonl's `round_seconds`, the last
    round's included (its final evaluation adds to it before either is written)."""
    cfg = cfg.replace(num_server_rounds=3)
    delay = {(1, 1): 7.0, (2, 2): 11.0, (1, 3): 5.0}  # (the final evaluation's messages are round 3's too)
    grid = SlowGrid(tmp_path / "state", clock=clock, delay=delay)
    run(cfg, grid)
    err = text(capsys)
    printed = [float(s) for s in re.findall(r"round \d+/3 (\d+\.\d)s", err)]
    recorded = [round(r["round_seconds"], 1) for r in rows(cfg)]
    assert printed == recorded
    assert recorded[2] >= 5.0 + 5.0  # the last round's own time and its final evaluation


def test_every_round_reports_the_test_majority_share_and_the_sites_data(cfg, tmp_path, clock):
    run(cfg, LocalGrid(tmp_path / "state"))
    labels = np.load(tmp_path / "data" / "breastmnist.npz")["test_labels"]
    share = majority_share(labels, "binary-class")
    assert [r["test_majority_share"] for r in rows(cfg)] == pytest.approx([share, share])
    summary = json.loads((tmp_path / "results" / cfg.run_name / "summary.json").read_text())
    assert summary["data"]["source"] == "run config"  # simulated sites: the run's settings made the split
    assert [s["site"] for s in summary["data"]["sites"]] == [0, 1, 2]
    assert sum(s["train"] for s in summary["data"]["sites"]) == 96
