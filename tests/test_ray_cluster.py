"""`flwr run .` across a two-node Ray cluster on 127.0.0.1 (the recipe in docs/ray-cluster.md).

A Ray head and a second Ray node, each its own raylet with one CPU, its own temp dir and
its own ports, joined like two machines would be; then scripts/simulate.sh with
RAY_ADDRESS naming the head. With one CPU per node and `client-resources-num-cpus=1`,
Flower's actor pool holds one ClientApp actor per node.

Which node ran each reply, without touching the app: every reply's `timeline` record
carries `process_start`, the start time of the process that ran the ClientApp (from
/proc, in jiffies), and `import_start` (when that process imported the app: tells two
processes apart). While the run goes, a thread records the start time of every process
under each node's `ray start --block` (the raylet and the workers it spawns). A process that
served replies is one of the recorded processes that started in the same jiffy; the test
asserts that every way of matching serving processes to recorded ones (two processes
cannot be one) puts some on the head node and some on the second node.

Nothing here calls `ray stop`: it kills every Ray process on the machine, other sessions'
included. Each node is a `ray start --block` child of this test; SIGTERM makes it stop its
own processes, and what outlives that is killed by PID. The nodes' `--temp-dir` keeps
their address file (`ray_current_cluster`) out of /tmp/ray, so other simulations on this
machine do not join this cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.pilot_harness import free_port, simulate_sh, stop_superlinks

NODES = ("head", "second")


def _started(pid: int) -> float:
    """A process's start time in epoch seconds, computed as client_app.timeline does."""
    with open(f"/proc/{pid}/stat") as stat:
        ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as boot:
        btime = next(int(line.split()[1]) for line in boot if line.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


class RayNode:
    """One `ray start --block` (a raylet with its own temp dir and ports), owned by this test."""

    def __init__(self, name: str, temp_dir: Path, log: Path, args: list[str]) -> None:
        self.name, self.temp_dir, self.log = name, temp_dir, log
        temp_dir.mkdir(parents=True)
        ray = Path(sys.executable).with_name("ray")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        command = [str(ray), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
        command += ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", *args]
        command += [f"{flag}={port}" for flag, port in ports.items()]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """`ray start` writes <temp-dir>/ray_current_cluster once the node is up."""
        deadline = time.monotonic() + timeout
        while not (self.temp_dir / "ray_current_cluster").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Ray {self.name} node did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM: `ray start --block` stops the processes it started; kill what is left by PID."""
        left = self.descendants()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _, alive = psutil.wait_procs(left, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


class ProcessRecorder(threading.Thread):
    """Every 0.2 s: start time -> (node, pid, name) of each process under each Ray node."""

    def __init__(self, nodes: list[RayNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.seen: dict[int, tuple[str, float, str]] = {}  # pid -> (node, start, name)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for node in self.nodes:
                for proc in node.descendants():
                    if proc.pid in self.seen:
                        continue
                    try:
                        self.seen[proc.pid] = (node.name, _started(proc.pid), proc.name())
                    except (OSError, ValueError, psutil.Error):
                        pass
            self.done.wait(0.2)

    def candidates(self, process_start: float) -> list[tuple[int, str]]:
        """(pid, node) of the recorded processes that started in that jiffy."""
        return [(pid, node) for pid, (node, start, _) in self.seen.items() if abs(start - process_start) < 1e-3]

    def placements(self, serving: list[float]) -> set[frozenset[str]]:
        """The node sets of every one-to-one matching of serving processes (by start time) to recorded ones."""
        options = [self.candidates(start) for start in serving]
        return {
            frozenset(node for _, node in match)
            for match in itertools.product(*options)
            if len({pid for pid, _ in match}) == len(match)
        }


@pytest.mark.integration
def test_flwr_run_across_two_ray_nodes(tmp_path, real_data_root):
    base = Path(tempfile.mkdtemp(prefix="fsfray-", dir="/tmp"))  # short: Ray's socket paths are limited
    gcs_port = free_port()
    nodes = [
        RayNode(
            "head",
            base / "n0",
            tmp_path / "ray-head.log",
            ["--head", f"--port={gcs_port}", f"--ray-client-server-port={free_port()}", "--include-dashboard=false"],
        ),
    ]
    control_port, http_port = free_port(), free_port()
    recorder = ProcessRecorder(nodes)
    try:
        nodes[0].wait_ready()
        nodes.append(RayNode("second", base / "n1", tmp_path / "ray-second.log", [f"--address=127.0.0.1:{gcs_port}"]))
        nodes[1].wait_ready()
        recorder.start()

        results = tmp_path / "results"
        run_config = (
            f"dataset='breastmnist' data-root='{real_data_root}' download=false num-server-rounds=1 "
            "local-epochs=1 warmup-epochs=0 batch-size=128 method='fedavg' num-threads=1 device='cpu' "
            f"results-dir='{results}' run-name='ray-cluster' track-tensorboard=false"
        )
        env = {
            **os.environ,
            "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",  # inherited by the local SuperLink and its simulation
        }
        federation_config = "num-supernodes=4 client-resources-num-cpus=1"
        proc = simulate_sh("--run-config", run_config, "--federation-config", federation_config, env=env, timeout=600)
        recorder.done.set()
        recorder.join(5)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]

        run_dir = results / "ray-cluster"
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1]
        assert json.loads((run_dir / "summary.json").read_text())["final"]["round"] == 1

        replies = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
        assert len(replies) == 8  # 4 sites: round 1's train and the final evaluate
        assert len({r["node"] for r in replies}) == 4
        # one entry per process that served replies (import_start tells processes apart)
        serving = {r["import_start"]: r["process_start"] for r in replies}
        placements = recorder.placements(list(serving.values()))
        detail = (replies, recorder.seen)
        assert placements, detail  # every serving process ran under one of the two Ray nodes
        assert placements == {frozenset(NODES)}, detail  # and, however matched, on both of them
    finally:
        recorder.done.set()
        stop_superlinks(control_port)
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(base, ignore_errors=True)
