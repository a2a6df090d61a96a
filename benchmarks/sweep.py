"""Run a benchmark grid: methods x variants x datasets x partitions x alphas x seeds.

    .venv/bin/python -m benchmarks.sweep --methods fusedspacefed,fedavg --datasets retinamnist \
        --alphas 0.05 --seeds 0,1,2 --rounds 20
    .venv/bin/python -m benchmarks.sweep --grid benchmarks/grid.toml      # several plans, in order
    .venv/bin/python -m benchmarks.sweep --grid benchmarks/grid.toml --dry-run

Every run is a child process: with `--engine lean` (the default) the project's round loop and
ClientApp in one process (benchmarks/lean.py: no Ray, the same metrics as the Flower
simulation, checked by tests/test_lean.py), with `--engine flower` a Flower simulation
(`flwr.simulation.run_simulation`, Ray backend). `--parallel N` runs N at a time;
`--stop-after S` stops the sweep after S seconds, leaving running runs resumable. Runs land under
`<results-dir>/<run-name>/` (default `benchmarks/runs/`) with the project's usual layout
(config.json, metrics.jsonl, summary.json); the child's output goes to `run.log` beside them.

Resumable: a run whose summary.json exists is skipped; an interrupted run continues from its
last checkpoint (`resume-from = "latest"`; the sites' private state is in its folder too),
and one without a checkpoint is redone from scratch. Run names are
deterministic: `<method>[-decoupled]-<dataset>-<partition>-<a<alpha>|k<k>|iid>-n<sites>-r<rounds>-e<epochs>-s<seed>`.
They carry neither batch size nor warm-up epochs: a finished run whose config.json differs from
the grid's is still skipped, but `--dry-run` and the sweep name it (use another `--results-dir`).

The `protocols` axis (`standard`, `reference`: method.md section 7) and the `variant` axis,
which only applies to fusedspacefed: under `standard` `task-aware` (joint loss, the default)
and `decoupled` (`task-aware = false`); under `reference` the reference code's three,
all decoupled with the U-Net autoencoder: `no-warmup`, `warmup` (2 epochs), `l2sp`
(`l2sp-lambda = 1e-3`, no warm-up). Other methods run once per protocol.

A grid file is TOML with `[defaults]` and one or more `[[plan]]` tables; every key is a CLI
option name with dashes (lists for the axes, e.g. `seeds = [0, 1, 2]`), and `set` is a table
of extra run-config keys. Plans are expanded in order; a run that two plans share runs once.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.methods import BASELINE, DEFAULT_METHOD, METHODS
from core.run_folder import CONFIG_FILE, METRICS_FILE, PARTITION_FILE, SUMMARY_FILE, RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "runs"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medmnist"
PROTOCOL_VARIANTS = {
    # FusedSpaceFed variants per protocol; baselines run once per protocol
    "standard": ("task-aware", "decoupled"),
    # the reference code's three (method.md section 7): all decoupled with the U-Net autoencoder
    "reference": ("no-warmup", "warmup", "l2sp"),
}
VARIANTS = tuple(v for variants in PROTOCOL_VARIANTS.values() for v in variants)
VARIANT_SETTINGS: dict[str, dict[str, Any]] = {
    "task-aware": {"task-aware": True},
    "decoupled": {"task-aware": False},
    "no-warmup": {"task-aware": False, "ae-arch": "unet", "warmup-epochs": 0},
    "warmup": {"task-aware": False, "ae-arch": "unet", "warmup-epochs": 2},
    "l2sp": {"task-aware": False, "ae-arch": "unet", "warmup-epochs": 0, "l2sp-lambda": 1e-3},
}
# run-config keys that, when a plan sets them, name the run (key -> the tag before its value)
NAMED_SETTINGS = {"norm": "", "fraug-distance-g": "g", "fraug-distance-ft": "ft"}
AXES = ("methods", "protocols", "variants", "datasets", "partitions", "alphas", "seeds")
ENGINES = ("lean", "flower")


def uses_encoder(method: str) -> bool:
    """The method's contract has a private encoder (FusedSpaceFed's variants apply); an
    unknown method is left for the run's own configuration check to refuse, in its log."""
    return method in METHODS and METHODS[method].uses_encoder


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: everything that makes it different from another."""

    method: str
    dataset: str
    partition: str
    alpha: float
    seed: int
    rounds: int
    variant: str = "task-aware"
    protocol: str = "standard"
    sites: int = 10
    local_epochs: int = 3
    warmup_epochs: int = 2
    batch_size: int = 256
    classes_per_client: int = 2
    eval_every: int = 1
    cpus_per_site: float = 1.0
    data_root: str = str(DEFAULT_DATA)
    device: str = "cpu"
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @property
    def fused(self) -> bool:
        """The method has FusedSpaceFed's variants (a private encoder)."""
        return uses_encoder(self.method)

    @property
    def name(self) -> str:
        """Standard-protocol names are what they always were (committed runs stay valid);
        reference-protocol runs say `-ref-<variant>`, runs with a `norm` set say `-<norm>`, FRAug
        runs with a distance set `-g<distance>` and `-ft<distance>` (NAMED_SETTINGS)."""
        method = self.method
        if self.protocol == "reference":
            method += "-ref" + (f"-{self.variant}" if self.fused else "")
        elif self.fused and self.variant == "decoupled":
            method += "-decoupled"
        extra = dict(self.extra)
        for key, tag in NAMED_SETTINGS.items():  # a grid that compares these (`set = {norm = ...}`) names them
            if extra.get(key):
                method += f"-{tag}{extra[key]}"
        if self.partition.startswith("dirichlet"):
            spread = f"a{self.alpha:g}"
        elif self.partition == "pathological":
            spread = f"k{self.classes_per_client}"
        else:
            spread = "iid"
        return (
            f"{method}-{self.dataset}-{self.partition}-{spread}-n{self.sites}-r{self.rounds}"
            f"-e{self.local_epochs}-s{self.seed}"
        )

    def run_config(self, results_dir: Path) -> dict[str, Any]:
        """The run-config overrides (kebab-case keys) for this run."""
        cfg: dict[str, Any] = {
            "method": self.method,
            "dataset": self.dataset,
            "data-root": self.data_root,
            "download": False,
            "partition": self.partition,
            "alpha": float(self.alpha),
            "classes-per-client": self.classes_per_client,
            "num-server-rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "warmup-epochs": self.warmup_epochs,
            "batch-size": self.batch_size,
            "eval-every": self.eval_every,
            "seed": self.seed,
            "device": self.device,
            "num-threads": max(1, int(self.cpus_per_site)),
            "results-dir": str(results_dir),
            "run-name": self.name,
            "keep-checkpoints": 1,
            "protocol": self.protocol,
            "track-tensorboard": False,  # thousands of runs: metrics.jsonl, summary.json and the report suffice
        }
        if self.fused:
            cfg.update(VARIANT_SETTINGS[self.variant])
        cfg.update(dict(self.extra))
        return cfg


# -- the grid ----------------------------------------------------------------------------


def _split(value: Any, kind: type) -> list:
    if isinstance(value, list | tuple):
        return [kind(v) for v in value]
    return [kind(v.strip()) for v in str(value).split(",") if v.strip()]


def rounds_for(rounds: Any, dataset: str) -> int:
    """`rounds` is an int, or a mapping / "dataset=N,..." string with an optional `default`."""
    if isinstance(rounds, int):
        return rounds
    if isinstance(rounds, str) and "=" not in rounds:
        return int(rounds)
    table = rounds if isinstance(rounds, dict) else dict(p.split("=", 1) for p in rounds.split(",") if p.strip())
    table = {k.strip(): int(v) for k, v in table.items()}
    if dataset in table:
        return table[dataset]
    if "default" in table:
        return table["default"]
    raise SystemExit(f"no number of rounds for {dataset} in {rounds!r} (give it, or a default)")


def expand(plan: dict[str, Any]) -> list[RunSpec]:
    """All runs of one plan, in a stable order: seed outside the methods, so that a sweep cut
    short has every method of a cell at the same number of seeds."""
    methods = _split(plan.get("methods", f"{DEFAULT_METHOD},{BASELINE}"), str)
    protocols = _split(plan.get("protocols", "standard"), str)
    unknown = sorted(set(protocols) - set(PROTOCOL_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown protocols {unknown}; known: {sorted(PROTOCOL_VARIANTS)}")
    default_variants = ",".join(PROTOCOL_VARIANTS["reference"]) if protocols == ["reference"] else "task-aware"
    variants = _split(plan.get("variants", default_variants), str)
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        raise SystemExit(f"unknown variants {bad}; known: {VARIANTS}")
    datasets = _split(plan.get("datasets", "retinamnist"), str)
    partitions = _split(plan.get("partitions", "dirichlet-equal"), str)
    alphas = _split(plan.get("alphas", "0.05"), float)
    seeds = _split(plan.get("seeds", "0"), int)
    extra = plan.get("set") or {}
    if isinstance(extra, str | list):
        extra = dict(p.split("=", 1) for p in _split(extra, str))
    common = dict(
        sites=int(plan.get("sites", 10)),
        local_epochs=int(plan.get("local-epochs", 3)),
        warmup_epochs=int(plan.get("warmup-epochs", 2)),
        batch_size=int(plan.get("batch-size", 256)),
        classes_per_client=int(plan.get("classes-per-client", 2)),
        eval_every=int(plan.get("eval-every", 1)),
        cpus_per_site=float(plan.get("cpus-per-site", 1.0)),
        data_root=str(plan.get("data-root", DEFAULT_DATA)),
        device=str(plan.get("device", "cpu")),
        extra=tuple(sorted(extra.items())),
    )
    runs: list[RunSpec] = []
    for dataset, partition in itertools.product(datasets, partitions):
        # a pathological partition has no alpha: one run per seed, not one per alpha
        part_alphas = alphas if partition.startswith("dirichlet") else alphas[:1]
        for alpha, seed, protocol, method in itertools.product(part_alphas, seeds, protocols, methods):
            own = [v for v in variants if v in PROTOCOL_VARIANTS[protocol]]
            for variant in own if uses_encoder(method) else [PROTOCOL_VARIANTS[protocol][0]]:
                runs.append(
                    RunSpec(
                        method=method,
                        variant=variant,
                        protocol=protocol,
                        dataset=dataset,
                        partition=partition,
                        alpha=alpha,
                        seed=seed,
                        rounds=rounds_for(plan.get("rounds", 5), dataset),
                        **common,
                    )
                )
    return runs


def load_plans(args: argparse.Namespace) -> list[dict[str, Any]]:
    cli = {k.replace("_", "-"): v for k, v in vars(args).items() if v is not None}
    for key in (
        "grid",
        "results-dir",
        "dry-run",
        "child",
        "only",
        "max-runs",
        "engine",
        "parallel",
        "stop-after",
        "collect",
    ):
        cli.pop(key, None)
    if not args.grid:
        return [cli]
    grid = tomllib.loads(Path(args.grid).read_text())
    defaults = grid.get("defaults", {})
    plans = grid.get("plan", [])
    if not plans:
        raise SystemExit(f"{args.grid}: no [[plan]] tables")
    return [{**defaults, **plan, **cli} for plan in plans]  # CLI flags override the file


def all_runs(plans: list[dict[str, Any]]) -> list[RunSpec]:
    seen: dict[str, RunSpec] = {}
    for plan in plans:
        for spec in expand(plan):
            seen.setdefault(spec.name, spec)
    return list(seen.values())


# -- resumability --------------------------------------------------------------------------


def run_state(results_dir: Path, spec: RunSpec) -> str:
    """`done` (summary.json exists), `partial` (a folder without one) or `new`."""
    run = RunFolder(results_dir / spec.name)
    if run.finished:
        return "done"
    return "partial" if run.path.exists() else "new"


# where and how a run executes, not what it computes: not compared with a finished run's config
EXECUTION_KEYS = frozenset(
    {
        "results-dir",
        "run-name",
        "data-root",
        "resume-from",
        "keep-checkpoints",
        "track-tensorboard",
        "device",
        "num-threads",
    }
)


def config_differences(results_dir: Path, spec: RunSpec) -> dict[str, tuple[Any, Any]]:
    """Keys whose value in a finished run's config.json is not what the grid asks for
    (`{key: (stored, wanted)}`). Run names carry neither batch size nor warm-up epochs, so a
    folder can hold a run of another recipe under the grid's name: it is skipped as done, and
    this says so. Keys the stored config lacks are not compared (older runs)."""
    try:
        stored = RunFolder(results_dir / spec.name).config()
    except RunFolderError:
        return {}
    return {
        key: (stored[key], wanted)
        for key, wanted in spec.run_config(results_dir).items()
        if key not in EXECUTION_KEYS and key in stored and stored[key] != wanted
    }


def clear_partial(results_dir: Path, spec: RunSpec) -> None:
    """An interrupted run is redone from scratch: its folder (and site state) goes."""
    run_dir = results_dir / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)


def rounds_done(results_dir: Path, spec: RunSpec) -> int:
    try:
        return RunFolder(results_dir / spec.name).rounds_done()
    except RunFolderError:
        return 0


# -- one run, in a child process ------------------------------------------------------------


def child_main(spec_json: str) -> int:
    """Run one simulation in this process (called in the child)."""
    payload = json.loads(spec_json)
    if payload.get("engine", "flower") == "lean":
        from benchmarks.lean import run_lean

        run_lean(payload["run_config"], int(payload["sites"]))
    else:
        from flwr.simulation import run_simulation

        import client_app.app as client
        from server_app.app import create_server_app

        run_simulation(
            server_app=create_server_app(payload["run_config"]),
            client_app=client.app,
            num_supernodes=int(payload["sites"]),
            backend_config={"client_resources": {"num_cpus": payload["cpus_per_site"], "num_gpus": 0}},
        )
    run = RunFolder(Path(payload["run_config"]["results-dir"]) / payload["run_config"]["run-name"])
    return 0 if run.finished else 1


def child_env(spec: RunSpec) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(max(1, int(spec.cpus_per_site)))
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAY_DEDUP_LOGS": "0"})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def resumable(results_dir: Path, spec: RunSpec) -> bool:
    """An interrupted run that left a checkpoint continues from it (the sites' private
    state is in the run folder too); one without a checkpoint is redone."""
    return any((results_dir / spec.name / "checkpoints").glob("round-*.pt"))


def claim(results_dir: Path, spec: RunSpec) -> Any | None:
    """An exclusive lock on the run for as long as the returned handle stays open, or None when
    another live sweep holds it. Two sweeps over one results folder (a second started over the
    same cell) then never run, clear or redo the same run; the lock lives outside the run's
    folder, which a redo clears, and dies with the process that holds it."""
    locks = results_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    handle = open(locks / f"{spec.name}.lock", "w")  # noqa: SIM115 - held while the run runs
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def start_run(
    results_dir: Path, spec: RunSpec, engine: str = "lean", claim_handle: Any | None = None
) -> tuple[subprocess.Popen, Any]:
    """Start the run's child process. With `claim_handle` (claim()) the child inherits the
    lock, so the claim lasts as long as the run does, even if this sweep is killed first."""
    run_config = spec.run_config(results_dir)
    if run_state(results_dir, spec) == "partial" and resumable(results_dir, spec):
        run_config["resume-from"] = "latest"
    else:
        clear_partial(results_dir, spec)
    run_dir = results_dir / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"run_config": run_config, "sites": spec.sites, "cpus_per_site": spec.cpus_per_site, "engine": engine}
    log = open(run_dir / "run.log", "a")  # noqa: SIM115 - closed by the caller when the child ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sweep", "--child", json.dumps(payload)],
        cwd=ROOT,
        env=child_env(spec),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its Ray processes form one group we can stop together
        pass_fds=(claim_handle.fileno(),) if claim_handle is not None else (),
    )
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass


def reap(proc: subprocess.Popen) -> float | None:
    """None while the child runs; once it has ended, its CPU seconds (user + system, with
    the processes it waited for), which a loaded machine does not inflate as it does wall
    time: the campaign's core-hours come from here."""
    if proc.returncode is not None:
        return 0.0
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


# -- the driver --------------------------------------------------------------------------


def sweep(
    runs: list[RunSpec],
    results_dir: Path,
    max_runs: int | None = None,
    *,
    engine: str = "lean",
    parallel: int = 1,
    deadline: float | None = None,
) -> dict[str, int]:
    """Run the pending runs, `parallel` at a time. With `deadline` (epoch seconds) no run
    starts after it and running ones are stopped at it; they resume from their last
    checkpoint next time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from core.console import console

    todo = [s for s in runs if run_state(results_dir, s) != "done"]
    skipped = len(runs) - len(todo)
    other = [s.name for s in runs if run_state(results_dir, s) == "done" and config_differences(results_dir, s)]
    if other:
        console.print(
            f"[yellow]{len(other)} finished runs in {results_dir} have another configuration than the grid's "
            "(skipped as done all the same; --dry-run lists the keys):[/yellow] " + ", ".join(other)
        )
    if max_runs is not None:
        todo = todo[:max_runs]
    console.print(
        f"{len(runs)} runs in the grid: {skipped} done already, {len(todo)} to run ({engine} engine, "
        f"{parallel} at a time) -> {results_dir}"
    )
    counts = {"done": 0, "failed": 0, "skipped": skipped, "stopped": 0}
    log_path = results_dir / "sweep.jsonl"
    results_dir.mkdir(parents=True, exist_ok=True)
    total_rounds = sum(s.rounds for s in todo)
    running: dict[str, tuple[RunSpec, subprocess.Popen, Any, float]] = {}
    locks: dict[str, Any] = {}  # the claim on each running run (claim())
    finished_rounds = 0
    with Progress(
        TextColumn("[bold]{task.fields[runs]}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[current]}"),
        console=console,
        refresh_per_second=1,
    ) as progress:
        task = progress.add_task("sweep", total=total_rounds, runs=f"runs {skipped}/{len(runs)}", current="")
        queue = list(todo)
        try:
            while queue or running:
                late = deadline is not None and time.time() >= deadline
                while queue and len(running) < parallel and not late:
                    spec = queue.pop(0)
                    # the to-do list is hours old by now: another sweep may have finished or be running this run
                    lock = claim(results_dir, spec)
                    if lock is None or run_state(results_dir, spec) == "done":
                        if lock is not None:
                            lock.close()
                        counts["skipped"] += 1
                        why = "another sweep is running it" if lock is None else "it finished meanwhile"
                        progress.console.print(f"[yellow]skipped[/yellow] {spec.name}: {why}")
                        continue
                    partial = run_state(results_dir, spec) == "partial"
                    note = " (resumed)" if partial and resumable(results_dir, spec) else (" (redo)" if partial else "")
                    proc, log = start_run(results_dir, spec, engine, claim_handle=lock)
                    running[spec.name] = (spec, proc, log, time.time())
                    locks[spec.name] = lock
                    progress.console.print(f"started {spec.name}{note}")
                if late:
                    queue.clear()
                    for name, (_spec, proc, log, _) in list(running.items()):
                        stop(proc)
                        log.close()
                        counts["stopped"] += 1
                        progress.console.print(f"[yellow]stopped at the deadline[/yellow] {name} (resumable)")
                        del running[name]
                    break
                time.sleep(2)
                for name, (spec, proc, log, started) in list(running.items()):
                    cpu_seconds = reap(proc)
                    if cpu_seconds is None:
                        continue
                    log.close()
                    del running[name]
                    locks.pop(name).close()
                    ok = proc.returncode == 0 and run_state(results_dir, spec) == "done"
                    counts["done" if ok else "failed"] += 1
                    finished_rounds += spec.rounds
                    seconds = time.time() - started
                    with open(log_path, "a") as handle:
                        entry = {
                            "run": spec.name,
                            "ok": ok,
                            "seconds": round(seconds, 1),
                            "cpu_seconds": round(cpu_seconds, 1),
                            "engine": engine,
                        }
                        handle.write(json.dumps(entry) + "\n")
                    if ok:
                        progress.console.print(f"[green]done[/green] {spec.name} in {seconds:.0f} s")
                    else:
                        progress.console.print(
                            f"[red]failed[/red] {spec.name} (exit {proc.returncode}); see "
                            f"{results_dir / spec.name / 'run.log'}"
                        )
                    if not progress.console.is_terminal:  # a log file gets no live bar: a status line per run
                        progress.console.print(status_line(progress.tasks[0], counts, skipped, len(runs)))
                in_flight = sum(rounds_done(results_dir, spec) for spec, *_ in running.values())
                progress.update(
                    task,
                    completed=finished_rounds + in_flight,
                    runs=f"runs {skipped + counts['done'] + counts['failed']}/{len(runs)}",
                    current=", ".join(running)[:80],
                )
        except BaseException:
            for _, proc, log, _ in running.values():
                stop(proc)
                log.close()
            raise
        finally:
            for lock in locks.values():
                lock.close()
    console.print(f"sweep finished: {counts}")
    return counts


SMALL_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, PARTITION_FILE)


def collect(runs: list[RunSpec], results_dir: Path, into: Path) -> int:
    """The finished runs' small files, for committing (benchmarks.report reads them back);
    checkpoints, site state and event files stay behind."""
    copied = 0
    for spec in runs:
        if run_state(results_dir, spec) != "done":
            continue
        target = into / spec.name
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if (results_dir / spec.name / name).exists():
                shutil.copy2(results_dir / spec.name / name, target / name)
        copied += 1
    return copied


def status_line(task: Any, counts: dict[str, int], skipped: int, total: int) -> str:
    done = skipped + counts["done"] + counts["failed"]
    left = task.total - task.completed
    speed = task.completed / task.elapsed if task.elapsed and task.completed else None
    eta = f"{left / speed / 60:.0f} min" if speed else "?"
    return f"  runs {done}/{total}, rounds {task.completed:.0f}/{task.total:.0f}, ETA {eta}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="TOML grid file ([defaults] and [[plan]] tables)")
    p.add_argument("--methods", help=f"comma list ({','.join(METHODS)})")
    p.add_argument("--variants", help=f"{DEFAULT_METHOD} variants: task-aware,decoupled")
    p.add_argument("--datasets", help="comma list of MedMNIST flags")
    p.add_argument("--partitions", help="comma list: dirichlet-equal,dirichlet,pathological,iid")
    p.add_argument("--alphas", help="comma list of Dirichlet alphas")
    p.add_argument("--seeds", help="comma list of seeds")
    p.add_argument("--rounds", help="rounds: N, or per dataset 'retinamnist=20,breastmnist=20,default=10'")
    p.add_argument("--sites", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--classes-per-client", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--cpus-per-site", type=float, help="Ray client resources (and torch threads) per site")
    p.add_argument("--data-root")
    p.add_argument("--set", help="extra run-config keys, 'k=v,k=v'")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS))
    p.add_argument("--max-runs", type=int, help="run at most this many of the pending runs")
    p.add_argument("--protocols", help="comma list: standard,reference")
    p.add_argument(
        "--collect",
        help="copy the finished runs' small files (config, metrics, summary, partition) here, to commit them",
    )
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="lean",
        help="lean: the round loop and ClientApp in one process per run (no Ray; same metrics, tests/test_lean.py); "
        "flower: Flower's Ray simulation",
    )
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--stop-after", type=float, help="seconds: start nothing after, stop running runs (resumable) at")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child)
    results_dir = Path(args.results_dir).resolve()
    runs = all_runs(load_plans(args))
    # `kill <pid>` of the sweep stops the current run's process group too (no orphaned Ray workers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.collect:
        copied = collect(runs, results_dir, Path(args.collect))
        print(f"{copied} finished runs copied to {args.collect}")
        return 0
    if args.dry_run:
        for spec in runs:
            state = run_state(results_dir, spec)
            differs = config_differences(results_dir, spec) if state == "done" else {}
            note = "  (another config: " + ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in differs.items()) + ")"
            print(f"{state:8s} {spec.name}{note if differs else ''}")
        print(f"{len(runs)} runs, {sum(s.rounds for s in runs)} rounds")
        return 0
    deadline = time.time() + args.stop_after if args.stop_after else None
    counts = sweep(runs, results_dir, args.max_runs, engine=args.engine, parallel=args.parallel, deadline=deadline)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
