"""A run never lands on a local SuperLink from another checkout or an older install: the
SuperLink that answers on Flower's local port runs the app with its own code and packages
(core/local_superlink.py; scripts/simulate.sh refuses or restarts)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from core.local_superlink import LocalSuperLink, parse, running, verdict
from tests.pilot_harness import free_port, simulate_sh

REPO = Path(__file__).resolve().parents[1]


def _argv(venv: Path, home: Path, port: str = "39091") -> list[str]:
    return [
        str(venv / "bin" / "python"),
        str(venv / "bin" / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--control-api-address",
        "127.0.0.1:39093",
        "--port",
        port,
        "--log-file",
        str(home / "local-superlink" / "superlink.log"),
    ]


def test_a_local_superlink_is_told_by_its_flwr_home_and_environment(tmp_path):
    venv, home = tmp_path / "a" / ".venv", tmp_path / "a" / ".flwr-home"
    link = parse(7, _argv(venv, home), started=100.0)
    assert link == LocalSuperLink(
        pid=7, flwr_home=home.resolve(), venv=venv.resolve(), started=100.0, ports=frozenset({"39091", "39093"})
    )
    assert link.answers_on({"39091"}) and not link.answers_on({"40001", "40002"})  # another checkout's ports
    assert link.belongs_to(home, venv)
    assert not link.belongs_to(tmp_path / "b" / ".flwr-home", venv)
    assert not link.belongs_to(home, tmp_path / "b" / ".venv")
    assert parse(8, ["python", "-m", "pytest", "--simulation"], 0.0) is None
    assert parse(9, [str(venv / "bin" / "flower-superlink"), "--insecure"], 0.0) is None  # a deployed one


def test_foreign_refused_stale_restarted_current_kept(tmp_path):
    home, venv = tmp_path / "home", tmp_path / ".venv"
    ours = parse(1, _argv(venv, home), started=200.0)
    theirs = parse(2, _argv(tmp_path / "other" / ".venv", tmp_path / "other" / "home"), started=200.0)
    assert verdict([], home, venv, installed=100.0) == (0, "")
    assert verdict([ours], home, venv, installed=100.0) == (0, "")
    code, line = verdict([ours, theirs], home, venv, installed=100.0)
    assert code == 3 and "pid 2:" in line and "another checkout" in line and str(tmp_path / "other") in line
    code, line = verdict([ours], home, venv, installed=300.0)  # started before the last install
    assert code == 4 and "pid 1" in line and "before this checkout's last install" in line


def test_simulate_refuses_a_superlink_of_another_checkout(tmp_path):
    """A process that looks like another checkout's local SuperLink (its `flower-superlink`
    in another venv, its log under another FLWR_HOME): simulate.sh stops with exit 3 and one
    line, before `flwr run` could hand it this app."""
    other = tmp_path / "other"
    script = other / ".venv" / "bin" / "flower-superlink"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\nsleep 60\n")
    script.chmod(0o755)
    port = str(free_port())
    fake = subprocess.Popen(_argv(other / ".venv", other / ".flwr-home", port)[1:])
    try:
        deadline = time.time() + 10
        while fake.pid not in {link.pid for link in running()} and time.time() < deadline:
            time.sleep(0.1)
        env = {
            **os.environ,
            "FLWR_HOME": str(tmp_path / "home"),
            "VENV": str(Path(sys.prefix)),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": port,
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        }
        done = simulate_sh("--run-config", "num-server-rounds=1", env=env, timeout=120)
    finally:
        fake.kill()
        fake.wait()
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"pid {fake.pid}:" in done.stderr and "another checkout or install" in done.stderr
    assert "Starting local SuperLink" not in done.stdout  # flwr run never ran
