"""What secure aggregation costs: writes benchmarks/secagg_cost.json and benchmarks/secagg-cost.md.

    .venv/bin/python -m benchmarks.secagg_cost                  # 3 and 10 sites, Flower's Ray simulation
    .venv/bin/python -m benchmarks.secagg_cost --sites 3        # one federation size
    .venv/bin/python -m benchmarks.secagg_cost --engine lean    # the in-process engine instead of Ray
    PATH=$PATH:/usr/sbin .venv/bin/python -m benchmarks.secagg_cost --engine pilot   # the real pilot on loopback
    .venv/bin/python -m benchmarks.secagg_cost --engine pilot --dry-run   # what it would run, starting nothing
    .venv/bin/python -m benchmarks.secagg_cost --report-only    # the markdown again from the JSON

FusedSpaceFed (the project's default method: decoder and classifier shared) on a small
synthetic BloodMNIST (core of tests/conftest.py's `write_fake_medmnist`: 40 training images
per site, so the round is dominated by the protocol, not by training), iid, 1 local epoch,
2 rounds, CPU, one thread; once with plain aggregation, once with `secure-aggregation = true`
(every other setting at its default: all sites are neighbours, threshold 0.5). Reported per
federation size: seconds per round (mean of the rounds' `round_seconds`, which include the
evaluation messages) and the bytes each site uploads per round (`upload_bytes`: the arrays of
its replies; for secure aggregation, the public keys, ciphertexts, masked vector and shares of
all four stages). Timings are of the machine the script ran on (said in the report).

`--engine pilot` runs the same run config in the pilot on 127.0.0.1, brought up by
benchmarks/pilot_scale.py's `bring_up` through the pilot's own scripts (tests/pilot_harness.py):
a TLS SuperLink with its SQLite database, SuperNode authentication, one SuperNode per site with
its warm site worker, the synthetic data split iid into one file per site; a fresh federation
for every row, so each pays the same start-up; `min-replies` = the number of sites. Seconds per
round are the run folder's own `round_seconds` (metrics.jsonl), as for the simulations; no
SuperNode is started once less than pilot_scale's MEMORY_RESERVE_GB of memory is available.

The JSON keeps every engine's rows: a call replaces only the rows of its engine and federation
sizes (so the simulation rows survive a pilot run and the other way round).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "benchmarks" / "secagg_cost.json"
OUT_MD = ROOT / "benchmarks" / "secagg-cost.md"
ROUNDS = 2
TRAIN_PER_SITE = 40
ENGINES = ("ray", "lean", "pilot")
PILOT_RUN_TIMEOUT = 3600.0  # seconds a pilot run may take before it counts as failed
SECURE_NAME = {False: "plain", True: "SecAgg+"}


def plan(sites: str) -> list[tuple[int, bool]]:
    """(sites, secure) of every run `--sites` asks for, plain before secure; ValueError for a
    size secure aggregation refuses (core.config.MIN_SECURE_SITES)."""
    from core.config import MIN_SECURE_SITES

    sizes = [int(s) for s in sites.split(",") if s.strip()]
    if not sizes or any(n < MIN_SECURE_SITES for n in sizes):
        raise ValueError(
            f"--sites {sites!r}: secure aggregation needs at least {MIN_SECURE_SITES} sites per federation"
        )
    return [(n, secure) for n in sizes for secure in (False, True)]


def run_config(work: Path, num_sites: int, secure: bool, results_dir: Path) -> dict[str, Any]:
    """The benchmark's run config (every engine's), its synthetic data written under `work`."""
    sys.path.insert(0, str(ROOT))
    from core.methods import DEFAULT_METHOD
    from tests.conftest import tiny_blood_run, write_fake_medmnist

    data = work / f"data-{num_sites}"
    if not data.exists():
        write_fake_medmnist(data, "bloodmnist", sizes=(TRAIN_PER_SITE * num_sites, 30, 60))
    return tiny_blood_run(
        data,
        DEFAULT_METHOD,
        **{
            "partition": "iid",
            "num-server-rounds": ROUNDS,
            "run-name": f"{'secure' if secure else 'plain'}-{num_sites}",
            "results-dir": str(results_dir),
            "secure-aggregation": secure,
            # the recipe's warm-up minimum, as when the committed rows were measured (the tests'
            # tiny config leaves it out since)
            "warmup-min-steps": 100,
        },
    )


def figures(run_dir: Path) -> dict[str, Any]:
    """What the report shows of one run, from its run folder's rows (None where it has none)."""
    rows = RunFolder(run_dir).rows()
    return {
        "rounds": len(rows),
        "round_seconds": [r["round_seconds"] for r in rows],
        "seconds_per_round": sum(r["round_seconds"] for r in rows) / len(rows) if rows else None,
        "upload_bytes_per_site": sum(r["upload_bytes"] for r in rows) / len(rows) if rows else None,
        "num_replies": [r["num_replies"] for r in rows],
        "failed_sites": sum(len(r["failed_sites"]) for r in rows),
        "final_acc": rows[-1].get("global_acc_mean") if rows else None,
    }


def run_one(work: Path, num_sites: int, secure: bool, engine: str) -> dict[str, Any]:
    config = run_config(work, num_sites, secure, work / "results")
    started = time.time()
    if engine == "lean":
        from benchmarks.lean import run_lean

        run_lean(config, num_sites)
    else:
        from flwr.simulation import run_simulation

        import client_app.app as client
        from server_app.app import create_server_app

        run_simulation(
            server_app=create_server_app(config),
            client_app=client.app,
            num_supernodes=num_sites,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
        )
    wall = time.time() - started
    return {
        "sites": num_sites,
        "secure": secure,
        "engine": engine,
        **figures(work / "results" / config["run-name"]),
        "wall_seconds": wall,
    }


def run_pilot(work: Path, num_sites: int, secure: bool, keep: Path | None = None) -> dict[str, Any]:
    """One run in a fresh loopback pilot of `num_sites` SuperNodes with warm workers; the
    figures so far and an `error` when it fails. `keep`: leave the pilot's folder (logs) there."""
    import psutil

    from benchmarks.pilot_scale import MEMORY_RESERVE_GB, bring_up
    from tests.pilot_harness import Pilot

    root = Path(tempfile.mkdtemp(prefix=f"secagg-pilot-{num_sites}-", dir=keep))
    pilot = Pilot(root)
    row: dict[str, Any] = {
        "sites": num_sites,
        "secure": secure,
        "engine": "pilot",
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "memory_reserve_gb": MEMORY_RESERVE_GB,
    }
    config = run_config(work, num_sites, secure, pilot.results)
    config.update({"min-replies": num_sites, "round-timeout": 1800.0})
    try:
        bring_up(pilot, num_sites, "bloodmnist", Path(config["data-root"]), worker=True, into=row)
        row["available_memory_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
        started = time.time()
        row["status"] = pilot.wait_for_run(pilot.submit(config), PILOT_RUN_TIMEOUT)
        row["wall_seconds"] = time.time() - started
        if row["status"] != "finished:completed":
            row["error"] = f"run status {row['status']}"
    except Exception as exc:  # the figures so far, and why it stopped
        row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    finally:
        pilot.stop_all()
        row.update(figures(pilot.results / config["run-name"]))
        row["load_after"] = [round(x, 2) for x in os.getloadavg()]
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            row["pilot_folder"] = str(root)
    return row


ENGINE_TITLE = {
    "ray": "Flower's Ray simulation",
    "lean": "the in-process engine (benchmarks/lean.py)",
    "pilot": "the pilot on loopback",
}
PILOT_NOTE = (
    "A real deployment on 127.0.0.1 through the pilot's own scripts: TLS SuperLink with its SQLite "
    "database, SuperNode authentication, one SuperNode per site with its warm site worker (`--engine "
    "pilot`; a fresh federation per row). Seconds per round are the run folder's `round_seconds` "
    "(metrics.jsonl, the ServerApp's clock), as for the simulations; every site evaluates on its own "
    "data each round (in simulation the server evaluates the global model once). Load is the machine's "
    "1/5/15-minute load average before and after the row (the pilot's own processes included); one core was "
    "busy with other work. SuperNodes "
    "stop being added below {reserve} GB of available memory."
)


def _ratio(value: float | None, base: float | None, digits: int) -> str:
    return f"{value / base:.{digits}f}" if value is not None and base else "-"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def engine_section(engine: str, runs: list[dict[str, Any]]) -> list[str]:
    """One engine's table: its rows, each against plain aggregation at the same size."""
    dates = sorted({str(r.get("date")) for r in runs})
    machines = sorted({str(r.get("machine")) for r in runs})
    pilot = engine == "pilot"
    lines = [f"## {ENGINE_TITLE.get(engine, engine)} (`--engine {engine}`)", ""]
    lines.append(f"Measured on {', '.join(machines)}, {', '.join(dates)}.")
    if pilot:
        reserve = runs[0].get("memory_reserve_gb", "-")
        lines += ["", PILOT_NOTE.format(reserve=reserve)]
    header = "| sites | aggregation | s / round | upload bytes / site / round | x plain (time) | x plain (bytes) | "
    header += "replies per round | failed |"
    rule = "|---:|---|---:|---:|---:|---:|---|---:|"
    if pilot:
        header += " round seconds | s to all online | load before | load after |"
        rule += "---|---:|---|---|"
    lines += ["", header, rule]
    plain = {r["sites"]: r for r in runs if not r["secure"]}
    errors = []
    for r in sorted(runs, key=lambda r: (r["sites"], r["secure"])):
        base = plain.get(r["sites"], {})
        line = (
            f"| {r['sites']} | {SECURE_NAME[r['secure']]} | {_number(r['seconds_per_round'], '.2f')} | "
            f"{_number(r['upload_bytes_per_site'], ',.0f')} | "
            f"{_ratio(r['seconds_per_round'], base.get('seconds_per_round'), 2)} | "
            f"{_ratio(r['upload_bytes_per_site'], base.get('upload_bytes_per_site'), 3)} | "
            f"{r['num_replies']} | {r['failed_sites']} |"
        )
        if pilot:
            load = ("/".join(f"{x:.2f}" for x in r.get(k, [])) or "-" for k in ("load_before", "load_after"))
            line += (
                f" {', '.join(f'{x:.1f}' for x in r.get('round_seconds', [])) or '-'} | "
                f"{_number(r.get('seconds_to_all_online'), '.1f')} | {next(load)} | {next(load)} |"
            )
        lines.append(line)
        if r.get("error"):
            errors.append(f"- {r['sites']} sites, {SECURE_NAME[r['secure']]}: {r['error'].splitlines()[0][:300]}")
    if errors:
        lines += ["", "Failed:", *errors]
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    """benchmarks/secagg-cost.md: one table per engine in `result["runs"]`."""
    runs = result["runs"]
    lines = [
        "# What secure aggregation costs",
        "",
        "Written by `benchmarks/secagg_cost.py` (raw figures: `benchmarks/secagg_cost.json`). FusedSpaceFed, "
        f"synthetic BloodMNIST ({TRAIN_PER_SITE} training images per site), iid, 1 local epoch, {ROUNDS} rounds, "
        "CPU, 1 thread per site; seconds per round include the evaluation messages; bytes are what one site "
        "uploads per round (arrays of its replies).",
        "",
    ]
    engines = sorted({r["engine"] for r in runs}, key=lambda e: (ENGINES.index(e) if e in ENGINES else len(ENGINES), e))
    for engine in engines:
        lines += engine_section(engine, [r for r in runs if r["engine"] == engine])
    lines += [
        "Secure aggregation adds three exchanges per round (share keys, masked input, unmask). A site's "
        "upload is then one uint32 per shared floating-point value plus one (the weight factor) instead of "
        "its float32 arrays, plus per neighbour a ciphertext of its shares and, at unmasking, a share "
        "per neighbour: so the bytes grow with the number of sites (all are neighbours by default; "
        "`secagg-neighbours` bounds that), and the time by the extra round trips and the masks (one "
        "AES-CTR keystream per neighbour and the site's own seed). In the pilot each extra exchange is a "
        "message round trip through the SuperLink with a fresh ClientApp process per site handing it to "
        "the warm worker, which costs far more time than a message in simulation (the run folder's "
        "timeline.jsonl shows where). The machine was shared with other work when this ran: compare the "
        "rows with each other, not with other tables.",
        "",
    ]
    return "\n".join(lines)


def _key(run: dict[str, Any]) -> tuple[str, int, bool]:
    return run["engine"], run["sites"], run["secure"]


def merged(old: dict[str, Any], new_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's JSON: `old`'s rows of every engine, but those a new row replaces (same
    engine, sites and aggregation), and the new rows. Reads the one-engine layout of the
    first version too (its date and machine at the top)."""
    shared = {k: old[k] for k in ("date", "machine") if k in old}
    kept = [{**shared, **r} for r in old.get("runs", []) if _key(r) not in {_key(n) for n in new_runs}]
    runs = sorted(
        kept + new_runs, key=lambda r: (ENGINES.index(r["engine"]) if r["engine"] in ENGINES else 9, *_key(r))
    )
    return {"runs": runs}


def write_report(new_runs: list[dict[str, Any]], out_json: Path = OUT_JSON, out_md: Path = OUT_MD) -> dict[str, Any]:
    """Merge `new_runs` into `out_json` (keeping the other rows) and write `out_md` from it."""
    old = json.loads(out_json.read_text()) if out_json.exists() else {}
    result = merged(old, new_runs)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    out_md.write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="3,10", help="comma-separated federation sizes (at least 3 each)")
    parser.add_argument("--engine", choices=ENGINES, default="ray")
    parser.add_argument("--keep", type=Path, help="pilot: leave each pilot's folder (its logs) under this folder")
    parser.add_argument("--dry-run", action="store_true", help="print the runs it would make; start nothing")
    parser.add_argument("--report-only", action="store_true", help="write the markdown again from the JSON")
    parser.add_argument("--json", type=Path, default=OUT_JSON, help=argparse.SUPPRESS)
    parser.add_argument("--md", type=Path, default=OUT_MD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report_only:
        write_report([], args.json, args.md)
        return 0
    try:
        runs_planned = plan(args.sites)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        for num_sites, secure in runs_planned:
            print(f"{args.engine}: {num_sites} sites, {SECURE_NAME[secure]}, {ROUNDS} rounds")
        if args.engine == "pilot":
            from benchmarks.pilot_scale import MEMORY_RESERVE_GB

            print(
                f"pilot: a fresh loopback federation per run; no SuperNode started below {MEMORY_RESERVE_GB} GB available"
            )
        return 0
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="secagg-cost-"))
    stamp = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)"}
    runs: list[dict[str, Any]] = []
    try:
        for num_sites, secure in runs_planned:
            stamp["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            if args.engine == "pilot":
                run = run_pilot(work, num_sites, secure, args.keep)
            else:
                run = run_one(work, num_sites, secure, args.engine)
            runs.append({**run, **stamp})
            print(json.dumps(runs[-1]), flush=True)
            write_report(runs, args.json, args.md)  # after every row: a later failure keeps the earlier ones
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(args.md.read_text())
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
