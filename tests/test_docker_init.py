"""The demo federation (docker/compose.yml) has no SuperNode authentication: its `init`
service, which the SuperLink waits for, refuses a SuperLink bound to anything but loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

INIT = Path(__file__).resolve().parents[1] / "docker" / "init.sh"


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.0.2.10", "::", "superlink.example.org"])
def test_init_refuses_a_non_loopback_superlink(bind):
    done = subprocess.run(["bash", str(INIT)], env={"SUPERLINK_BIND": bind, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1 and f"refusing SUPERLINK_BIND={bind}" in done.stderr


def test_init_accepts_loopback_and_goes_on():
    # past the check it needs the compose mounts (/project): it fails there, not at the check
    done = subprocess.run(["bash", str(INIT)], env={"SUPERLINK_BIND": "127.0.0.1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert "refusing" not in done.stderr
