"""What a round costs, and where its time goes: writes benchmarks/round_cost.json and
the round-cost section of benchmarks/PERFORMANCE.md.

    .venv/bin/python -m benchmarks.round_cost                      # pilot + simulation + blood
    .venv/bin/python -m benchmarks.round_cost --only pilot --label before-worker --no-worker

The small config (issue 9): breastmnist split over 3 sites, local-epochs 1, warmup-epochs 1,
batch-size 64, warmup-min-steps 0 (as when its figures were measured), measure-gamma false,
num-threads 1, device cpu, 4 rounds, FusedSpaceFed.
- `pilot`: a loopback deployment with the pilot's own scripts (TLS, SuperNode
  authentication, SQLite database, one SuperNode per site; the warm site worker unless
  `--no-worker`), through tests/pilot_harness.py.
- `simulation`: the same run config with `flwr run .` on the local simulation (3 virtual sites).
- `blood`: FedAvg on BloodMNIST, 10 sites, 3 local epochs, evaluation every round, simulation.

Runs with this checkout's code; to measure an older commit, copy this file into a worktree
of it and run it there with `--label` (the figures are merged into the same JSON; an
older commit writes no timeline.jsonl, so it gives round seconds only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from core.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medmnist"
OUT = ROOT / "benchmarks" / "round_cost.json"


def small_config() -> dict[str, Any]:
    """The pilot tests' small run (tests/pilot_harness.py), FusedSpaceFed, 4 rounds."""
    sys.path.insert(0, str(ROOT))
    from tests.pilot_harness import SMALL_RUN

    return {**SMALL_RUN, "method": "fusedspacefed", "num-server-rounds": 4}


BLOOD = {
    "method": "fedavg",
    "dataset": "bloodmnist",
    "download": False,
    "local-epochs": 3,
    "warmup-epochs": 1,
    "batch-size": 256,
    "num-threads": 1,
    "device": "cpu",
    "eval-every": 1,
}
# the phases of one message, from the server's push to its pull of the reply
PHASES = [
    ("server push", "push_start", "push_done"),
    ("node pickup + process start", "push_done", "process_start"),
    ("runtime start (Python, Flower, app bundle)", "process_start", "import_start"),
    ("app imports (thin ClientApp)", "import_start", "app_loaded"),
    ("site imports (torch, data, models) / worker hand-off", "app_loaded", "handler_start"),
    ("data load", "handler_start", "data_loaded"),
    ("model build + private state load", "data_loaded", "model_built"),
    ("evaluation of the received model", "model_built", "evaluated"),
    ("local work (warm-up + training)", "evaluated", "trained"),
    ("state save", "trained", "state_saved"),
    ("reply build", "state_saved", "reply_ready"),
    ("reply push + server pull", "reply_ready", "pulled"),
]


# with a warm worker or a Ray actor that served earlier messages, the marks of that process
# (its start, its imports) lie before the round; those phases become one: from the push to
# the handler starting (SuperNode pickup, ClientApp process and hand-off; or Ray's delivery)
WORKER_MERGED = {name for name, _, _ in PHASES[1:5]}
WORKER_PHASE = "delivery to a warm process (pickup, hand-off or Ray dispatch)"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    return RunFolder(run_dir).rows()


def timeline_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "timeline.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def phase_table(timeline: list[dict[str, Any]], server_round: int) -> dict[str, Any]:
    """Median seconds of each phase over the sites' train messages of one round (app-side
    marks may be missing in a process-per-message app's first phases: then None)."""
    lines = [t for t in timeline if t["round"] == server_round and t["phase"] == "train"]
    out: dict[str, Any] = {"round": server_round, "sites": len(lines), "phases": {}}
    for name, start, end in PHASES:
        spans = [
            t[end] - t[start]
            for t in lines
            if t.get(start) is not None and t.get(end) is not None and not (_warm(t) and name in WORKER_MERGED)
        ]
        out["phases"][name] = round(median(spans), 3) if spans else None
    via_worker = [t["handler_start"] - t["push_done"] for t in lines if _warm(t) and t.get("handler_start")]
    if via_worker:  # a warm worker's own process and imports happened before the run
        out["phases"][WORKER_PHASE] = round(median(via_worker), 3)
    if lines:
        out["push_to_last_pull"] = round(max(t["pulled"] for t in lines) - lines[0]["push_start"], 3)
        out["fresh_process"] = sum(t.get("fresh", 0) for t in lines)
        out["via_worker"] = sum(t.get("worker", 0) for t in lines)
    return out


def _warm(mark: dict[str, Any]) -> bool:
    return bool(mark.get("worker")) or not mark.get("fresh", 1)


def summarise(rows: list[dict[str, Any]], timeline: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [round(r["round_seconds"], 2) for r in rows]
    steady = seconds[1:] or seconds
    summary: dict[str, Any] = {"round_seconds": seconds, "steady_median": round(median(steady), 2) if steady else None}
    if timeline:
        summary["timeline"] = phase_table(timeline, min(2, len(rows)))
    summary["final_acc"] = rows[-1].get("global_acc_mean") if rows else None
    return summary


# -- the three measurements -------------------------------------------------------------


def measure_pilot(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    sys.path.insert(0, str(ROOT))
    from partitions.split import split_dataset
    from tests.pilot_harness import Pilot

    sites = ["hospital-a", "hospital-b", "hospital-c"]
    root = Path(tempfile.mkdtemp(prefix="fsf-rc-"))
    pilot = Pilot(root, superexec_poll=None)  # the pilot scripts' own poll interval
    try:
        pilot.site_files = split_dataset(
            "breastmnist", args.data_root, root / "site-files", num_sites=3, partition="dirichlet-equal", alpha=0.5
        )
        pilot.start_federation(sites, timeout=300, extra=("--no-worker",) if args.no_worker else ())
        superlink = psutil.Process(pilot.superlink.pid)
        idle_start, idle_cpu = time.time(), _tree_cpu(superlink)
        time.sleep(20)  # the SuperLink with three SuperNodes connected and no run: its idle cost
        idle_share = (_tree_cpu(superlink) - idle_cpu) / (time.time() - idle_start)
        cpu_before = _tree_cpu(superlink)
        load = load_average()
        started = time.time()
        run_id = pilot.submit({**small_config(), "results-dir": str(pilot.results), "run-name": "round-cost"})
        status = pilot.wait_for_run(run_id, 3600)
        wall = time.time() - started
        cpu = _tree_cpu(superlink) - cpu_before
        run_dir = pilot.results / "round-cost"
        result = summarise(rows_of(run_dir), timeline_of(run_dir))
        result.update(
            status=status,
            run_wall_s=round(wall, 1),
            superlink_cpu_s=round(cpu, 1),
            superlink_cpu_share=round(cpu / wall, 3),
            superlink_idle_cpu_share=round(idle_share, 3),
            worker=not args.no_worker,
            load_before=load,
            load_after=load_average(),
        )
        return result
    finally:
        pilot.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def _tree_cpu(proc) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:
            continue
    return total


def measure_simulation(args: argparse.Namespace, config: dict[str, Any], sites: int, name: str) -> dict[str, Any]:
    results = Path(tempfile.mkdtemp(prefix="fsf-rc-sim-"))
    run_config = {**config, "data-root": str(args.data_root), "results-dir": str(results), "run-name": name}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    load = load_average()
    started = time.time()
    federation = f"num-supernodes={sites} client-resources-num-cpus={args.sim_cpus:g}"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "simulate.sh"), "--run-config", overrides, "--federation-config", federation],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=7200,
    )
    wall = time.time() - started
    run_dir = results / name
    rows = rows_of(run_dir)
    if proc.returncode != 0 or not rows:
        raise RuntimeError(
            f"simulation {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = summarise(rows, timeline_of(run_dir))
    result.update(
        run_wall_s=round(wall, 1), sites=sites, cpus_per_site=args.sim_cpus, load_before=load, load_after=load_average()
    )
    shutil.rmtree(results, ignore_errors=True)
    return result


# -- report -------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    """The round-cost section of PERFORMANCE.md."""
    lines = [
        "## (d) What a round costs (issue 9)",
        "",
        "Generated by `.venv/bin/python -m benchmarks.round_cost` (raw numbers: `benchmarks/round_cost.json`).",
        "Small config: breastmnist over 3 sites (dirichlet-equal alpha 0.5), FusedSpaceFed, 1 local epoch, 1 warm-up",
        "epoch, batch 64, Gamma off, 1 torch thread, CPU, 4 rounds. `pilot` = loopback deployment with the pilot's",
        "scripts (TLS, SuperNode authentication, SQLite database). Steady = median of rounds 2-4.",
        "",
        "| label | measurement | seconds per round | steady median | SuperLink CPU share | load before |",
        "|---|---|---|---|---|---|",
    ]
    for label, entry in data.get("runs", {}).items():
        for mode, result in entry.items():
            if not isinstance(result, dict) or "round_seconds" not in result:
                continue
            share = result.get("superlink_cpu_share")
            lines.append(
                f"| {label} | {mode} | {', '.join(f'{s:.1f}' for s in result['round_seconds'])} | "
                f"**{result['steady_median']:.1f}** | {'' if share is None else f'{share:.2f} core'} | "
                f"{', '.join(map(str, result.get('load_before', [])))} |"
            )
    timelines = [
        (label, mode, result["timeline"])
        for label, entry in data.get("runs", {}).items()
        for mode, result in entry.items()
        if isinstance(result, dict) and result.get("timeline")
    ]
    for label, mode, timeline in timelines:
        lines += [
            "",
            f"### Timeline of round {timeline['round']}: {label}, {mode}",
            "",
            f"Median over the {timeline['sites']} sites' train messages (seconds); push to last reply "
            f"{timeline.get('push_to_last_pull', 0):.2f} s; messages served by a warm worker: "
            f"{timeline.get('via_worker', 0):.0f}, by a fresh process: {timeline.get('fresh_process', 0):.0f}.",
            "",
            *([timeline["note"], ""] if timeline.get("note") else []),
            "| phase | seconds |",
            "|---|---|",
        ]
        for name, seconds in timeline["phases"].items():
            lines.append(f"| {name} | {'-' if seconds is None else f'{seconds:.3f}'} |")
    kernels = data.get("kernels")
    if kernels:
        lines += [
            "",
            "### Kernels (`.venv/bin/python -m benchmarks.kernels`)",
            "",
            "Images per second on random 28 x 28 x 3 inputs; training at batch 256 (SGD step), evaluation of the "
            "FusedSpaceFed model. The ratio is the variant over the default.",
            "",
            "| what | threads | default img/s | variant | variant img/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for row in kernels["rows"]:
            variant = "channels_last" if "channels_last img/s" in row else "inference_mode"
            lines.append(
                f"| {row['what']} | {row['threads']} | {row['default img/s']} | {variant} | "
                f"{row[variant + ' img/s']} | {row['ratio']} |"
            )
    notes = data.get("notes")
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="pilot,simulation,blood", help="comma list of pilot, simulation, blood")
    p.add_argument("--label", default="after", help="the row label (e.g. before, after)")
    p.add_argument("--no-worker", action="store_true", help="pilot without the warm site worker")
    p.add_argument("--blood-rounds", type=int, default=2)
    p.add_argument("--sim-cpus", type=float, default=1.0, help="simulation client-resources-num-cpus per site")
    p.add_argument("--data-root", default=str(DATA))
    p.add_argument("--out", default=str(OUT), help="the JSON to merge the figures into")
    p.add_argument("--notes", help="a Markdown file appended to the section")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    entry = data["runs"].setdefault(args.label, {})
    for mode in [m.strip() for m in args.only.split(",") if m.strip()]:
        print(f"== {args.label}: {mode}", flush=True)
        if mode == "pilot":
            key = "pilot (process per message)" if args.no_worker else "pilot"
            entry[key] = measure_pilot(args)
        elif mode == "simulation":
            entry[f"simulation ({args.sim_cpus:g} CPU per site)"] = measure_simulation(
                args, small_config(), 3, "round-cost-sim"
            )
        elif mode == "blood":
            entry[f"blood fedavg 10 sites ({args.sim_cpus:g} CPU per site)"] = measure_simulation(
                args, {**BLOOD, "num-server-rounds": args.blood_rounds}, 10, "round-cost-blood"
            )
        else:
            raise SystemExit(f"unknown measurement {mode!r}")
        print(json.dumps(entry, indent=1)[-1500:], flush=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    if args.notes:
        data["notes"] = Path(args.notes).read_text()
        out.write_text(json.dumps(data, indent=1) + "\n")
    if out == OUT:
        subprocess.run([sys.executable, "-m", "benchmarks.performance", "--render-only"], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
