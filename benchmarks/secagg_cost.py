"""What secure aggregation costs: writes benchmarks/secagg_cost.json and benchmarks/secagg-cost.md.

    .venv/bin/python -m benchmarks.secagg_cost                  # 3 and 10 sites, Flower's Ray simulation
    .venv/bin/python -m benchmarks.secagg_cost --sites 3        # one federation size
    .venv/bin/python -m benchmarks.secagg_cost --engine lean    # the in-process engine instead of Ray
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


def run_one(work: Path, num_sites: int, secure: bool, engine: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from core.methods import DEFAULT_METHOD
    from tests.conftest import tiny_blood_run, write_fake_medmnist

    data = work / f"data-{num_sites}"
    if not data.exists():
        write_fake_medmnist(data, "bloodmnist", sizes=(TRAIN_PER_SITE * num_sites, 30, 60))
    name = f"{'secure' if secure else 'plain'}-{num_sites}"
    config = tiny_blood_run(
        data,
        DEFAULT_METHOD,
        **{
            "partition": "iid",
            "num-server-rounds": ROUNDS,
            "run-name": name,
            "results-dir": str(work / "results"),
            "secure-aggregation": secure,
        },
    )
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
    rows = RunFolder(work / "results" / name).rows()
    return {
        "sites": num_sites,
        "secure": secure,
        "engine": engine,
        "rounds": len(rows),
        "seconds_per_round": sum(r["round_seconds"] for r in rows) / len(rows),
        "upload_bytes_per_site": sum(r["upload_bytes"] for r in rows) / len(rows),
        "num_replies": [r["num_replies"] for r in rows],
        "failed_sites": sum(len(r["failed_sites"]) for r in rows),
        "final_acc": rows[-1].get("global_acc_mean"),
        "wall_seconds": wall,
    }


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [
        "# What secure aggregation costs",
        "",
        f"Written by `benchmarks/secagg_cost.py` ({result['engine']} engine) on {result['machine']}, "
        f"{result['date']}. FusedSpaceFed, synthetic BloodMNIST ({TRAIN_PER_SITE} training images per site), "
        f"iid, 1 local epoch, {ROUNDS} rounds, CPU, 1 thread per site; seconds per round include the "
        "evaluation messages; bytes are what one site uploads per round (arrays of its replies).",
        "",
        "| sites | aggregation | s / round | upload bytes / site / round | x plain (time) | x plain (bytes) | "
        "replies per round | failed |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    plain = {r["sites"]: r for r in runs if not r["secure"]}
    for r in sorted(runs, key=lambda r: (r["sites"], r["secure"])):
        base = plain.get(r["sites"])
        ratio_t = f"{r['seconds_per_round'] / base['seconds_per_round']:.2f}" if base else "-"
        ratio_b = f"{r['upload_bytes_per_site'] / base['upload_bytes_per_site']:.3f}" if base else "-"
        lines.append(
            f"| {r['sites']} | {'SecAgg+' if r['secure'] else 'plain'} | {r['seconds_per_round']:.2f} | "
            f"{r['upload_bytes_per_site']:,.0f} | {ratio_t} | {ratio_b} | {r['num_replies']} | {r['failed_sites']} |"
        )
    lines += [
        "",
        "Secure aggregation adds three exchanges per round (share keys, masked input, unmask). A site's "
        "upload is then one uint32 per shared floating-point value plus one (the weight factor) instead of "
        "its float32 arrays, plus per neighbour a ciphertext of its shares and, at unmasking, a share "
        "per neighbour: so the bytes grow with the number of sites (all are neighbours by default; "
        "`secagg-neighbours` bounds that), and the time by the extra round trips and the masks (one "
        "AES-CTR keystream per neighbour and the site's own seed). The machine was shared with other "
        "work when this ran: compare the rows with each other, not with other tables.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="3,10")
    parser.add_argument("--engine", choices=("ray", "lean"), default="ray")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        OUT_MD.write_text(markdown(json.loads(OUT_JSON.read_text())))
        return 0
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="secagg-cost-"))
    runs = []
    try:
        for num_sites in [int(s) for s in args.sites.split(",")]:
            for secure in (False, True):
                runs.append(run_one(work, num_sites, secure, args.engine))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "engine": args.engine,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
    }
    OUT_JSON.write_text(json.dumps(result, indent=2) + "\n")
    OUT_MD.write_text(markdown(result))
    print(OUT_MD.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
