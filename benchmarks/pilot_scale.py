"""How many real SuperNodes one machine holds: the pilot on loopback (the pilot's own start
scripts, TLS, SuperNode authentication, the SuperLink's database), N SuperNodes each with
its warm site worker, one FusedSpaceFed run over bloodmnist split iid.

    .venv/bin/python -m benchmarks.pilot_scale --supernodes 10,30,50 --out benchmarks/pilot_scale.json

Per N: seconds to bring every SuperNode online, seconds per round, RSS per SuperNode and
per worker (each process tree's RSS: the SuperNode with its ClientApp processes, the
worker), the SuperLink's CPU seconds (its process tree: SuperLink, SuperExec, ServerApp)
over the run and at rest, and the machine's available memory. `--no-worker` measures
SuperNodes without the warm worker (a fresh ClientApp process per message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import mean, median
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"
MEMORY_RESERVE_GB = 4.0  # stop adding SuperNodes below this much available memory (the machine is shared)
sys.path.insert(0, str(REPO))

from core.methods import DEFAULT_METHOD  # noqa: E402
from core.run_folder import RunFolder  # noqa: E402
from tests.pilot_harness import SMALL_RUN  # noqa: E402

# the pilot tests' small run (1 warm-up and 1 local epoch, batch 64), on BloodMNIST
RUN = {**SMALL_RUN, "method": DEFAULT_METHOD, "dataset": "bloodmnist", "track-tensorboard": False}


def tree_of(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mb(procs: list) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except Exception:  # gone meanwhile
            pass
    return total / 2**20


def cpu_seconds(procs: list) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except Exception:
            pass
    return total


class Sampler:
    """Peak RSS of each SuperNode's tree and of each worker, sampled every few seconds."""

    def __init__(self, supernode_pids: list[int], every: float = 3.0) -> None:
        self.pids, self.every = supernode_pids, every
        self.peak_node: dict[int, float] = {}
        self.peak_worker: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def split(self, pid: int) -> tuple[list, list]:
        """(the SuperNode's tree without the worker, the worker's tree)"""
        procs = tree_of(pid)
        worker = [p for p in procs if "client_app.worker" in " ".join(_cmdline(p))]
        worker_tree = [q for w in worker for q in [w, *_children(w)]]
        ids = {q.pid for q in worker_tree}
        return [p for p in procs if p.pid not in ids], worker_tree

    def sample(self) -> None:
        for pid in self.pids:
            node, worker = self.split(pid)
            self.peak_node[pid] = max(self.peak_node.get(pid, 0.0), rss_mb(node))
            self.peak_worker[pid] = max(self.peak_worker.get(pid, 0.0), rss_mb(worker))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)


def _cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:
        return []


def _children(proc) -> list:
    try:
        return proc.children(recursive=True)
    except Exception:
        return []


def bring_up(
    pilot, n: int, dataset: str, data_root: Path, worker: bool = True, into: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`n` SuperNodes (site-000, ...) on `pilot`: the dataset under `data_root` split iid into
    one file per site, certificates and keys, the SuperLink, every site registered, each
    SuperNode started (one at a time with its warm worker, until that worker is ready) and
    all online. Stops with MemoryError once less than MEMORY_RESERVE_GB is available after
    a start. Writes `seconds_to_all_online` (or `started_before_memory_ran_low`) into
    `into`, which it returns; the caller stops the pilot (`pilot.stop_all()`)."""
    import psutil

    from partitions.split import split_dataset
    from tests.pilot_harness import wait_for

    result = {} if into is None else into
    sites = [f"site-{i:03d}" for i in range(n)]
    pilot.site_files = split_dataset(
        dataset, data_root, pilot.root / "site-files", num_sites=n, partition="iid", show=False
    )
    pilot.make_material(sites)
    pilot.start_superlink()
    for site in sites:
        pilot.register(site)
    started = time.time()
    for i, site in enumerate(sites):
        extra = () if worker else ("--no-worker",)
        proc = pilot.start_supernode(site, pilot.site_files[i], retry=5, extra=extra)
        pilot.supernodes[site] = proc
        if worker:  # one at a time: each worker loads PyTorch and the data
            wait_for(lambda proc=proc: "site worker ready" in proc.text(), 300, f"{site}'s worker", proc, every=1)
        available = psutil.virtual_memory().available / 2**30
        if available < MEMORY_RESERVE_GB:
            result["started_before_memory_ran_low"] = i + 1
            raise MemoryError(
                f"{i + 1} SuperNodes started, {available:.1f} GB of memory left (reserve {MEMORY_RESERVE_GB} GB): "
                "not starting more"
            )
    wait_for(lambda: len(pilot.online()) >= n, 300 + 20 * n, f"{n} SuperNodes online", every=5)
    result["seconds_to_all_online"] = round(time.time() - started, 1)
    return result


def measure(n: int, rounds: int, worker: bool, keep: Path | None, idle: bool = False) -> dict[str, Any]:
    """One federation of `n` SuperNodes; with `idle`, only connected (no run): what the
    SuperNodes and the SuperLink cost before any training process exists."""
    import psutil

    from tests.pilot_harness import Pilot

    root = Path(tempfile.mkdtemp(prefix=f"pilot-scale-{n}-", dir=keep))
    pilot = Pilot(root)
    result: dict[str, Any] = {"supernodes": n, "worker": worker, "rounds": 0 if idle else rounds}
    try:
        bring_up(pilot, n, "bloodmnist", DATA, worker=worker, into=result)
        sampler = Sampler([p.pid for p in pilot.supernodes.values()])
        sampler.sample()
        result["rss_idle_supernode_mb"] = round(mean(sampler.peak_node.values()), 1)
        result["rss_idle_worker_mb"] = round(mean(sampler.peak_worker.values()), 1)
        link = tree_of(pilot.superlink.pid)
        cpu0, t0 = cpu_seconds(link), time.time()
        time.sleep(30)
        result["superlink_cpu_at_rest_percent"] = round(
            100 * (cpu_seconds(tree_of(pilot.superlink.pid)) - cpu0) / (time.time() - t0), 1
        )
        result["superlink_rss_at_rest_mb"] = round(rss_mb(tree_of(pilot.superlink.pid)), 1)
        result["available_memory_at_rest_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
        if idle:
            return result
        sampler.thread.start()
        cpu0, t0 = cpu_seconds(tree_of(pilot.superlink.pid)), time.time()
        config = {
            **RUN,
            "num-server-rounds": rounds,
            "eval-every": rounds,
            "min-replies": n,
            "round-timeout": 1800.0,
            "results-dir": str(pilot.results),
            "run-name": f"scale-{n}",
        }
        run_id = pilot.submit(config)
        status = pilot.wait_for_run(run_id, 3600)
        sampler.stop.set()
        sampler.thread.join()
        elapsed = time.time() - t0
        result["status"] = status
        result["run_seconds"] = round(elapsed, 1)
        result["superlink_cpu_seconds"] = round(cpu_seconds(tree_of(pilot.superlink.pid)) - cpu0, 1)
        result["superlink_cpu_percent"] = round(100 * result["superlink_cpu_seconds"] / elapsed, 1)
        rows = RunFolder(pilot.results / f"scale-{n}").rows()
        result["round_seconds"] = [round(r["round_seconds"], 1) for r in rows]
        result["num_replies"] = [r["num_replies"] for r in rows]
        result["failed_sites"] = sum(len(r.get("failed_sites", [])) for r in rows)
        nodes, workers = list(sampler.peak_node.values()), list(sampler.peak_worker.values())
        result["peak_rss_supernode_mb"] = {"median": round(median(nodes), 1), "max": round(max(nodes), 1)}
        result["peak_rss_worker_mb"] = {"median": round(median(workers), 1), "max": round(max(workers), 1)}
        result["peak_rss_superlink_tree_mb"] = round(rss_mb(tree_of(pilot.superlink.pid)), 1)
        result["available_memory_after_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    except Exception as exc:  # the figures so far, and why it stopped
        result["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        if pilot.supernodes and "rss_idle_supernode_mb" not in result:
            sampler = Sampler([p.pid for p in pilot.supernodes.values()])
            sampler.sample()
            result["rss_idle_supernode_mb"] = round(mean(sampler.peak_node.values()), 1)
            result["rss_idle_worker_mb"] = round(mean(sampler.peak_worker.values()), 1)
    finally:
        pilot.stop_all()
    return result


def main() -> int:
    import psutil

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernodes", default="10,30,50", help="comma-separated SuperNode counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-worker", action="store_true", help="SuperNodes without the warm site worker")
    parser.add_argument(
        "--idle",
        action="store_true",
        help="connect the SuperNodes (without workers) and measure them at rest, without a run: "
        "the SuperNodes' own cost where the training processes would not fit in memory",
    )
    parser.add_argument("--keep", type=Path, help="keep each pilot's folder (logs) under this folder")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "pilot_scale.json")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_at_start": os.getloadavg(),
        "runs": [],
    }
    if args.out.exists():  # add to what an earlier call measured
        report["runs"] = json.loads(args.out.read_text()).get("runs", [])
    for n in [int(s) for s in args.supernodes.split(",")]:
        print(f"{n} SuperNodes ...", flush=True)
        worker = not (args.no_worker or args.idle)
        report["runs"].append(measure(n, args.rounds, worker, args.keep, idle=args.idle))
        report["load_at_end"] = os.getloadavg()
        print(json.dumps(report["runs"][-1]), flush=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
