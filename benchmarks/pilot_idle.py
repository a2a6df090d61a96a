"""What a pilot federation costs while it waits: CPU of every process of a loopback pilot
(tests/pilot_harness.py: the pilot's own scripts, TLS, SuperNode authentication, the warm
site workers) with no run, at each SuperExec poll interval. Writes benchmarks/PILOT-IDLE.md.

    .venv/bin/python -m benchmarks.pilot_idle                       # 0.1 s and 1 s, 2 sites, 60 s
    .venv/bin/python -m benchmarks.pilot_idle --intervals 0.1 0.5 1 --sites 3 --seconds 120
    .venv/bin/python -m benchmarks.pilot_idle --intervals scripts   # each script's own default

`FLWR_SUPEREXEC_TASK_POLL_INTERVAL` set for every process, or `scripts`: each start script's
default (the sites' SuperExecs 0.1 s, to save up to a second a message; the SuperLink's 1 s,
Flower's default). The tests use 1 s everywhere (tests/pilot_harness.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.performance import DATA, ROOT, machine

OUT = ROOT / "benchmarks" / "PILOT-IDLE.md"


def tree_cpu(pids: list[int]) -> dict[str, float]:
    """CPU-s (user + system) of each process under `pids`, keyed by pid and its command."""
    import psutil

    cpu: dict[str, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                times = proc.cpu_times()
                args = proc.cmdline()
            except psutil.Error:
                continue
            program = next(
                (Path(a).name for a in args if "flower-" in a or a.startswith("pilot.") or a.startswith("client_app.")),
                None,
            )
            name = program or (Path(args[0]).name if args else "?")
            cpu[f"{proc.pid} {name}"] = times.user + times.system
    return cpu


def idle_cost(interval: str, sites: int, seconds: float) -> dict:
    from partitions.split import split_dataset
    from tests.pilot_harness import Pilot

    root = Path(tempfile.mkdtemp(prefix="fsf-idle-"))
    pilot = Pilot(root, superexec_poll=None if interval == "scripts" else interval)
    names = [f"hospital-{chr(97 + i)}" for i in range(sites)]
    try:
        pilot.site_files = split_dataset(
            "breastmnist", DATA, root / "site-files", num_sites=sites, partition="iid", show=False
        )
        pilot.start_federation(names, timeout=300)
        time.sleep(10)  # start-up settles
        pids = [p.popen.pid for p in pilot.processes]
        before = tree_cpu(pids)
        time.sleep(seconds)
        after = tree_cpu(pids)
    finally:
        pilot.stop_all()
    spent: dict[str, float] = {}
    for key, value in after.items():
        program = key.split(" ", 1)[1]
        spent[program] = spent.get(program, 0.0) + value - before.get(key, 0.0)
    total = sum(spent.values())
    return {"interval": interval, "cpu_s": total, "core_share": total / seconds, "by_program": spent}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--intervals", nargs="+", default=["0.1", "1.0", "scripts"], help="SuperExec poll intervals (s), or 'scripts'"
    )
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle time measured at each interval")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = []
    for interval in args.intervals:
        print(f"poll {interval}: starting {args.sites} sites, then {args.seconds:.0f} s idle", flush=True)
        rows.append(idle_cost(interval, args.sites, args.seconds))
        print(f"  {rows[-1]['cpu_s']:.2f} CPU-s ({100 * rows[-1]['core_share']:.1f} % of a core)", flush=True)
    info = machine()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# A pilot federation's cost while it waits",
        "",
        f"`python -m benchmarks.pilot_idle --intervals {' '.join(args.intervals)} --sites {args.sites} "
        f"--seconds {args.seconds:.0f}` on {when}: {info['cpu']}, {info['logical_cores']} cores, flwr {info['flwr']}, "
        f"Python {info['python']}; load average at the end {' '.join(f'{x:.2f}' for x in info['load_average'])}.",
        "",
        f"A loopback pilot (SuperLink, {args.sites} SuperNodes with their SuperExecs and warm site workers, TLS and "
        "SuperNode authentication) with no run, measured over the idle time after every SuperNode is online.",
        "",
        "| SuperExec poll (s) | CPU-s | share of a core | by program (CPU-s) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        parts = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(row["by_program"].items(), key=lambda kv: -kv[1]) if v >= 0.05
        )
        lines.append(f"| {row['interval']} | {row['cpu_s']:.2f} | {100 * row['core_share']:.1f} % | {parts} |")
    lines += [
        "",
        "`scripts`: each start script's own default: the sites' SuperExecs poll every 0.1 s (a message waits up to "
        "0.1 s for its process, not up to 1 s), the SuperLink's every second (a run starts up to a second after it "
        "is submitted). The tests use Flower's 1 s everywhere (tests/pilot_harness.py): they keep federations up "
        "for many minutes.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
