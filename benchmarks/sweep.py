"""Run a benchmark grid: methods x variants x datasets x partitions x alphas x seeds.

    .venv/bin/python -m benchmarks.sweep --methods fusedspacefed,fedavg --datasets retinamnist \
        --alphas 0.05 --seeds 0,1,2 --rounds 20
    .venv/bin/python -m benchmarks.sweep --grid benchmarks/grid.toml      # several plans, in order
    .venv/bin/python -m benchmarks.sweep --grid benchmarks/grid.toml --dry-run

Every run is a Flower simulation (`flwr.simulation.run_simulation`, Ray backend) in its own
child process, so no Ray state leaks from one run into the next. Runs land under
`<results-dir>/<run-name>/` (default `benchmarks/runs/`) with the project's usual layout
(config.json, metrics.jsonl, summary.json); the child's output goes to `run.log` beside them.

Resumable: a run whose summary.json exists is skipped; a run folder without one (a run
that was interrupted) is deleted and the run is redone from scratch. Run names are
deterministic: `<method>[-decoupled]-<dataset>-<partition>-<a<alpha>|k<k>|iid>-n<sites>-r<rounds>-e<epochs>-s<seed>`.

The `variant` axis only applies to fusedspacefed: `task-aware` (joint loss, the default) and
`decoupled` (`task-aware = false`, the reference code's update); other methods ignore it.

A grid file is TOML with `[defaults]` and one or more `[[plan]]` tables; every key is a CLI
option name with dashes (lists for the axes, e.g. `seeds = [0, 1, 2]`), and `set` is a table
of extra run-config keys. Plans are expanded in order; a run that two plans share runs once.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "runs"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medmnist"
VARIANTS = ("task-aware", "decoupled")
AXES = ("methods", "variants", "datasets", "partitions", "alphas", "seeds")


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
    sites: int = 10
    local_epochs: int = 3
    warmup_epochs: int = 2
    batch_size: int = 256
    classes_per_client: int = 2
    eval_every: int = 1
    cpus_per_site: float = 1.0
    data_root: str = str(DEFAULT_DATA)
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        method = self.method + ("-decoupled" if self.method == "fusedspacefed" and self.variant == "decoupled" else "")
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
            "device": "cpu",
            "num-threads": max(1, int(self.cpus_per_site)),
            "task-aware": self.variant != "decoupled",
            "results-dir": str(results_dir),
            "run-name": self.name,
            "keep-checkpoints": 1,
        }
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
    methods = _split(plan.get("methods", "fusedspacefed,fedavg"), str)
    variants = _split(plan.get("variants", "task-aware"), str)
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
        extra=tuple(sorted(extra.items())),
    )
    runs: list[RunSpec] = []
    for dataset, partition in itertools.product(datasets, partitions):
        # a pathological partition has no alpha: one run per seed, not one per alpha
        part_alphas = alphas if partition.startswith("dirichlet") else alphas[:1]
        for alpha, seed, method in itertools.product(part_alphas, seeds, methods):
            for variant in variants if method == "fusedspacefed" else ["task-aware"]:
                if True:
                    runs.append(
                        RunSpec(
                            method=method,
                            variant=variant,
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
    for key in ("grid", "results-dir", "dry-run", "child", "only", "max-runs"):
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
    run_dir = results_dir / spec.name
    if (run_dir / "summary.json").exists():
        return "done"
    return "partial" if run_dir.exists() else "new"


def clear_partial(results_dir: Path, spec: RunSpec) -> None:
    """An interrupted run is redone from scratch: its folder (and site state) goes."""
    run_dir = results_dir / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)


def rounds_done(results_dir: Path, spec: RunSpec) -> int:
    path = results_dir / spec.name / "metrics.jsonl"
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


# -- one run, in a child process ------------------------------------------------------------


def child_main(spec_json: str) -> int:
    """Run one simulation in this process (called in the child)."""
    payload = json.loads(spec_json)
    from flwr.simulation import run_simulation

    import client_app.app as client
    from server_app.app import create_server_app

    run_simulation(
        server_app=create_server_app(payload["run_config"]),
        client_app=client.app,
        num_supernodes=int(payload["sites"]),
        backend_config={"client_resources": {"num_cpus": payload["cpus_per_site"], "num_gpus": 0}},
    )
    summary = Path(payload["run_config"]["results-dir"]) / payload["run_config"]["run-name"] / "summary.json"
    return 0 if summary.exists() else 1


def child_env(spec: RunSpec) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(max(1, int(spec.cpus_per_site)))
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAY_DEDUP_LOGS": "0"})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_run(results_dir: Path, spec: RunSpec) -> tuple[subprocess.Popen, Any]:
    clear_partial(results_dir, spec)
    run_dir = results_dir / spec.name
    run_dir.mkdir(parents=True)
    payload = {"run_config": spec.run_config(results_dir), "sites": spec.sites, "cpus_per_site": spec.cpus_per_site}
    log = open(run_dir / "run.log", "w")  # noqa: SIM115 - closed by the caller when the child ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sweep", "--child", json.dumps(payload)],
        cwd=ROOT,
        env=child_env(spec),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its Ray processes form one group we can stop together
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


# -- the driver --------------------------------------------------------------------------


def sweep(runs: list[RunSpec], results_dir: Path, max_runs: int | None = None) -> dict[str, int]:
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
    if max_runs is not None:
        todo = todo[:max_runs]
    console.print(f"{len(runs)} runs in the grid: {skipped} done already, {len(todo)} to run -> {results_dir}")
    counts = {"done": 0, "failed": 0, "skipped": skipped}
    log_path = results_dir / "sweep.jsonl"
    results_dir.mkdir(parents=True, exist_ok=True)
    total_rounds = sum(s.rounds for s in todo)
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
        finished_rounds = 0
        for spec in todo:
            partial = run_state(results_dir, spec) == "partial"
            progress.update(task, current=spec.name + (" (redo: was interrupted)" if partial else ""))
            started = time.time()
            proc, log = start_run(results_dir, spec)
            try:
                while proc.poll() is None:
                    time.sleep(2)
                    progress.update(task, completed=finished_rounds + rounds_done(results_dir, spec))
            except BaseException:
                stop(proc)
                raise
            finally:
                log.close()
            ok = proc.returncode == 0 and run_state(results_dir, spec) == "done"
            counts["done" if ok else "failed"] += 1
            finished_rounds += spec.rounds
            seconds = time.time() - started
            with open(log_path, "a") as handle:
                handle.write(json.dumps({"run": spec.name, "ok": ok, "seconds": round(seconds, 1)}) + "\n")
            if not ok:
                progress.console.print(
                    f"[red]failed[/red] {spec.name} (exit {proc.returncode}); see {results_dir / spec.name / 'run.log'}"
                )
            else:
                progress.console.print(f"[green]done[/green] {spec.name} in {seconds:.0f} s")
            if not progress.console.is_terminal:  # a log file gets no live bar: one status line per run
                progress.console.print(status_line(progress.tasks[0], counts, skipped, len(runs)))
            progress.update(
                task, completed=finished_rounds, runs=f"runs {skipped + counts['done'] + counts['failed']}/{len(runs)}"
            )
    console.print(f"sweep finished: {counts}")
    return counts


def status_line(task: Any, counts: dict[str, int], skipped: int, total: int) -> str:
    done = skipped + counts["done"] + counts["failed"]
    left = task.total - task.completed
    speed = task.completed / task.elapsed if task.elapsed and task.completed else None
    eta = f"{left / speed / 60:.0f} min" if speed else "?"
    return f"  runs {done}/{total}, rounds {task.completed:.0f}/{task.total:.0f}, ETA {eta}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="TOML grid file ([defaults] and [[plan]] tables)")
    p.add_argument("--methods", help="comma list (fusedspacefed,fedavg,fedprox,scaffold,fedbn)")
    p.add_argument("--variants", help="fusedspacefed variants: task-aware,decoupled")
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
    if args.dry_run:
        for spec in runs:
            print(f"{run_state(results_dir, spec):8s} {spec.name}")
        print(f"{len(runs)} runs, {sum(s.rounds for s in runs)} rounds")
        return 0
    counts = sweep(runs, results_dir, args.max_runs)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
