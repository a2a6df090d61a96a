"""pilot/rehearse.sh, the operator's walk-through of docs/pilot.md on loopback, run as an
operator runs it (issue 30.1), with docs/pilot.md's own commands (30.2): certificates, keys, SuperLink, proxy, CLI connection,
registration with names, site files, two SuperNodes and a 2-round run; then nothing it
started is left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pilot import guide
from tests.pilot_harness import REPO, base_env

pytestmark = pytest.mark.integration

if not (shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")):
    if os.environ.get("FSF_REQUIRE_NGINX"):  # .ci/run installs nginx and sets this
        pytest.fail("nginx is not installed but FSF_REQUIRE_NGINX is set", pytrace=False)
    pytest.skip("nginx is not installed (apt-get install nginx-light); .ci/run installs it", allow_module_level=True)


def leftovers(folder: Path) -> list[str]:
    """Processes whose command line names the rehearsal's folder (none may outlive it)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.info['pid']}: {cmdline[:200]}")
    return found


def test_the_rehearsal_runs_the_whole_pilot_and_stops_everything(tmp_path, real_data_root):
    # deep, as an operator's folders may be (and pytest-xdist's are): the worker's socket under
    # STATE-DIR would pass the 107 bytes a Unix socket allows, so it must go elsewhere
    folder = tmp_path / ("a-deep-folder-" * 3) / "rehearsal"
    env = {**base_env(tmp_path / "unused-home"), "PYTHON": sys.executable}
    done = subprocess.run(
        # one round: the guide's commands and the stop are what is rehearsed here; rounds after the
        # first at a site (its state from disk, its warm worker) are tests/test_pilot.py's
        ["bash", str(REPO / "pilot" / "rehearse.sh"), "--dir", str(folder), "--data-root", str(real_data_root)]
        + ["--rounds", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=2700,  # 683 s at load 11; over 1,500 s beside the other xdist worker
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    # every step printed with its command: the guide's, as written there (issue 30.2)
    for command in (
        '$ pilot/make-certs.sh -o "$PILOT_DIR/certs" "$COORDINATOR" "$COORDINATOR_IP"',
        '$ pilot/make-site-keys.sh -o "$PILOT_DIR/keys" "$SITE"',
        "$ pilot/start-superlink.sh --certs",
        "$ pilot/start-proxy.sh --superlink",
        '$ python -m pilot.connection pilot "$COORDINATOR:$PORT"',
        '$ flwr supernode register "$PILOT_DIR/keys/hospital-a.key.pub" pilot --name hospital-a',
        "$ python -m partitions.split --dataset breastmnist",
        '$ pilot/start-supernode.sh --superlink "$COORDINATOR:$PORT"',
        "$ flwr run . pilot --stream",
        '$ flwr log "$RUN_ID" pilot',
    ):
        assert command in out, command
    for command in guide.commands():  # every command of sections 1-7 ran, but for the skipped ones
        if command.section in {"1", "2", "3", "4", "5", "6", "7"}:
            assert f"$ {command.text}" in out or f"    {command.text.splitlines()[0]}" in out, command.text
    for skipped in ("skipped here (one machine", "skipped here (needs root", "skipped here (the run has ended"):
        assert skipped in out, skipped
    assert out.count("skipped here (") >= 1 + 2 + 5 + 1 + 4  # settings, scp, sudo, stop, beyond section 7
    assert "hospital-a" in out and "hospital-b" in out  # `flwr supernode list` names the owners
    [summary_path] = list((folder / "results").glob("*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["rounds"] == 1 and summary["final"]["global_acc_mean"] is not None
    # a result at the majority-class share is flagged on its round line and in the summary, and only then
    nothing = abs(summary["final"]["global_acc_mean"] - summary["final"]["test_majority_share"]) <= 1e-6
    assert ("warning" in summary) == nothing
    assert not nothing or "= majority class (73.08 %): learnt nothing yet" in " ".join(out.split())
    # the data as the sites report it: their split, not the run config's defaults
    assert summary["data"]["split"]["alpha"] == 0.5 and summary["data"]["source"] == "site files"
    assert summary_path.parent.name == "fusedspacefed-breastmnist-site-data-s0"
    rows = [json.loads(line) for line in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["num_replies"], r["failed_sites"]) for r in rows] == [(1, 2, [])]
    assert "== stopping what this rehearsal started" in out
    for site in ("hospital-a", "hospital-b"):
        log = (folder / "logs" / f"supernode-{site}.log").read_text()
        assert "over the 107 a Unix socket allows" in log and "site worker ready" in log
    assert leftovers(folder) == []
