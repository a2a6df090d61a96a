"""The pilot's start scripts, run with stand-ins for Flower, nginx and the site worker:
what they refuse, and what they hand on (node config, file modes, proxy limits). Fast:
nothing real is started."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(path: Path, text: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes():
    """A short folder (Unix socket paths are short) with stand-in binaries that log their arguments."""
    with tempfile.TemporaryDirectory(prefix="fsf-") as folder:
        root = Path(folder)
        (root / "bin").mkdir()
        log = root / "calls.log"
        _script(root / "bin" / "flower-supernode", f'echo "supernode $*" >>"{log}"\n')
        _script(root / "bin" / "nginx", "exit 0\n")
        # the Python the scripts run: preflight checks pass; the worker opens its socket and waits
        _script(
            root / "python",
            f'echo "python $*" >>"{log}"\n'
            'if [[ "$2" == client_app.worker ]]; then\n'
            '  while [[ $# -gt 0 ]]; do [[ "$1" == --socket ]] && sock="$2"; shift; done\n'
            f'  exec "{sys.executable}" -c "import socket, sys, time; s = socket.socket(socket.AF_UNIX); '
            's.bind(sys.argv[1]); s.listen(); time.sleep(30)" "$sock"\n'
            "fi\n",
        )
        yield root, log


def _run(fakes, script: str, *args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    root, _ = fakes
    env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", "PYTHON": str(root / "python")}
    return subprocess.run(
        ["bash", "-c", f'umask {umask:03o}; exec bash "$0" "$@"', str(REPO / "pilot" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )


def test_a_site_can_require_dp_and_its_state_and_worker_log_are_its_users_only(fakes):
    """Security review, findings 8 and 9: the script gave no way to set min-dp-noise-multiplier
    (an isolated site's worker takes its node config from the script only), and without
    isolation the state folder kept the umask's 0755 and worker.log (the pre-clip update
    norms) was 0644."""
    root, log = fakes
    (root / "site.npz").write_bytes(b"")
    (root / "site.key").write_text("")
    result = _run(
        fakes,
        "start-supernode.sh",
        *("--superlink", "localhost:8000", "--ca", "ca.crt", "--key", str(root / "site.key")),
        *("--data-path", str(root / "site.npz"), "--site-name", "a", "--state-dir", str(root / "state")),
        *("--min-dp-noise-multiplier", "1.5"),
    )
    assert result.returncode == 0, result.stderr
    (supernode,) = [line for line in log.read_text().splitlines() if line.startswith("supernode ")]
    assert "min-dp-noise-multiplier=1.5" in supernode and "site-worker=" in supernode
    assert stat.S_IMODE((root / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "state" / "worker.log").stat().st_mode) == 0o600
    refused = _run(fakes, "start-supernode.sh", "--min-dp-noise-multiplier", "lots", "--superlink", "x")
    assert refused.returncode == 2


def test_the_superlink_refuses_to_listen_beside_its_proxy(fakes):
    """Security review, finding 11: the help text suggested --host 0.0.0.0, which lets every
    site reach the Control API around the proxy, and the script did not refuse it."""
    result = _run(fakes, "start-superlink.sh", "--host", "0.0.0.0", "--certs", "nowhere")
    assert result.returncode == 2 and "not loopback" in result.stderr
    assert "0.0.0.0 to accept" not in _run(fakes, "start-superlink.sh", "--help").stdout
    loopback = _run(fakes, "start-superlink.sh", "--host", "127.0.0.1", "--certs", "nowhere")
    assert loopback.returncode == 2 and "ca.crt is missing" in loopback.stderr  # past the host check
    unguarded = _run(fakes, "start-superlink.sh", "--host", "0.0.0.0", "--unguarded", "--certs", "nowhere")
    assert "ca.crt is missing" in unguarded.stderr


def test_supernodes_get_a_smaller_request_body_bound_than_the_operator(fakes):
    """Security review, finding 10: the 1 GiB body limit (for a run's app bundle) also applied
    to /v1/fleet/, which any holder of ca.crt reaches."""
    root, _ = fakes
    certs = root / "certs"
    certs.mkdir()
    for name in ("ca.crt", "superlink.crt", "superlink.key"):
        (certs / name).write_text("")
    result = _run(
        fakes,
        "start-proxy.sh",
        *("--superlink", "127.0.0.1:8001", "--certs", str(certs), "--state-dir", str(root / "proxy"), "--check"),
    )
    assert result.returncode == 0, result.stderr
    conf = (root / "proxy" / "nginx.conf").read_text()
    fleet = re.search(r"location /v1/fleet/ \{(.*?)\}", conf, re.S).group(1)
    assert re.search(r"client_max_body_size 64m;", fleet)
    assert re.search(r"^\s*client_max_body_size 1g;", conf, re.M)  # the server's: the operator's app bundle
