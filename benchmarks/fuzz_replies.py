"""The hostile-peer fuzz run (issue 25): the targets of tests/fuzz_harness.py, each for many
cases, and a report of what was run and what was found.

    python -m benchmarks.fuzz_replies --cases 20000 --targets unpack,frame
    python -m benchmarks.fuzz_replies --cases 300 --targets round-loop
    python -m benchmarks.fuzz_replies --cases 2000 --targets frame --seconds 600   # chunks for 10 min

Each invocation adds its cases to benchmarks/fuzz_replies.json (per target: cases, seconds,
outcomes, the hypothesis seed of each chunk, anything found) and rewrites
benchmarks/fuzz_replies.md from it, so a long run can be done in chunks. Anything raised
out of a target, a serve_one that does not return, or a peak resident memory over
MEMORY_BOUND_MB is a finding; hypothesis shrinks it and the report keeps the smallest
example. The cases are random (a seed per chunk, in the report); tests/test_fuzz.py runs a
few hundred of the same targets, derandomised: 19 tests in the fast tier, the unpack target,
FedDAF's scenario and the round loop in `make test` (slow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
REPORT_JSON = HERE / "fuzz_replies.json"
REPORT_MD = HERE / "fuzz_replies.md"
MEMORY_BOUND_MB = 4096  # peak resident memory of the whole fuzz process (torch and 18 seed federations included)
TARGETS = ("unpack", "strategy", "frame", "serve", "round-loop")


def _settings(cases: int):
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def run_target(target: str, cases: int, chunk_seed: int, work: Path, until: float | None = None, record=None) -> list:
    """Chunks of `cases` cases of one target, each its own hypothesis run (seed `chunk_seed`,
    then `chunk_seed + 1`, ...): one chunk, or with `until` (epoch seconds) chunk after chunk
    while time is left, stopping at the first finding. The seeds of the target (real replies)
    are built once. Each chunk (its outcomes, seconds and any finding) goes to `record` as it
    ends, and all of them are returned."""
    from client_app import worker
    from tests import fuzz_harness as fh

    setup_started = time.perf_counter()
    if target in ("unpack", "strategy"):
        seeds = {name: fh.seed_round(name, work / name) for name in fh.SCENARIOS}
    if target == "round-loop":
        loop = fh.round_loop(work / "round-loop")
    if target == "serve":
        worker.RECEIVE_TIMEOUT = 0.2  # a client that sends too little is dropped quickly
    setup_seconds = time.perf_counter() - setup_started
    chunks: list[dict] = []
    current: list[Counter[str]] = []  # this chunk's outcomes (the last)
    while True:
        current.append(Counter())
        outcomes = current[-1]

        def one(data) -> None:
            if target == "unpack":
                outcome = fh.unpack_case(data, seeds[data.draw(st.sampled_from(sorted(seeds)))])
            elif target == "strategy":
                scenario = data.draw(st.sampled_from(sorted(seeds)))
                outcome = f"{scenario}: {fh.strategy_case(data, seeds[scenario])}"
            elif target == "frame":
                outcome = fh.frame_case(data)
            elif target == "serve":
                outcome = fh.serve_case(data)
            else:
                outcome = fh.round_loop_case(data, loop)
            current[-1][outcome] += 1

        seed = chunk_seed + len(chunks)
        test = hypothesis_seed(seed)(_settings(cases)(given(st.data())(one)))
        finding = None
        started = time.perf_counter()
        try:
            test()
        except BaseException as exc:  # a finding: hypothesis has shrunk it to its smallest example
            if isinstance(exc, KeyboardInterrupt):
                raise
            finding = "".join(traceback.format_exception(exc))[-6000:]
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if peak_mb > MEMORY_BOUND_MB and finding is None:
            finding = f"peak resident memory {peak_mb:.0f} MB over the bound of {MEMORY_BOUND_MB} MB"
        chunk = {
            "target": target,
            "cases": sum(outcomes.values()),
            "seconds": round(seconds, 1),
            "setup_seconds": round(setup_seconds if not chunks else 0.0, 1),
            "seed": seed,
            "outcomes": dict(sorted(outcomes.items())),
            "peak_rss_mb": round(peak_mb),
            "finding": finding,
        }
        chunks.append(chunk)
        if record is not None:
            record(chunk)
        if finding is not None or until is None or time.time() >= until:
            return chunks


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def load_report() -> dict:
    if REPORT_JSON.exists():
        return json.loads(REPORT_JSON.read_text())
    return {"machine": machine(), "chunks": []}


def summary(report: dict) -> dict[str, dict]:
    totals: dict[str, dict] = {}
    for chunk in report["chunks"]:
        row = totals.setdefault(chunk["target"], {"cases": 0, "seconds": 0.0, "chunks": 0, "findings": 0})
        row["cases"] += chunk["cases"]
        row["seconds"] += chunk["seconds"]
        row["chunks"] += 1
        row["findings"] += chunk["finding"] is not None
    return totals


def write_markdown(report: dict) -> None:
    totals = summary(report)
    m = report["machine"]
    lines = [
        "# Hostile-peer fuzz run (benchmarks/fuzz_replies.py)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (the run uses one, single-threaded, and shares the machine "
        f"with other jobs: load average {m.get('load', '?')} when this report was written), "
        f"Python {m['python']}, {m['platform']}.",
        "",
        "Targets (tests/fuzz_harness.py): `unpack` (core.transport on mutated layouts, buffers and raw "
        "arrays), `strategy` (the exchange's reading, `screen`, `aggregate_train` and `aggregate_evaluate` "
        "of every method and setting in SCENARIOS, one reply of a real round mutated), `frame` (the "
        "worker's `decode` and `Worker.handle`), `serve` (`serve_one` over a socket pair), `round-loop` "
        "(server_app.rounds.FederatedRun: round 2 and the final evaluation of a run prepared once, over "
        "replayed real replies, node 2's mutated).",
        "",
        "| target | cases | seconds (cases only) | cases/s | chunks | findings |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target in TARGETS:
        if target in totals:
            row = totals[target]
            rate = row["cases"] / row["seconds"] if row["seconds"] else float("nan")
            lines.append(
                f"| {target} | {row['cases']:,} | {row['seconds']:.0f} | {rate:.0f} | {row['chunks']} | "
                f"{row['findings']} |"
            )
    total_cases = sum(r["cases"] for r in totals.values())
    lines += ["", f"In all: {total_cases:,} cases.", "", "## Chunks", ""]
    for chunk in report["chunks"]:
        lines.append(
            f"- {chunk['target']}: {chunk['cases']:,} cases in {chunk['seconds']} s (setup {chunk['setup_seconds']} s), "
            f"seed {chunk['seed']}, peak RSS {chunk['peak_rss_mb']} MB; outcomes "
            + ", ".join(f"{k} {v}" for k, v in chunk["outcomes"].items())
        )
    found = [c for c in report["chunks"] if c["finding"]]
    lines += ["", "## Findings", ""]
    if not found:
        lines.append("None: no exception out of a target, no serve_one left running, no peak memory over the bound.")
    for chunk in found:
        lines += [f"### {chunk['target']} (seed {chunk['seed']})", "", "```", chunk["finding"], "```", ""]
    REPORT_MD.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, required=True, help="cases per target in this chunk")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {TARGETS}")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, reported)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="per target: run chunks of --cases cases (seeds --seed, --seed + 1, ...) until this many seconds have passed",
    )
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {TARGETS}")
    report = load_report()
    for target in targets:
        chunk_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)

        def record(chunk: dict) -> None:
            report["chunks"].append(chunk)
            report["machine"] = machine()
            REPORT_JSON.write_text(json.dumps(report, indent=2) + "\n")
            write_markdown(report)
            print(
                f"{chunk['target']}: {chunk['cases']} cases in {chunk['seconds']} s (seed {chunk['seed']}), "
                f"{'FOUND: ' + chunk['finding'].splitlines()[-1] if chunk['finding'] else 'nothing found'}",
                flush=True,
            )

        with tempfile.TemporaryDirectory(prefix="fsf-fuzz-") as work:
            until = None if args.seconds is None else time.time() + args.seconds
            run_target(target, args.cases, chunk_seed, Path(work), until, record)
    return 1 if any(c["finding"] for c in report["chunks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
