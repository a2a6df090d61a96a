"""How many simulated sites one machine holds: FusedSpaceFed over N sites (bloodmnist split
iid, `fraction-train` 0.1, the final model evaluated by 10 sites) in the lean engine
(benchmarks/lean.py, one process) and in Flower's Ray simulation (the driver plus Ray's
processes), each run in a child process (the sweep's child mode) watched from outside
(benchmarks.performance.run_child).

    .venv/bin/python -m benchmarks.site_scale --sites 100,300,1000 --engines lean,flower --rounds 2 \\
        --out benchmarks/site_scale.json

Per run: seconds per round (metrics.jsonl), the peak over time of the child's process
tree (RSS summed, and PSS summed: RSS counts memory that Ray's processes share once per
process, PSS splits it), the PSS of each part of the tree at that peak, and the sites'
private-state files on disk (what each site keeps between rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.sweep import ENGINES
from core.methods import DEFAULT_METHOD
from core.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"


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


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One run in a child process (the sweep's child mode), its process tree sampled by
    benchmarks.performance.run_child; its figures, or the child's error."""
    from benchmarks.performance import run_child

    with tempfile.TemporaryDirectory(prefix="site-scale-") as tmp:
        config = run_config(
            spec["sites"],
            spec["rounds"],
            Path(tmp),
            spec["method"],
            spec["dataset"],
            spec["fraction"],
            spec["evaluate_sites"],
        )
        payload = {"run_config": config, "sites": spec["sites"], "cpus_per_site": 1.0, "engine": spec["engine"]}
        try:
            info = run_child(payload, sample_memory=True)
        except RuntimeError as exc:
            return {**spec, "error": str(exc)[-2000:]}
        rows = RunFolder(Path(tmp) / "scale").rows()
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file() and "site-state" in p.parts)
    mb = 2**20
    return {
        **spec,
        "wall_seconds": round(info["wall_s"], 1),
        "round_seconds": [round(r["round_seconds"], 2) for r in rows],
        "num_replies": [r["num_replies"] for r in rows],
        "num_evaluated": rows[-1].get("num_evaluated"),
        "tree_peak_rss_mb": round(info["peak_rss_bytes"] / mb),
        "tree_peak_pss_mb": round(info["peak_pss_bytes"] / mb),
        "tree_most_processes": info["peak_procs"],
        "tree_pss_at_peak_by_part_mb": {k: round(v / mb) for k, v in info["pss_by_part_at_peak_bytes"].items()},
        "site_state_disk_mb": round(disk / mb, 2),
    }


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
    args = parser.parse_args()
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
