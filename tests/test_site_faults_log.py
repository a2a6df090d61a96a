"""What the server says about late, missing and offline sites, and a resumed run that
waits for its sites: the real round loop over the in-process grid of
tests/test_server_resume.py, on a fake clock (no real waiting)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

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
    assert [r.get("offline_sites") for r in history] == [None, ["node 3 (site 2)"], ["node 3 (site 2)"]]


@dataclass
class ReconnectingGrid(LocalGrid):
    """Node 3 comes back `after` fake seconds (a SuperNode reconnecting after the
    SuperLink restarted)."""

    after: float = 0.0
    clock: FakeClock | None = None

    def get_node_ids(self):
        nodes = super().get_node_ids()
        return nodes if self.clock.now >= self.after else [n for n in nodes if n != 3]


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
