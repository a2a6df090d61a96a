"""How many simulated sites one machine holds: FusedSpaceFed over N sites (bloodmnist split
iid, `fraction-train` 0.1, the final model evaluated by 10 sites) in the lean engine (benchmarks/lean.py,
one process) and in Flower's Ray simulation (`run_simulation`, the driver plus Ray's
processes), each run in a child process watched from outside.

    .venv/bin/python -m benchmarks.site_scale --sites 100,300,1000 --engines lean,flower --rounds 2 \\
        --out benchmarks/site_scale.json

Per run: seconds per round (metrics.jsonl), the peak over time of the child's process
tree (RSS summed, and PSS summed: RSS counts memory that Ray's processes share once per
process, PSS splits it), the driver's own peak RSS (ru_maxrss), the RSS after the imports
(the fixed cost), and what each site keeps between rounds: its private arrays (the lean
engine's site contexts) and its private-state files on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.methods import DEFAULT_METHOD

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"
ENGINES = ("lean", "flower")


def run_config(
    sites: int, rounds: int, results: Path, method: str, dataset: str, fraction: float, evaluate_sites: int
) -> dict[str, Any]:
    return {
        "method": method,
        "dataset": dataset,
        "data-root": str(DATA),
        "download": False,
        "partition": "iid",
        "num-server-rounds": rounds,
        "fraction-train": fraction,
        "fraction-evaluate": min(1.0, evaluate_sites / sites),
        "min-replies": max(1, int(sites * fraction)),
        "local-epochs": 1,
        "warmup-epochs": 1,
        "batch-size": 32,
        "eval-every": rounds,
        "measure-gamma": False,
        "device": "cpu",
        "num-threads": 1,
        "seed": 0,
        "track-tensorboard": False,
        "results-dir": str(results),
        "run-name": "scale",
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run in this process (the child); what it measured from inside."""
    import psutil
    import torch

    from benchmarks import lean

    rss_after_imports = psutil.Process().memory_info().rss
    config = run_config(
        spec["sites"],
        spec["rounds"],
        Path(spec["results"]),
        spec["method"],
        spec["dataset"],
        spec["fraction"],
        spec["evaluate_sites"],
    )
    state_bytes = None
    started = time.time()
    if spec["engine"] == "lean":
        grid = lean.InProcessGrid(spec["sites"])
        lean.run_lean(config, spec["sites"], grid)
        state_bytes = sum(  # private arrays the sites hold in memory (their context.state)
            array.numpy().nbytes
            for context in grid.contexts.values()
            for record in context.state.array_records.values()
            for array in record.values()
        )
    else:
        from flwr.simulation import run_simulation

        import client_app.app as client
        from server_app.app import create_server_app

        run_simulation(
            server_app=create_server_app(config),
            client_app=client.app,
            num_supernodes=spec["sites"],
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
        )
    wall = time.time() - started
    rows = [json.loads(line) for line in (Path(spec["results"]) / "scale" / "metrics.jsonl").open()]
    disk = sum(p.stat().st_size for p in Path(spec["results"]).rglob("*") if p.is_file() and "site-state" in p.parts)
    return {
        "wall_seconds": round(wall, 1),
        "round_seconds": [round(r["round_seconds"], 2) for r in rows],
        "num_replies": [r["num_replies"] for r in rows],
        "num_evaluated": rows[-1].get("num_evaluated"),
        "global_acc_mean": rows[-1].get("global_acc_mean"),
        "driver_rss_after_imports_mb": round(rss_after_imports / 2**20),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "site_state_memory_mb": None if state_bytes is None else round(state_bytes / 2**20, 2),
        "site_state_disk_mb": round(disk / 2**20, 2),
        "torch_threads": torch.get_num_threads(),
    }


def watch(popen: subprocess.Popen, every: float = 1.0) -> dict[str, Any]:
    """Sample the child's process tree until it exits: peak summed RSS and PSS, most processes."""
    import psutil

    peak_rss = peak_pss = most = 0
    at_peak: dict[str, float] = {}  # PSS by process name when the tree's PSS peaked
    root = psutil.Process(popen.pid)
    while popen.poll() is None:
        rss = pss = 0
        by_name: dict[str, float] = {}
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for proc in tree:
            try:
                info = proc.memory_full_info()
                name = "driver" if proc.pid == root.pid else proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            by_name[name] = by_name.get(name, 0) + getattr(info, "pss", info.rss) / 2**20
        if pss > peak_pss:
            at_peak = {k: round(v) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}
        peak_rss, peak_pss, most = max(peak_rss, rss), max(peak_pss, pss), max(most, len(tree))
        time.sleep(every)
    return {
        "tree_peak_rss_mb": round(peak_rss / 2**20),
        "tree_peak_pss_mb": round(peak_pss / 2**20),
        "tree_most_processes": most,
        "tree_pss_at_peak_by_process_mb": at_peak,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `spec` in a child process; its figures, or the child's error."""
    with tempfile.TemporaryDirectory(prefix="site-scale-") as tmp:
        spec = {**spec, "results": tmp}
        out_path = Path(tmp) / "child.out"
        with open(out_path, "w") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.site_scale", "--child", json.dumps(spec)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"},
            )
            tree = watch(popen)
        text = out_path.read_text(errors="replace")
        line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
        if popen.returncode != 0 or line is None:
            return {**spec, "error": f"exit {popen.returncode}: {text[-2000:]}"}
        return {k: v for k, v in spec.items() if k != "results"} | json.loads(line[len("RESULT ") :]) | tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="100,300,1000", help="comma-separated site counts")
    parser.add_argument("--engines", default="lean,flower", help=f"comma-separated, of {ENGINES}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction-train")
    parser.add_argument(
        "--evaluate-sites",
        type=int,
        default=10,
        help="sites that evaluate the final model (fraction-evaluate = this / sites): each evaluates the "
        "official test and validation sets, several seconds per site on a CPU",
    )
    parser.add_argument("--dataset", default="bloodmnist")
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "site_scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engine(s) {sorted(unknown)}; choose from {ENGINES}")
    report: dict[str, Any] = {"cores": os.cpu_count(), "load_at_start": os.getloadavg(), "runs": []}
    for sites in [int(s) for s in args.sites.split(",")]:
        for engine in engines:
            spec = {
                "engine": engine,
                "sites": sites,
                "rounds": args.rounds,
                "fraction": args.fraction,
                "evaluate_sites": args.evaluate_sites,
                "dataset": args.dataset,
                "method": args.method,
            }
            print(f"{engine} engine, {sites} sites ...", flush=True)
            report["runs"].append(measure(spec))
            print(json.dumps(report["runs"][-1]), flush=True)
            report["load_at_end"] = os.getloadavg()
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # what is done so far survives a stop
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
