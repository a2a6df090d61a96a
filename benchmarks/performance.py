"""Measure the simulation's overhead and memory; write benchmarks/PERFORMANCE.md.

    .venv/bin/python -m benchmarks.performance                   # all measurements
    .venv/bin/python -m benchmarks.performance --only overhead   # or: memory

(a) Overhead: seconds per round of the Flower simulation (Ray backend, one process, as
    `benchmarks/sweep.py` runs it) against the same local training in a plain single-process
    PyTorch loop that calls the project's own trainer and data code (client_app.trainers,
    partitions.simulated) with no Flower: same sites, epochs, batch size, model, method,
    seed. Evaluation is off in both for the measured rounds (eval-every beyond them) and Gamma
    is off in both. Steady-state rounds only: the first round (data loading, Ray actors
    starting) and the last (Flower always evaluates after the last round) are excluded.
(b) Memory: peak resident memory of a 100-site simulation on a small dataset, the sum of RSS
    over the whole process tree (driver, Ray's GCS, raylet, workers), sampled with psutil.
(c) GPU: measured only where CUDA is visible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.methods import BASELINE, DEFAULT_METHOD
from core.run_folder import RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medmnist"
OUT = ROOT / "benchmarks" / "PERFORMANCE.md"
RAW = ROOT / "benchmarks" / "performance.json"


def machine() -> dict[str, Any]:
    import flwr
    import psutil
    import ray
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


# -- (a) overhead --------------------------------------------------------------------------


def _category(p, root_pid: int) -> str:
    """Which part of a simulation a process of its tree is (for the CPU split)."""
    if p.pid == root_pid:
        return "driver (ServerApp + Flower's simulation engine)"
    try:
        text = " ".join(p.cmdline()[:3]) or p.name()
    except Exception:
        return "other"
    for key, label in (
        ("ClientApp", "Ray actors (ClientApp: the sites)"),  # the name is cut to 15 chars: ray::ClientApp
        ("raylet", "raylet"),
        ("gcs_server", "Ray GCS"),
    ):
        if key in text:
            return label
    return "other Ray processes (log monitor, dashboard, idle workers)"


def run_child(payload: dict[str, Any], sample_memory: bool = False, module: str = "benchmarks.sweep") -> dict[str, Any]:
    """One simulation in a child process (the sweep's child mode). Samples the child's whole
    process tree every 0.25 s: summed RSS (its peak) and summed CPU time, which, read at the
    moments metrics.jsonl gains a row, gives the CPU seconds each round cost (the machine is
    shared, so CPU time is a steadier measure of work than wall time). With `sample_memory`
    also summed PSS (shared pages split between the processes that map them, where RSS
    counts them in each) and, at its peak, the PSS of each part of the tree."""
    import psutil

    from benchmarks.sweep import RunSpec, child_env

    env = child_env(RunSpec(BASELINE, "x", "iid", 1.0, 0, 1))
    threads = str(payload["run_config"].get("num-threads") or 1)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    run = RunFolder(Path(payload["run_config"]["results-dir"]) / payload["run_config"]["run-name"])
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--child", json.dumps(payload)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    peak = {"rss": 0, "procs": 0, "at": 0.0}
    peak_pss: dict[str, Any] = {"pss": 0, "by_part": {}}
    cpu_at_round: dict[int, float] = {}
    cpu_by_pid: dict[int, tuple[str, float]] = {}
    stop = threading.Event()

    def sample() -> None:
        parent = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
            except psutil.Error:
                break
            rss, cpu, pss = 0, 0.0, 0
            pss_by_part: dict[str, int] = {}
            for p in tree:
                try:
                    part = _category(p, proc.pid)
                    if sample_memory:
                        info = p.memory_full_info()
                        pss += info.pss
                        pss_by_part[part] = pss_by_part.get(part, 0) + info.pss
                    else:
                        info = p.memory_info()
                    rss += info.rss
                    t = p.cpu_times()
                    cpu += t.user + t.system + t.children_user + t.children_system
                    cpu_by_pid[p.pid] = (part, t.user + t.system)  # workers rename themselves
                except psutil.Error:
                    pass
            if rss > peak["rss"]:
                peak.update(rss=rss, procs=len(tree), at=time.time() - started)
            if pss > peak_pss["pss"]:
                peak_pss.update(pss=pss, by_part=pss_by_part)
            try:
                done = run.rounds_done()
            except RunFolderError:
                done = 0
            cpu_at_round.setdefault(done, cpu)  # first sample that sees `done` rounds finished
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.time() - started
    if proc.returncode != 0:
        tail = output.decode(errors="replace")[-3000:]
        raise RuntimeError(f"simulation failed (exit {proc.returncode}):\n{tail}")
    split: dict[str, float] = {}
    for label, seconds in cpu_by_pid.values():
        split[label] = split.get(label, 0.0) + seconds
    rounds = sorted(cpu_at_round)
    round_cpu = [cpu_at_round[b] - cpu_at_round[a] for a, b in zip(rounds, rounds[1:]) if b == a + 1 and a >= 1]
    memory = {"peak_pss_bytes": peak_pss["pss"], "pss_by_part_at_peak_bytes": peak_pss["by_part"]}
    return {
        **(memory if sample_memory else {}),
        "wall_s": wall,
        "peak_rss_bytes": peak["rss"],
        "peak_procs": peak["procs"],
        "peak_at_s": peak["at"],
        "round_cpu_seconds_from_round_2": round_cpu,  # CPU s of rounds 2, 3, ... (the tree, all processes)
        "cpu_seconds_by_process": split,  # the whole run, start-up included
    }


def flower_rounds(cfg: dict[str, Any], sites: int, cpus: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="perf-") as tmp:
        run_config = {**cfg, "results-dir": tmp, "run-name": "flower"}
        info = run_child({"run_config": run_config, "sites": sites, "cpus_per_site": cpus})
        rows = RunFolder(Path(tmp) / "flower").rows()
    info["round_seconds"] = [r["round_seconds"] for r in rows]
    return info


def plain_rounds(cfg: dict[str, Any], sites: int, threads: int) -> dict[str, Any]:
    """The same rounds without Flower: for each site, a fresh model with the global shared
    arrays and the site's private state, the project's trainer, then the same averaging."""
    import torch
    from flwr.app import RecordDict

    from client_app.trainers import LocalRound, trainer_for
    from core.config import RunConfig
    from core.methods import contract_for
    from core.seeds import round_seed, site_init_seed
    from models import build_run_model
    from partitions.simulated import simulation_site_data

    torch.set_num_threads(threads)
    rc = RunConfig.from_mapping({k: v for k, v in cfg.items() if k not in ("results-dir", "run-name")})
    started = time.time()
    data = [simulation_site_data(rc, i, sites) for i in range(sites)]
    load_s = time.time() - started
    trainer = trainer_for(rc.method)

    def fresh(site_id: int):
        return build_run_model(
            rc, data[site_id].spec, seed=site_init_seed(rc.seed, site_id), contract=contract_for(rc.method)
        )

    torch.manual_seed(rc.seed)
    template = fresh(0)
    keys = contract_for(rc.method).shared_keys(template, rc.head_blocks)
    global_state = {k: v.clone() for k, v in template.state_dict().items() if k in keys}
    private: dict[int, dict[str, torch.Tensor]] = {}
    seconds, cpu_seconds = [], []
    for server_round in range(1, rc.num_server_rounds + 1):
        t0, c0 = time.time(), time.process_time()
        replies = []
        for site_id in range(sites):
            model = fresh(site_id)
            model.load_state_dict({**model.state_dict(), **private.get(site_id, {}), **global_state})
            gen = torch.Generator().manual_seed(round_seed(rc.seed, server_round, site_id))
            job = LocalRound(
                cfg=rc,
                data=data[site_id],
                device=torch.device("cpu"),
                generator=gen,
                server_round=server_round,
                incoming=RecordDict(),
            )
            trainer.train(model, job)
            state = model.state_dict()
            private[site_id] = {k: v.detach().clone() for k, v in state.items() if k not in keys}
            replies.append(({k: state[k].detach().clone() for k in keys}, len(data[site_id].train)))
        total = sum(n for _, n in replies)
        global_state = {
            k: (
                sum(s[k].double() * (n / total) for s, n in replies).to(global_state[k].dtype)
                if global_state[k].is_floating_point()
                else replies[0][0][k]
            )
            for k in keys
        }
        seconds.append(time.time() - t0)
        cpu_seconds.append(time.process_time() - c0)
    return {
        "round_seconds": seconds,
        "round_cpu_seconds": cpu_seconds,
        "data_load_s": load_s,
        "threads": threads,
        "train_samples": sum(len(d.train) for d in data),
    }


def steady(seconds: list[float]) -> list[float]:
    """Rounds 2 .. R-1 (the first loads data and starts actors; Flower evaluates after the last)."""
    return seconds[1:-1] if len(seconds) > 2 else seconds


def overhead_config(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds
    return {
        "method": args.method,
        "dataset": args.dataset,
        "data-root": str(args.data_root),
        "download": False,
        "partition": "dirichlet-equal",
        "alpha": 0.05,
        "num-server-rounds": rounds,
        "local-epochs": 3,
        "warmup-epochs": 2,
        "batch-size": 256,
        "eval-every": rounds + 1,  # no evaluation before the last round
        "measure-gamma": False,
        "seed": 0,
        "device": "cpu",
        "num-threads": 1,
        "keep-checkpoints": 1,
    }


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    cfg = overhead_config(args)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    # like for like: one site at a time on one thread in both (a Ray actor that asks for every
    # core runs alone), then Flower's default parallel layout (1 CPU per site) for its speed-up
    flower = flower_rounds(cfg, args.sites, cpus=float(cores))
    plain = plain_rounds(cfg, args.sites, threads=1)
    parallel = flower_rounds(cfg, args.sites, cpus=1.0) if args.parallel_too else None
    f, p = statistics.median(steady(flower["round_seconds"])), statistics.median(steady(plain["round_seconds"]))
    # CPU seconds of the same steady rounds: Flower's list starts at round 2 and its last entry
    # is the round with the final evaluation; the plain loop's starts at round 1
    f_cpu = statistics.median(flower["round_cpu_seconds_from_round_2"][:-1] or [math.nan])
    p_cpu = statistics.median(steady(plain["round_cpu_seconds"]))
    result = {
        "config": cfg,
        "sites": args.sites,
        "cores": cores,
        "flower": flower,
        "plain": plain,
        "flower_parallel": parallel,
        "flower_s_per_round": f,
        "plain_s_per_round": p,
        "ratio": f / p,
        "flower_cpu_s_per_round": f_cpu,
        "plain_cpu_s_per_round": p_cpu,
        "cpu_ratio": f_cpu / p_cpu,
        "train_samples": plain["train_samples"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    if parallel:
        result["flower_parallel_s_per_round"] = statistics.median(steady(parallel["round_seconds"]))
    return result


# -- where a Flower round's time goes -------------------------------------------------------


def profiling_client_app(log_path: str):
    """The project's ClientApp behind a mod that times each message's handler and its parts
    (site set-up, local training, private-state save), appended as JSON lines to `log_path`."""
    from flwr.clientapp import ClientApp

    import client_app.app as client
    from client_app import site as site_module
    from client_app import state as state_module
    from client_app.trainers import trainer_for

    def store() -> dict[str, float]:
        # one dict per actor process: the app (and these closures) may be unpickled per message
        return sys.modules["client_app.app"].__dict__.setdefault("_perf_parts", {})

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        if getattr(original, "_timed", False):
            return

        def wrapper(*args, **kwargs):
            t0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                parts = store()
                parts[label] = parts.get(label, 0.0) + time.process_time() - t0

        wrapper._timed = True
        setattr(owner, name, wrapper)

    def timer(msg, ctx, call_next):
        timed(site_module.Site, "__init__", "site_setup")
        timed(state_module.PrivateState, "save", "state_save")
        for trainer_cls in {type(trainer_for(m)) for m in (BASELINE, DEFAULT_METHOD)}:
            timed(trainer_cls, "train", "local_training")
        parts = store()
        parts.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        reply = call_next(msg, ctx)
        parts["handler_cpu_s"] = time.process_time() - c0
        row = {
            "kind": msg.metadata.message_type,
            "round": int(msg.content["config"]["server-round"]),
            "site": int(ctx.node_config["partition-id"]),
            "pid": os.getpid(),
            "handler_s": time.perf_counter() - t0,
            "end": time.time(),
            **parts,
        }
        with open(log_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return reply

    app = ClientApp(mods=[timer])
    app.train()(client.train)
    app.evaluate()(client.evaluate)
    return app


def profile_child(payload_json: str) -> int:
    from flwr.simulation import run_simulation

    from server_app.app import create_server_app

    payload = json.loads(payload_json)
    run_simulation(
        server_app=create_server_app(payload["run_config"]),
        client_app=profiling_client_app(payload["profile_log"]),
        num_supernodes=int(payload["sites"]),
        backend_config={"client_resources": {"num_cpus": payload["cpus_per_site"], "num_gpus": 0}},
    )
    return 0


def profile(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """One Flower run (1 actor) with the timing mod: per round, the sum of handler times
    against the round's wall time, and the handler split into its parts."""
    with tempfile.TemporaryDirectory(prefix="perf-prof-") as tmp:
        log = Path(tmp) / "handlers.jsonl"
        run_config = {**cfg, "results-dir": tmp, "run-name": "profile"}
        payload = {
            "run_config": run_config,
            "sites": args.sites,
            "cpus_per_site": float(os.cpu_count() or 1),
            "profile_log": str(log),
        }
        info = run_child(payload, module="benchmarks.performance")
        wall = info["wall_s"]
        handlers = [json.loads(line) for line in log.read_text().splitlines()]
        rows = RunFolder(Path(tmp) / "profile").rows()
    per_round = []
    for row in rows:
        mine = [h for h in handlers if h["round"] == row["round"] and h["kind"] == "train"]
        sums = {
            k: sum(h.get(k, 0.0) for h in mine)
            for k in ("handler_s", "handler_cpu_s", "site_setup", "local_training", "state_save")
        }
        per_round.append({"round": row["round"], "round_s": row["round_seconds"], **sums})
    return {
        "wall_s": wall,
        "per_round": per_round,
        "cpu_seconds_by_process": info["cpu_seconds_by_process"],
        "round_cpu_seconds_from_round_2": info["round_cpu_seconds_from_round_2"],
    }


# -- (b) memory ----------------------------------------------------------------------------


def memory(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="perf-mem-") as tmp:
        cfg = {
            "method": DEFAULT_METHOD,
            "dataset": args.memory_dataset,
            "data-root": str(args.data_root),
            "download": False,
            "partition": "dirichlet-equal",
            "alpha": 0.05,
            "num-server-rounds": args.memory_rounds,
            "local-epochs": 1,
            "warmup-epochs": 1,
            "batch-size": 256,
            "seed": 0,
            "device": "cpu",
            "num-threads": 1,
            "keep-checkpoints": 1,
            "results-dir": tmp,
            "run-name": "memory",
        }
        info = run_child({"run_config": cfg, "sites": args.memory_sites, "cpus_per_site": 1.0}, sample_memory=True)
        rows = RunFolder(Path(tmp) / "memory").rows()
    info.update(config=cfg, sites=args.memory_sites, round_seconds=[r["round_seconds"] for r in rows])
    return info


# -- the file ------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# Performance",
        "",
        "Generated by `.venv/bin/python -m benchmarks.performance` (raw numbers: `benchmarks/performance.json`).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores; RAM {m['ram_gib']} GiB; no GPU"
        if not m["cuda"]
        else f"- CPU: {m['cpu']}, {m['logical_cores']} cores; RAM {m['ram_gib']} GiB; GPU {m['gpu']}",
        f"- Python {m['python']}, torch {m['torch']}, flwr {m['flwr']}, ray {m['ray']}",
        f"- Load average when the measurement started: {', '.join(f'{x:.1f}' for x in m['load_average'])} "
        "(the machine is shared with other jobs at times, so absolute seconds are noisy; each measurement below "
        "gives its own load average, and a ratio compares two runs taken back to back).",
        "",
    ]
    runs = data.get("overheads", {})
    if runs:
        lines += [
            "## (a) Flower simulation vs a plain PyTorch loop",
            "",
            "The same comparison on datasets of different size: Flower's cost per round is a fixed amount (message "
            "routing, aggregation, checkpoint, Ray daemons), so its share falls as the local work per round grows.",
            "",
            "| dataset | training samples | Flower CPU s / round | plain CPU s / round | CPU ratio | wall ratio |",
            "|---|---|---|---|---|---|",
        ]
        for name, o in runs.items():
            lines.append(
                f"| {name} | {o.get('train_samples', '?')} | {o.get('flower_cpu_s_per_round', math.nan):.2f} | "
                f"{o.get('plain_cpu_s_per_round', math.nan):.2f} | **{o.get('cpu_ratio', math.nan):.2f}** | "
                f"{o['ratio']:.2f} |"
            )
        lines.append("")
    for name, o in runs.items():
        c = o["config"]
        lines += [
            f"### {name}",
            "",
            f"Config: {c['method']} on {c['dataset']}, {o['sites']} sites, {c['partition']} alpha {c['alpha']}, "
            f"{c['num-server-rounds']} rounds, {c['local-epochs']} local epochs, {c['warmup-epochs']} warm-up epochs, "
            f"batch {c['batch-size']}, seed {c['seed']}, CPU. Evaluation and Gamma off in both for the measured rounds.",
            "",
            "- Flower (like for like): `flwr.simulation.run_simulation`, Ray backend, client resources "
            f"{o.get('cores', m['logical_cores'])} CPUs per site, so one Ray actor trains the sites one after "
            "another, as the plain loop does; `num-threads = 1` and OMP_NUM_THREADS=1.",
            "- Plain loop: one process, the sites one after another, 1 torch thread, the project's trainer "
            "(`client_app.trainers`) and data (`partitions.simulated`); a fresh model per site per round loaded "
            "with the global and private arrays, example-weighted averaging of the shared arrays, as the server does.",
            "- Seconds per round are the median of the steady-state rounds (2 .. R-1): round 1 includes data "
            "loading and actor start-up, and Flower always evaluates after the last round.",
            "",
            "- CPU seconds: for Flower the summed user+system time of the run's whole process tree (driver, "
            "Ray GCS and raylet, the actor) between the moments a round's row reaches metrics.jsonl (psutil, every "
            "0.25 s); for the plain loop `time.process_time()` of the round. On a shared machine CPU time is the "
            "steadier measure of work; wall time also counts waiting for the CPU.",
            "",
            "| | wall s per round (steady) | CPU s per round (steady) | all rounds, wall (s) |",
            "|---|---|---|---|",
            f"| Flower simulation, 1 actor | {o['flower_s_per_round']:.2f} | {o.get('flower_cpu_s_per_round', math.nan):.2f} | "
            f"{', '.join(f'{s:.1f}' for s in o['flower']['round_seconds'])} |",
            f"| plain loop, 1 thread | {o['plain_s_per_round']:.2f} | {o.get('plain_cpu_s_per_round', math.nan):.2f} | "
            f"{', '.join(f'{s:.1f}' for s in o['plain']['round_seconds'])} |",
        ]
        if o.get("flower_parallel"):
            lines.append(
                f"| Flower simulation, 1 CPU per site ({o.get('cores')} actors in parallel, the sweep's layout) | "
                f"{o['flower_parallel_s_per_round']:.2f} | — | "
                f"{', '.join(f'{s:.1f}' for s in o['flower_parallel']['round_seconds'])} |"
            )
        lines += [
            "",
            f"**Ratio Flower / plain: {o['ratio']:.2f} in wall time, {o.get('cpu_ratio', math.nan):.2f} in CPU time** "
            "(target <= 1.15). Flower's whole run took "
            f"{o['flower']['wall_s']:.0f} s for {c['num-server-rounds']} rounds, including Ray start-up and the final "
            "evaluation. Load average before / after: "
            f"{', '.join(f'{x:.1f}' for x in o['load_average_before'])} / "
            f"{', '.join(f'{x:.1f}' for x in o['load_average_after'])}.",
            "",
        ]
    prof = data.get("profile")
    if prof:
        lines += [
            f"### Where a Flower round's time goes ({prof.get('dataset', 'retinamnist')}, 1 actor, timing mod around the handlers)",
            "",
            "Per round, summed over the 10 train messages. CPU seconds of the actor process inside the handler "
            "(`time.process_time()`), split into its parts; the tree's CPU per round as in the table above.",
            "",
            "| round | round wall (s) | handlers wall (s) | handlers CPU (s) | site set-up CPU | local training CPU "
            "| private-state save CPU | whole tree CPU (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        tree = [None, *prof.get("round_cpu_seconds_from_round_2", [])]
        for i, r in enumerate(prof["per_round"]):
            t = tree[i] if i < len(tree) else None
            lines.append(
                f"| {r['round']} | {r['round_s']:.2f} | {r['handler_s']:.2f} | {r.get('handler_cpu_s', math.nan):.2f} | "
                f"{r['site_setup']:.2f} | {r['local_training']:.2f} | {r['state_save']:.2f} | "
                f"{'—' if t is None else f'{t:.2f}'} |"
            )
        split = prof.get("cpu_seconds_by_process") or {}
        total = sum(split.values()) or 1.0
        lines += [
            "",
            "CPU seconds of the whole profiled run (start-up included) by process: "
            + "; ".join(
                f"{k} {v:.1f} s ({100 * v / total:.0f} %)" for k, v in sorted(split.items(), key=lambda kv: -kv[1])
            )
            + ".",
            "",
        ]
    mem = data.get("memory")
    if mem:
        c = mem["config"]
        lines += [
            "## (b) Peak memory with 100 sites",
            "",
            f"{mem['sites']} simulated sites, {c['method']} on {c['dataset']} ({c['partition']} alpha {c['alpha']}), "
            f"{c['num-server-rounds']} round(s) with evaluation, {c['local-epochs']} local epoch, CPU, 1 CPU per site.",
            "",
            f"- **Peak resident memory: {mem['peak_rss_bytes'] / 2**30:.2f} GiB** (sum of RSS over "
            f"{mem['peak_procs']} processes of the run's process tree: driver, Ray GCS, raylet, workers, sampled every "
            f"0.25 s with psutil; peak at {mem['peak_at_s']:.0f} s of {mem['wall_s']:.0f} s). Summed RSS counts shared "
            "pages (torch libraries) once per process, so it overstates the unique memory.",
            f"- Round seconds: {', '.join(f'{s:.1f}' for s in mem['round_seconds'])}.",
            "",
        ]
    lines += ["## (c) GPU", ""]
    if m["cuda"]:
        lines.append(f"GPU present ({m['gpu']}) but not measured by this script yet.")
    else:
        lines.append(
            "No GPU was available on this machine (torch.cuda.is_available() is False), so there are no GPU "
            "figures. None are invented here; run this script on a CUDA machine to add them."
        )
    round_cost = ROOT / "benchmarks" / "round_cost.json"
    if round_cost.exists():
        from benchmarks.round_cost import render as render_round_cost

        lines += ["", render_round_cost(json.loads(round_cost.read_text())).rstrip()]
    notes = data.get("notes")
    if notes:
        lines += ["", "## Notes", "", notes.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("overhead", "memory", "profile"))
    p.add_argument("--dataset", default="retinamnist")
    p.add_argument("--method", default=BASELINE)
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--parallel-too", action="store_true", help="also time Flower with 1 CPU per site (parallel sites)")
    p.add_argument("--memory-dataset", default="breastmnist")
    p.add_argument("--memory-sites", type=int, default=100)
    p.add_argument("--memory-rounds", type=int, default=1)
    p.add_argument("--data-root", default=str(DATA))
    p.add_argument("--notes", help="a Markdown file appended as Notes")
    p.add_argument("--render-only", action="store_true", help="rewrite PERFORMANCE.md from performance.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        return profile_child(args.child)
    data = json.loads(RAW.read_text()) if RAW.exists() else {}
    if not args.render_only:
        data["machine"] = machine()
        if args.only in (None, "overhead"):
            result = overhead(args)
            data.setdefault("overheads", {})[args.dataset] = result
            print(f"overhead on {args.dataset}: CPU ratio {result['cpu_ratio']:.2f}, wall ratio {result['ratio']:.2f}")
        if args.only == "profile":
            data["profile"] = profile(args, overhead_config(args))
            print(json.dumps(data["profile"], indent=1))
        if args.only in (None, "memory"):
            data["memory"] = memory(args)
            print(f"peak RSS {data['memory']['peak_rss_bytes'] / 2**30:.2f} GiB")
    if args.notes:
        data["notes"] = Path(args.notes).read_text()
    RAW.write_text(json.dumps(data, indent=2) + "\n")
    OUT.write_text(render(data))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
