"""The pilot under network faults, on loopback: the pilot's start scripts (TLS, SuperNode
authentication, the SuperLink's SQLite database), two sites, each SuperNode reaching the
SuperLink through its own userspace fault injector (pilot/faulty_link.py).

- a site cut off (its packets dropped) for a round, then reconnected: the run goes on
  without it, names it, and the site trains again once its link is back;
- the SuperLink (with its ServerApp) SIGKILLed mid-round and restarted with its database:
  the run submitted again with resume-from = "latest" keeps every finished round and ends
  with the clean run's model and private states;
- a SuperNode that gave up reconnecting (Flower's TLS rule) is stopped and started again
  by start-supernode.sh.

Assertions are on what happened, never on how long it took (2 loaded cores in CI)."""

from __future__ import annotations

import os
import re
import time

import pytest

from tests import fault_harness as fh
from tests.pilot_harness import SMALL_RUN, base_env

pytestmark = pytest.mark.integration

SITES = ["hospital-a", "hospital-b"]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, real_data_root):
    pilot, links = fh.faulty_pilot(tmp_path_factory.mktemp("faults"), real_data_root, SITES)
    try:
        yield pilot, links
    finally:
        fh.close(pilot, links)


def config(pilot, run_name: str, rounds: int, **changes) -> dict:
    return {
        **SMALL_RUN,
        "run-name": run_name,
        "num-server-rounds": rounds,
        "eval-every": rounds,
        "min-replies": 1,
        "round-timeout": 90.0,
        "results-dir": str(pilot.results),
        **changes,
    }


def finish(pilot, run_id: int, timeout: float = 900) -> None:
    status = pilot.wait_for_run(run_id, timeout)
    assert status == "finished:completed", f"{status}\n{pilot.logs(run_id)[-4000:]}"


def test_a_site_cut_off_is_named_and_trains_again_once_reconnected(faulty):
    pilot, links = faulty
    cut_site, node = "hospital-b", pilot.node_ids["hospital-b"]
    started = time.time()
    run_id = pilot.submit(config(pilot, "partition", 3))
    fh.wait_checkpoint(pilot, "partition", 1, 600)
    links[cut_site].cut()  # round 2's messages are out: the site's reply cannot come back
    fh.wait_checkpoint(pilot, "partition", 2, 600)
    links[cut_site].restore()
    finish(pilot, run_id)
    rows = fh.metrics(pilot, "partition")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["num_replies"] == 2 and rows[0]["failed_sites"] == []
    assert rows[1]["num_replies"] == 1
    assert [f for f in rows[1]["failed_sites"] if f.startswith(f"node {node} (site 1): ")], rows[1]
    log = re.sub(r"\s+", " ", pilot.logs(run_id))
    # named while the round waits (late, missing) or when the SuperLink reports it unavailable
    assert re.search(rf"round 2(: | failed: )node {node} \(site 1\)", log), log[-3000:]
    assert links[cut_site].stats.refused_while_cut + links[cut_site].stats.requests > 0
    # once its link is back the site reconnects by itself and trains in the next run
    fh.wait_all_online(pilot, 300)
    run_id = pilot.submit(config(pilot, "after-partition", 1, **{"min-replies": 2}))
    finish(pilot, run_id)
    assert fh.metrics(pilot, "after-partition")[0]["num_replies"] == 2
    assert fh.private_state(pilot, "after-partition", cut_site)[1] == 1
    print(f"\npartition: {time.time() - started:.0f} s, rounds took {[round(r['round_seconds']) for r in rows]} s")


def test_a_superlink_killed_mid_round_resumes_without_losing_or_repeating_a_round(faulty):
    pilot, _ = faulty
    finish(pilot, pilot.submit(config(pilot, "restart-clean", 2, **{"round-timeout": 120.0})))
    clean_model = fh.global_model(pilot, "restart-clean")

    run_id = pilot.submit(config(pilot, "restart", 2, **{"round-timeout": 120.0}))
    fh.wait_checkpoint(pilot, "restart", 1, 600)
    fh.kill_superlink(pilot)  # mid-round 2: its messages are out, no reply is in
    finished = fh.checkpoint_rounds(pilot, "restart")
    rows_before = fh.metrics(pilot, "restart")
    assert max(finished) == len(rows_before) == 1
    fh.restart_superlink(pilot)
    # no waiting for the sites here: the resumed run waits for those of its last round
    run_id = pilot.submit(config(pilot, "restart", 2, **{"round-timeout": 120.0, "resume-from": "latest"}))
    finish(pilot, run_id)
    log = re.sub(r"\s+", "", pilot.logs(run_id))
    assert "resumingrestartafterround1" in log
    rows = fh.metrics(pilot, "restart")
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0] == rows_before[0]  # the finished round, kept as it was
    assert rows[1]["num_replies"] == 2 and rows[1]["failed_sites"] == []
    assert fh.same_model(fh.global_model(pilot, "restart"), clean_model)
    for site in SITES:  # each site's private state: round 2 once, as in the clean run
        assert fh.private_state(pilot, "restart", site) == fh.private_state(pilot, "restart-clean", site)


def test_a_supernode_that_gives_up_reconnecting_is_stopped_and_started_again(faulty, tmp_path):
    """Flower 1.42's SuperNode stays alive but disconnected after it gives up on an error
    naming TLS (a handshake that timed out during a cut-off): start-supernode.sh reads that
    log line, stops it (exit 75) and --retry starts it again. A stand-in flower-supernode
    that logs the line and waits plays the stuck SuperNode."""
    pilot, _ = faulty
    fake_bin, starts = tmp_path / "bin", tmp_path / "starts"
    fake_bin.mkdir()
    fake = fake_bin / "flower-supernode"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f"echo started >> {starts}\n"
        "echo 'WARNING :   Giving up reconnection after 30.63 seconds and 4 tries.' >&2\n"
        "exec sleep 300\n"
    )
    fake.chmod(0o755)
    env = base_env(tmp_path / "home")
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    cmd = pilot.supernode_cmd("hospital-a", pilot.site_files[0], retry=1, extra=("--no-worker",))
    proc = pilot.start("supernode-gives-up", cmd, env, tmp_path / "site")
    assert pilot.exits(proc, 180) == 75, proc.text()[-3000:]
    assert starts.read_text().split() == ["started", "started"]  # started again once (--retry 1)
    log = proc.text()
    assert log.count("gave up reconnecting") == 2 and "restarting in 2 s (attempt 1 of 1)" in log, log[-3000:]
