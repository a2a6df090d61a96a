"""The pilot under network faults: each SuperNode reaches the SuperLink through its own
userspace fault injector (pilot/faulty_link.py); the pilot's start scripts, TLS and
SuperNode authentication as deployed. One federation, one run per case:

- clean: no faults (the reference);
- delay: 100 ms +- 20 ms each way on every link;
- flaky: one site's link stalls (40 s of silence) or resets at random, 5 % of its requests;
- cut: one site cut off after round 1 until round 3's checkpoint (two rounds), then reconnected;
- slow: one site's link limited to 1 MB/s each way;
- superlink-kill: the SuperLink (and its ServerApp) SIGKILLed in round 2, restarted with its
  database, the run submitted again with resume-from = "latest";
and two harsher ones, not run by default (`--cases clean,flaky-heavy,long-cut`):
- flaky-heavy: one site's link stalls or resets 10 % of its requests each;
- long-cut: one site cut off for LONG_CUT seconds after round 1 (past Flower's TLS
  handshake timeout and the SuperLink's heartbeat expiry), then reconnected.

For each case: rounds completed, failed sites, seconds per round against the clean run,
whether the final model and each site's private state equal the clean run's, what the
links did. Writes a JSON (--out) and prints the Markdown tables of docs/RELIABILITY.md.

    .venv/bin/python -m benchmarks.network_faults --out benchmarks/network_faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SITES = ["hospital-a", "hospital-b"]
FAULTY = "hospital-b"  # the site whose link misbehaves in the one-site cases
CASES = ["clean", "delay", "flaky", "cut", "slow", "superlink-kill"]
HARSH_CASES = ["flaky-heavy", "long-cut"]
LONG_CUT = 150.0  # seconds


def submit(pilot, config: dict[str, Any], tries: int = 3) -> int:
    """`flwr run` (the harness's submit), again after a reply without a run id (seen once
    under load); the reply is in the error otherwise."""
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    for attempt in range(tries):
        reply = pilot.flwr("run", str(REPO), "pilot", "--run-config", overrides, timeout=180)
        if "run-id" in reply:
            return int(reply["run-id"])
        print(f"flwr run answered without a run id (attempt {attempt + 1}): {reply}", flush=True)
        time.sleep(5)
    raise AssertionError(f"flwr run failed {tries} times: {reply}")


def run_case(pilot, links, case: str, base: dict[str, Any], timeout: float) -> dict[str, Any]:
    from pilot.faulty_link import Faults
    from tests import fault_harness as fh

    for i, site in enumerate(SITES):
        links[site].faults = Faults(seed=i)
    if case == "delay":
        for i, site in enumerate(SITES):
            links[site].faults = Faults(delay=0.1, jitter=0.02, seed=i)
    elif case == "flaky":
        links[FAULTY].faults = Faults(stall_p=0.025, reset_p=0.025, stall_seconds=40.0, seed=7)
    elif case == "flaky-heavy":
        links[FAULTY].faults = Faults(stall_p=0.1, reset_p=0.1, stall_seconds=40.0, seed=7)
    elif case == "slow":
        links[FAULTY].faults = Faults(rate=1_000_000)
    before = {site: links[site].stats.as_dict() for site in SITES}
    log_offset = {site: len(pilot.supernodes[site].text()) for site in SITES}
    config = {**base, "run-name": case}
    record: dict[str, Any] = {"case": case, "events": []}
    started = time.time()
    run_id = submit(pilot, config)
    if case == "cut":
        fh.wait_checkpoint(pilot, case, 1, timeout)
        links[FAULTY].cut()
        record["events"].append(f"{time.time() - started:.0f} s: {FAULTY} cut off after round 1")
        fh.wait_checkpoint(pilot, case, 3, timeout)
        links[FAULTY].restore()
        restored = time.time()
        record["events"].append(f"{restored - started:.0f} s: {FAULTY} reconnected after round 3")
        back = fh.wait_all_online(pilot, 300)
        record["events"].append(f"{FAULTY} online again {back:.0f} s after the link came back")
    if case == "long-cut":
        fh.wait_checkpoint(pilot, case, 1, timeout)
        links[FAULTY].cut()
        record["events"].append(f"{time.time() - started:.0f} s: {FAULTY} cut off after round 1 for {LONG_CUT:.0f} s")
        time.sleep(LONG_CUT)
        links[FAULTY].restore()
        back = fh.wait_all_online(pilot, 600)
        record["events"].append(f"{FAULTY} online again {back:.0f} s after the link came back")
    if case == "superlink-kill":
        fh.wait_checkpoint(pilot, case, 1, timeout)
        time.sleep(3.0)  # into round 2
        done_before = fh.checkpoint_rounds(pilot, case)
        rows_before = fh.metrics(pilot, case)
        fh.kill_superlink(pilot)
        record["events"].append(
            f"{time.time() - started:.0f} s: SuperLink SIGKILLed (checkpoints {done_before}, "
            f"{len(rows_before)} rounds in metrics.jsonl)"
        )
        record["restart_seconds"] = fh.restart_superlink(pilot)
        record["online_again_seconds"] = fh.wait_all_online(pilot, 300)
        record["events"].append(
            f"SuperLink serving after {record['restart_seconds']:.0f} s, both sites online after "
            f"{record['online_again_seconds']:.0f} s more"
        )
        record["killed_run_status"] = pilot.status(run_id)
        run_id = submit(pilot, {**config, "resume-from": "latest"})
        record["rows_before_kill"] = rows_before
    status = pilot.wait_for_run(run_id, timeout)
    record["status"] = status
    record["wall_seconds"] = time.time() - started
    rows = fh.metrics(pilot, case)
    record["rows"] = rows
    record["rounds_completed"] = len(rows)
    record["round_seconds"] = [round(r["round_seconds"], 1) for r in rows]
    record["failed_sites"] = {r["round"]: r["failed_sites"] for r in rows if r.get("failed_sites")}
    record["failed_eval_sites"] = rows[-1].get("failed_eval_sites", []) if rows else []
    record["num_replies"] = [r["num_replies"] for r in rows]
    record["links"] = {
        site: {k: v - before[site].get(k, 0) for k, v in links[site].stats.as_dict().items()} for site in SITES
    }
    record["private_state"] = {site: fh.private_state(pilot, case, site) for site in SITES}
    record["supernode_restarts"] = {
        site: pilot.supernodes[site].text()[log_offset[site] :].count("SuperNode exited with status") for site in SITES
    }
    record["supernode_give_ups"] = {  # Flower's TLS give-up, stopped by start-supernode.sh
        site: pilot.supernodes[site].text()[log_offset[site] :].count("the SuperNode gave up reconnecting")
        for site in SITES
    }
    record["run_log_tail"] = pilot.logs(run_id)[-3000:]
    return record


def compare(records: dict[str, dict[str, Any]], models: dict[str, Any]) -> None:
    from tests import fault_harness as fh

    clean = records.get("clean")
    if not clean:
        return
    steady = statistics.median(clean["round_seconds"]) if clean["round_seconds"] else None
    for case, rec in records.items():
        rec["model_equals_clean"] = fh.same_model(models.get(case), models.get("clean"))
        rec["private_state_equals_clean"] = {
            site: bool(rec["private_state"][site])
            and rec["private_state"][site][0] == (clean["private_state"][site] or ("",))[0]
            for site in SITES
        }
        med = statistics.median(rec["round_seconds"]) if rec["round_seconds"] else None
        rec["median_round_seconds"] = med
        rec["vs_clean"] = med / steady if med and steady else None
        if case == "superlink-kill" and rec.get("rows_before_kill") is not None:
            kept = rec["rows_before_kill"]
            rec["rounds_before_kill_kept"] = rec["rows"][: len(kept)] == kept
            rec["rounds_listed"] = [r["round"] for r in rec["rows"]]


def tables(records: dict[str, dict[str, Any]], load: str) -> str:
    lines = [
        f"Machine load while measured: {load}.",
        "",
        "| case | status | rounds | replies per round | failed sites (round: site) | s per round (median; each) | vs clean | "
        "final model = clean | private state = clean (a, b) | SuperNode restarts (of them give-ups) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, rec in records.items():
        failed = "; ".join(f"{r}: {', '.join(f.split(':')[0] for f in fs)}" for r, fs in rec["failed_sites"].items())
        vs = f"{rec['vs_clean']:.2f}x" if rec.get("vs_clean") else "-"
        med = f"{rec['median_round_seconds']:.1f}" if rec.get("median_round_seconds") else "-"
        same = rec.get("private_state_equals_clean", {})
        states = ", ".join("yes" if same.get(s) else "no" for s in SITES)
        give_ups = rec.get("supernode_give_ups", {})
        restarts = ", ".join(f"{rec['supernode_restarts'][s]} ({give_ups.get(s, 0)})" for s in SITES)
        lines.append(
            f"| {case} | {rec['status']} | {rec['rounds_completed']} | {rec['num_replies']} | {failed or '-'} | "
            f"{med}; {rec['round_seconds']} | {vs} | {'yes' if rec.get('model_equals_clean') else 'no'} | {states} | "
            f"{restarts} |"
        )
    lines += [
        "",
        "| case | link | requests | stalls | resets | held while cut | MB up | MB down |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, rec in records.items():
        for site in SITES:
            s = rec["links"][site]
            lines.append(
                f"| {case} | {site} | {s['requests']} | {s['stalls']} | {s['resets']} | {s['refused_while_cut']} | "
                f"{s['bytes_up'] / 1e6:.1f} | {s['bytes_down'] / 1e6:.1f} |"
            )
    lines += ["", "Events:"]
    for case, rec in records.items():
        for event in rec["events"]:
            lines.append(f"- {case}: {event}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "network_faults.json")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-timeout", type=float, default=90.0)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()

    from tests import fault_harness as fh
    from tests.pilot_harness import SMALL_RUN

    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES) - set(HARSH_CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {CASES + HARSH_CASES}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="network-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    pilot, links = fh.faulty_pilot(root, args.data_root, SITES)
    base = {
        **SMALL_RUN,
        "num-server-rounds": args.rounds,
        "eval-every": args.rounds,
        "min-replies": 1,
        "round-timeout": args.round_timeout,
        "results-dir": str(pilot.results),
    }
    records: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    try:
        for case in cases:
            print(f"== {case}", flush=True)
            try:
                records[case] = run_case(pilot, links, case, base, timeout=args.rounds * args.round_timeout * 3 + 600)
            except Exception as exc:  # a case that did not finish is a result too
                records[case] = {"case": case, "status": f"error: {str(exc)[:500]}", "events": [], "rows": []}
                records[case].update(rounds_completed=len(fh.metrics(pilot, case)), round_seconds=[], failed_sites={})
                records[case].update(num_replies=[], links={s: links[s].stats.as_dict() for s in SITES})
                records[case].update(private_state={s: fh.private_state(pilot, case, s) for s in SITES})
                records[case]["supernode_restarts"] = dict.fromkeys(SITES, 0)
            models[case] = fh.global_model(pilot, case)
            print(json.dumps({k: v for k, v in records[case].items() if k not in ("rows", "run_log_tail")}), flush=True)
            write(args.out, records, models, load_start)  # after every case: a partial sweep is a result too
    finally:
        fh.close(pilot, links)
    print(write(args.out, records, models, load_start))
    print(f"written to {args.out} (work folder {root})")
    return 0


def write(out: Path, records: dict[str, dict[str, Any]], models: dict[str, Any], load_start) -> str:
    compare(records, models)
    load_end = os.getloadavg()
    load = f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end ({os.cpu_count()} cores)"
    text = tables(records, load)
    out.write_text(json.dumps({"load": load, "cases": records, "tables": text}, indent=1, default=str) + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
