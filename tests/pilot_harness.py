"""A real pilot on 127.0.0.1 for tests: the pilot/ scripts start a SuperLink (TLS,
SuperNode authentication, SQLite database) and SuperNodes, each with its own
FLWR_HOME, site file and state folder; the flwr CLI registers keys and submits runs.

Every process is started in its own session and stopped by its process-group id
(SIGTERM, then SIGKILL), so a SuperNode's ClientApp children go with it.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.source_files import project_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@functools.cache
def app_copy() -> Path:
    """The repository's own files (tests/source_files.project_files: tracked, or untracked and
    not ignored, as the working tree has them), copied once per test process for the tests'
    `flwr run`s to submit. Flower builds the app bundle by walking every file under the app's
    folder, `.venv` included (some 55,000 files: 3.8 CPU-s a submission here), before
    filtering; from this copy the same bundle, byte for byte (tests/test_fab.py), takes 0.1 s."""
    copy = Path(tempfile.mkdtemp(prefix="fsf-app-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    for source in project_files(REPO, suffix=""):
        if not source.is_symlink():  # Flower leaves symlinks out of a bundle too
            target = copy / source.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_superlinks(control_port: int) -> None:
    """The local SuperLink that `flwr run` started on this control port, and its process tree."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmdline and f"127.0.0.1:{control_port}" in cmdline:
            for child in proc.children(recursive=True):
                child.send_signal(signal.SIGKILL)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except psutil.TimeoutExpired:
                proc.kill()


def simulate_sh(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """scripts/simulate.sh with `args`, from the repository, its output captured as text."""
    return subprocess.run(
        [str(REPO / "scripts" / "simulate.sh"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The small run of the pilot tests and the round-cost benchmark (breastmnist over 3 sites).
# Its warm-up is its 1 epoch: the recipe's 100-batch minimum (added after the benchmarks'
# figures were measured) would make it about 30 epochs at a 3-batch site, every round.
SMALL_RUN = {
    "dataset": "breastmnist",
    "download": False,
    "local-epochs": 1,
    "warmup-epochs": 1,
    "warmup-min-steps": 0,
    "batch-size": 64,
    "measure-gamma": False,
    "num-threads": 1,
    "device": "cpu",
}


#: How often the federation's SuperExecs ask for a new task, in the tests: Flower's own default
#: (1 s) everywhere, not the sites' 0.1 s of start-supernode.sh, which saves up to a second a
#: message but keeps the SuperNodes and their SuperExecs polling: an idle 2-site pilot spent 5.4
#: CPU-s a minute with the scripts' defaults and 1.8 at 1 s everywhere (benchmarks/PILOT-IDLE.md),
#: and the suite keeps federations up for about 20 minutes. What the tests check does not depend
#: on it; benchmarks/round_cost.py passes None (the scripts' own).
TEST_SUPEREXEC_POLL = "1.0"


def base_env(flwr_home: Path, superexec_poll: str | None = TEST_SUPEREXEC_POLL) -> dict[str, str]:
    """The environment of a pilot process or flwr CLI call: its own FLWR_HOME, none of the
    caller's FLWR_ settings; `superexec_poll` (seconds) or None for the scripts' default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    if superexec_poll is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = superexec_poll
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        COLUMNS="200",
        NO_COLOR="1",
    )
    return env


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        """Signal the whole process group, then make sure every member is gone."""
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(self.pid, s)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            if s == signal.SIGKILL:
                break
            # the leader is gone; children (ClientApps, SuperExec) may linger a moment
            deadline = time.time() + grace
            while time.time() < deadline and _group_alive(self.pid):
                time.sleep(0.2)
            if not _group_alive(self.pid):
                break
        self.popen.wait(timeout=5) if self.popen.poll() is None else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Pilot:
    """A pilot federation under `root`; `stop_all()` ends everything it started."""

    root: Path
    port: int = field(default_factory=free_port)
    superlink_port: int | None = None  # the SuperLink's own port when a proxy holds `port`
    processes: list[Process] = field(default_factory=list)
    node_ids: dict[str, int] = field(default_factory=dict)  # site name -> node id
    site_files: list[Path] = field(default_factory=list)
    supernodes: dict[str, Process] = field(default_factory=dict)  # site name -> its SuperNode
    superlink: Process | None = None
    superexec_poll: str | None = TEST_SUPEREXEC_POLL  # see base_env

    def __post_init__(self) -> None:
        self.certs = self.root / "certs"
        self.keys = self.root / "keys"
        self.cli_home = self.root / "cli-home"
        self.results = self.root / "results"
        self.address = f"127.0.0.1:{self.port}"

    # -- processes -------------------------------------------------------------
    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> Process:
        cwd.mkdir(parents=True, exist_ok=True)
        log = self.root / "logs" / f"{name}-{len([p for p in self.processes if p.name == name])}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.processes):  # SuperNodes before the SuperLink
            proc.stop()

    def run(self, cmd: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A short command (scripts, flwr CLI) with the CLI's environment."""
        kwargs.setdefault("env", base_env(self.cli_home, self.superexec_poll))
        kwargs.setdefault("cwd", REPO)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        out = self.run([str(BIN / "flwr"), *args, "--format", "json"], timeout=timeout).stdout
        return json.loads(out[out.index("{") :])

    # -- set-up ----------------------------------------------------------------
    def make_material(self, sites: list[str]) -> None:
        self.run(["bash", str(REPO / "pilot" / "make-certs.sh"), "-o", str(self.certs)])
        self.run(["bash", str(REPO / "pilot" / "make-site-keys.sh"), "-o", str(self.keys), *sites])
        self.run(
            [sys.executable, "-m", "pilot.connection", "pilot", self.address]
            + ["--root-certificates", str(self.certs / "ca.crt"), "--default"]
        )

    def start_superlink(self) -> Process:
        cmd = ["bash", str(REPO / "pilot" / "start-superlink.sh"), "--certs", str(self.certs)]
        cmd += ["--db", str(self.root / "superlink" / "state.db"), "--port", str(self.superlink_port or self.port)]
        proc = self.start(
            "superlink", cmd, base_env(self.root / "superlink-home", self.superexec_poll), self.root / "superlink"
        )
        wait_for(lambda: "Uvicorn running" in proc.text(), 90, f"SuperLink start ({proc.log})", proc)
        self.superlink = proc
        return proc

    def start_proxy(self, operators: tuple[str, ...] = ()) -> Process:
        """pilot/start-proxy.sh on `port`, in front of the SuperLink on `superlink_port`."""
        assert self.superlink_port, "a proxy needs the SuperLink on its own port"
        cmd = ["bash", str(REPO / "pilot" / "start-proxy.sh"), "--superlink", f"127.0.0.1:{self.superlink_port}"]
        cmd += ["--certs", str(self.certs), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--state-dir", str(self.root / "proxy")] + [a for op in operators for a in ("--operator", op)]
        proc = self.start("proxy", cmd, base_env(self.root / "proxy-home", self.superexec_poll), self.root)
        wait_for(lambda: _accepts("127.0.0.1", self.port), 30, f"proxy start ({proc.log})", proc, every=0.2)
        return proc

    def start_federation(
        self, sites: list[str], timeout: float = 240.0, unregistered: tuple[str, ...] = (), extra: tuple[str, ...] = ()
    ) -> None:
        """TLS material and keys (for `unregistered` names too), the SuperLink, every site
        registered and its SuperNode started on its file (`site_files`, in order), all online."""
        self.make_material([*sites, *unregistered])
        self.start_superlink()
        for site in sites:
            self.register(site)
        for i, site in enumerate(sites):
            self.supernodes[site] = self.start_supernode(site, self.site_files[i], extra=extra)
        self.wait_online(set(self.node_ids.values()), timeout, f"{len(sites)} SuperNodes online")

    def register(self, site: str) -> int:
        reply = self.flwr("supernode", "register", str(self.keys / f"{site}.key.pub"), "pilot", "--name", site)
        self.node_ids[site] = int(reply["node-id"])
        return self.node_ids[site]

    def supernode_cmd(
        self,
        site: str,
        data_path: Path,
        ca: Path | None = None,
        retry: int = 0,
        superlink: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> list[str]:
        """pilot/start-supernode.sh for `site` (retry: restarts 2 s apart while refused)."""
        return [
            "bash",
            str(REPO / "pilot" / "start-supernode.sh"),
            "--superlink",
            superlink or self.address,
            "--ca",
            str(ca or self.certs / "ca.crt"),
            "--key",
            str(self.keys / f"{site}.key"),
            "--data-path",
            str(data_path),
            "--site-name",
            site,
            "--state-dir",
            str(self.state_dir(site)),
            "--port",
            str(free_port()),
            "--retry",
            str(retry),
            "--retry-wait",
            "2",
            *extra,
        ]

    def state_dir(self, site: str) -> Path:
        return self.root / "sites" / site / "state"

    def start_supernode(
        self,
        site: str,
        data_path: Path,
        retry: int = 0,
        ca: Path | None = None,
        superlink: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> Process:
        cmd = self.supernode_cmd(site, data_path, ca=ca, retry=retry, superlink=superlink, extra=extra)
        home = self.root / "sites" / site / "flwr-home"
        return self.start(f"supernode-{site}", cmd, base_env(home, self.superexec_poll), self.root / "sites" / site)

    def exits(self, proc: Process, timeout: float = 120) -> int:
        """Wait for a process that should end by itself; its exit status."""
        wait_for(lambda: not proc.alive(), timeout, f"{proc.name} to exit ({proc.log})")
        return proc.popen.returncode

    def online(self) -> set[int]:
        nodes = self.flwr("supernode", "list", "pilot").get("nodes", [])
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def wait_online(self, node_ids: set[int], timeout: float, what: str) -> None:
        """Wait until every one of `node_ids` is online. Each look is a flwr CLI call (about 1.2
        CPU-s), and a restarted or reconnecting SuperNode can take a minute (the SuperLink waits
        for the old connection's heartbeats to lapse): the looks start 1 s apart and spread
        out to 10 s, about 11 in a minute instead of 20-30."""
        wait_for(lambda: self.online() >= node_ids, timeout, what, every=1.0, growth=1.5, longest=10.0)

    # -- runs ------------------------------------------------------------------
    def submit(self, run_config: dict[str, object]) -> int:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        reply = self.flwr("run", str(app_copy()), "pilot", "--run-config", overrides, timeout=180)
        return int(reply["run-id"])

    def status(self, run_id: int) -> str:
        runs = self.flwr("list", "pilot", "--run-id", str(run_id)).get("runs", [])
        return str(runs[0].get("status", "")) if runs else ""

    def wait_for_run(self, run_id: int, timeout: float) -> str:
        """Wait until the run finishes; returns its status (e.g. finished:completed).

        Watches the SuperLink's log for the end of the run's task (cheap) and asks the
        flwr CLI (a second or two of CPU per call) only then, or once a minute."""
        deadline = time.time() + timeout
        marker = f"of run {run_id}"
        asked = time.time()
        while time.time() < deadline:
            ended = any("Finished task" in line and marker in line for line in self.superlink.text().splitlines())
            if ended or time.time() - asked > 60:
                status = self.status(run_id)
                asked = time.time()
                if status.startswith("finished"):
                    return status
            time.sleep(2)
        raise AssertionError(f"run {run_id} not finished within {timeout:.0f} s (status {self.status(run_id)})")

    def logs(self, run_id: int) -> str:
        return self.run([str(BIN / "flwr"), "log", str(run_id), "pilot", "--show"], timeout=60).stdout


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class SourceRelay:
    """A TCP relay on 127.0.0.1 that connects onward *from* another loopback address.

    The flwr CLI and the SuperNode cannot choose their source address; a client that
    connects through this relay reaches the target as `source` (e.g. 127.0.0.2), exactly
    as a machine at that address would. Bytes pass unchanged, so TLS is end to end."""

    def __init__(self, target_port: int, source: str) -> None:
        self.target_port, self.source = target_port, source
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), source_address=(self.source, 0))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.server.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(1 << 16):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def wait_for(
    condition,
    timeout: float,
    what: str,
    proc: Process | None = None,
    every: float = 0.5,
    growth: float = 1.0,
    longest: float = 10.0,
) -> None:
    """Look at `condition` every `every` seconds, each pause `growth` times the last (up to
    `longest`): a look that costs CPU (a CLI call) is spaced out when the wait is long."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and not proc.alive():
            raise AssertionError(f"{what}: process exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
        time.sleep(every)
        every = min(every * growth, max(every, longest))
    raise AssertionError(f"{what}: not within {timeout:.0f} s" + (f"\n{proc.text()[-3000:]}" if proc else ""))
