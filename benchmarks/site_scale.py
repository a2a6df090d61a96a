"""Simulated sites at scale in the lean engine (benchmarks/lean.py): FusedSpaceFed on
breastmnist over N sites with fraction-train 0.1, in a child process per N; for each
run the peak RSS, seconds per round (metrics.jsonl), and where memory goes per site:
the site's private arrays kept in its `context.state` and its private-state files on disk.

    .venv/bin/python -m benchmarks.lean_scale --sites 10,100 --out benchmarks/lean_scale.json

Peak RSS comes from the child's own `resource.getrusage` (ru_maxrss); per-site memory is
the difference between runs with different N, divided by the difference in sites.
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


def run_config(sites: int, rounds: int, results: Path, method: str) -> dict[str, Any]:
    return {
        "method": method,
        "dataset": "breastmnist",
        "data-root": str(DATA),
        "download": False,
        "partition": "iid",
        "num-server-rounds": rounds,
        "fraction-train": 0.1,
        "min-replies": max(1, sites // 10),
        "local-epochs": 1,
        "warmup-epochs": 1,
        "batch-size": 32,
        "eval-every": rounds,
        "measure-gamma": False,
        "device": "cpu",
        "num-threads": 1,
        "seed": 0,
        "results-dir": str(results),
        "run-name": f"scale-{method}-n{sites}",
    }


def child(sites: int, rounds: int, results: Path, method: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import psutil
    import torch

    from benchmarks import lean

    proc = psutil.Process()
    rss_start = proc.memory_info().rss
    grids: list[lean.InProcessGrid] = []
    original = lean.InProcessGrid.__post_init__

    def keep(self) -> None:  # remember the grid to look at its sites afterwards
        original(self)
        grids.append(self)

    lean.InProcessGrid.__post_init__ = keep
    started = time.time()
    lean.run_lean(run_config(sites, rounds, results, method), sites)
    wall = time.time() - started
    rows = [json.loads(line) for line in (results / f"scale-{method}-n{sites}" / "metrics.jsonl").open()]
    state_bytes = 0  # private arrays the sites hold in memory (their context.state)
    for context in grids[0].contexts.values():
        for record in context.state.array_records.values():
            state_bytes += sum(array.numpy().nbytes for array in record.values())
    disk = sum(p.stat().st_size for p in results.rglob("*") if p.is_file() and "site-state" in p.parts)
    return {
        "sites": sites,
        "method": method,
        "rounds": rounds,
        "wall_seconds": wall,
        "round_seconds": [round(r["round_seconds"], 2) for r in rows],
        "num_replies": [r["num_replies"] for r in rows],
        "rss_start_mb": rss_start / 2**20,
        "rss_end_mb": proc.memory_info().rss / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "site_state_memory_mb": state_bytes / 2**20,
        "site_state_disk_mb": disk / 2**20,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="10,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "lean_scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(child(spec["sites"], spec["rounds"], Path(spec["results"]), spec["method"])))
        return 0
    results = []
    load = os.getloadavg()
    for n in [int(s) for s in args.sites.split(",")]:
        with tempfile.TemporaryDirectory(prefix="lean-scale-") as tmp:
            spec = json.dumps({"sites": n, "rounds": args.rounds, "results": tmp, "method": args.method})
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.lean_scale", "--child", spec],
                cwd=REPO,
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-3000:], out.stderr[-3000:])
                return 1
            results.append(json.loads(line[len("RESULT ") :]))
            print(json.dumps(results[-1]), flush=True)
    if len(results) >= 2:
        a, b = results[0], results[-1]
        per_site = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["sites"] - a["sites"])
        print(f"peak RSS per extra site: {per_site * 1024:.0f} KiB")
    report = {"load_at_start": load, "load_at_end": os.getloadavg(), "cores": os.cpu_count(), "runs": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
