"""The published claim, cell by cell: the campaign of benchmarks/claim-grid.toml beside the
published numbers (method.md section 6), as a markdown section for RESULTS.md.

    .venv/bin/python -m benchmarks.claim_report                           # prints the section
    .venv/bin/python -m benchmarks.claim_report --out benchmarks/RESULTS-claim.md

Per cell (dataset, partition) and method, over the seeds it has: the paper's selection (the
reference code's reported number: best round on the test split of the first 5 sites'
mean, `reference_selection` in summary.json), the final round and the best round by
validation; then FusedSpaceFed - FedAvg paired by seed, with a 95 % interval (Student's t
with n - 1 degrees of freedom) and whether it is separated from zero. Health sits in the
cells: worst-site R^2 and input dependence (last round), the BatchNorm gap, and "at majority
class" where a run's selected accuracy is the test split's majority share. Gamma is shown
only where it was measured ("—" elsewhere). A verdict per cell closes it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from benchmarks.sweep import DEFAULT_DATA, all_runs
from core.methods import BASELINE, DEFAULT_METHOD, METHODS, PUBLISHED
from core.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "claim-grid.toml"
RESULTS = ROOT / "evidence" / "claim"


@dataclass
class Run:
    seed: int
    paper: float  # best round on the test split, first 5 sites (the published selection)
    final: float
    best_val: float
    r2_worst: float | None
    dependence_worst: float | None
    bn_gap: float | None
    gamma: float | None
    rounds: int


@dataclass
class Cell:
    dataset: str
    partition: str
    spread: str
    runs: dict[str, list[Run]] = field(default_factory=lambda: defaultdict(list))


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    for row in reversed(rows):
        if isinstance(row.get(key), int | float):
            return float(row[key])
    return None


def read_run(run_dir: Path, seed: int) -> Run | None:
    """A finished run (summary.json present), or None."""
    run = RunFolder(run_dir)
    if not run.finished:
        return None
    summary, rows = run.summary(), run.rows()
    paper = summary.get("reference_selection", {}).get("acc")
    if paper is None:
        paper = summary["best_by_test"]["global_acc_mean"]
    return Run(
        seed=seed,
        paper=100 * paper,
        final=100 * summary["final"]["global_acc_mean"],
        best_val=100 * summary["best_by_val"]["global_acc_mean"],
        r2_worst=_last(rows, "rec_r2_worst"),
        dependence_worst=_last(rows, "rec_dependence_worst"),
        bn_gap=_last(rows, "bn_gap"),
        gamma=_last(rows, "gamma"),
        rounds=len(rows),
    )


def majority_share(dataset: str, data_root: Path = DEFAULT_DATA) -> float:
    """The test split's majority class, in percent (what a model that learnt nothing scores)."""
    with np.load(data_root / f"{dataset}.npz") as npz:
        labels = npz["test_labels"].reshape(-1)
    return 100 * np.bincount(labels).max() / len(labels)


def label(method: str, variant: str, protocol: str) -> str:
    if protocol == "reference":
        return f"{method}-ref" + (f"-{variant}" if METHODS[method].uses_encoder else "")
    return method + ("-decoupled" if variant == "decoupled" else "")


# the comparison the published table makes: FusedSpaceFed's warm-up variant against FedAvg,
# both under the reference protocol; and each published method's row label
CLAIM = (label(DEFAULT_METHOD, "warmup", "reference"), label(BASELINE, "warmup", "reference"))
PAPER_METHOD = {
    label(method, "warmup", "reference"): method
    for table in PUBLISHED.values()
    for row in table.values()
    for method in row
}


def collect(results: Path, grid: Path = GRID) -> list[Cell]:
    plans = tomllib.loads(grid.read_text())
    specs = all_runs([{**plans.get("defaults", {}), **plan} for plan in plans["plan"]])
    cells: dict[tuple[str, str, str], Cell] = {}
    for spec in specs:
        spread = f"k{spec.classes_per_client}" if spec.partition == "pathological" else f"a{spec.alpha:g}"
        cell = cells.setdefault((spec.dataset, spec.partition, spread), Cell(spec.dataset, spec.partition, spread))
        run = read_run(results / spec.name, spec.seed)
        if run is not None:
            cell.runs[label(spec.method, spec.variant, spec.protocol)].append(run)
    return list(cells.values())


def interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of a 95 % t interval, or None with fewer than 2 pairs."""
    if len(diffs) < 2:
        return None
    mean = statistics.mean(diffs)
    half = scipy.stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def scores_majority(run: Run, majority: float) -> bool:
    """The run's selected accuracy is the test split's majority share (it learnt nothing)."""
    return abs(run.paper - majority) < 0.01


def health(runs: list[Run], majority: float) -> str:
    """The health flags of a method's runs, for its table cell."""
    flags = []
    r2 = [r.r2_worst for r in runs if r.r2_worst is not None]
    if r2:
        flags.append(f"R² {min(r2):.2f}" + (" **broken**" if min(r2) < 0 else ""))
        dep = [r.dependence_worst for r in runs if r.dependence_worst is not None]
        if dep:
            flags.append(f"dep {min(dep):.2f}" + (" **none**" if min(dep) < 0.05 else ""))
    gaps = [r.bn_gap for r in runs if r.bn_gap is not None]
    if gaps:
        flags.append(f"BN gap {100 * statistics.mean(gaps):+.1f}")
    at_majority = sum(scores_majority(r, majority) for r in runs)
    if at_majority:
        flags.append(f"**at majority class** in {at_majority}/{len(runs)}")
    return "; ".join(flags) or "—"


def verdict(
    claim: tuple[float, float, float] | None, published_lead: float | None, n: int, at_majority: bool = False
) -> str:
    """One plain sentence for a cell. `at_majority`: both methods' selected accuracy is the
    majority class in every paired seed; a zero-width interval then says nothing of the claim."""
    if at_majority:
        return f"undecided: both methods score the majority class in all {n} paired seeds, so this cell cannot compare them"
    if claim is None:
        return f"undecided: {n} paired seed(s), no interval yet"
    mean, low, high = claim
    if low > 0:
        return f"reproduced in direction: FusedSpaceFed ahead by {mean:+.2f} (95 % interval {low:+.2f} to {high:+.2f})"
    if published_lead is not None and high < published_lead:
        return (
            f"not reproduced: the published lead {published_lead:+.2f} lies above the 95 % interval "
            f"({low:+.2f} to {high:+.2f}) of {n} paired seeds"
        )
    return (
        f"undecided: the 95 % interval ({low:+.2f} to {high:+.2f}) of {n} paired seeds holds 0 and the published lead"
    )


def render(cells: list[Cell], data_root: Path = DEFAULT_DATA) -> str:
    out = [
        "## The published claim, tested where it is made",
        "",
        "The seed table's protocol (10 sites, 50 rounds, 3 local epochs, 2 warm-up epochs, batch 256, every round "
        "evaluated) from benchmarks/claim-grid.toml; the lean engine; `python -m benchmarks.claim_report` makes "
        "this section. Accuracy in %, mean ± sd over seeds. *Paper's selection*: best round on the test split "
        "(first 5 sites, the reference code's reported number: optimistic); *final*: round 50; *best by val*: "
        "the round with the best validation accuracy. Health (last round, worst over seeds): worst-site R² and "
        "input dependence of the fused reconstruction (**broken** below 0), the BatchNorm gap in points, and runs "
        "whose selected accuracy is the test split's majority share. Gamma: — where not measured (`measure-gamma` "
        "off).",
        "",
    ]
    for cell in cells:
        if not cell.runs:
            continue
        majority = majority_share(cell.dataset, data_root)
        scheme = "2 classes per site" if cell.partition == "pathological" else f"Dirichlet {cell.spread[1:]}"
        table = "pathological" if cell.partition == "pathological" else "dirichlet"
        published = PUBLISHED.get(table, {}).get(cell.dataset, {})
        out += [f"### {cell.dataset}, {scheme} (majority class {majority:.2f} %)", ""]
        out += [
            "| method | seeds | paper's selection | final | best by val | published | health | Gamma |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, runs in sorted(cell.runs.items(), key=lambda item: item[0] not in CLAIM):
            runs = sorted(runs, key=lambda r: r.seed)
            pub = published.get(PAPER_METHOD.get(name, ""))
            gammas = [r.gamma for r in runs if r.gamma is not None]
            out.append(
                f"| {name} | {','.join(str(r.seed) for r in runs)} | {_mean_sd([r.paper for r in runs])} | "
                f"{_mean_sd([r.final for r in runs])} | {_mean_sd([r.best_val for r in runs])} | "
                f"{pub if pub is not None else '—'} | {health(runs, majority)} | {_mean_sd(gammas)} |"
            )
        fsf = {r.seed: r for r in cell.runs.get(CLAIM[0], [])}
        avg = {r.seed: r for r in cell.runs.get(CLAIM[1], [])}
        seeds = sorted(set(fsf) & set(avg))
        lead = (published[DEFAULT_METHOD] - published[BASELINE]) if published else None
        out += ["", "FusedSpaceFed (warm-up) − FedAvg, reference protocol, paired by seed:", ""]
        out += [
            "| selection | per seed | mean | 95 % interval | separated from 0 | published |",
            "|---|---|---|---|---|---|",
        ]
        claim = None
        for selection in ("paper", "final", "best_val"):
            diffs = [getattr(fsf[s], selection) - getattr(avg[s], selection) for s in seeds]
            ci = interval(diffs)
            if selection == "paper":
                claim = ci
            words = {"paper": "paper's selection", "final": "final", "best_val": "best by val"}[selection]
            out.append(
                f"| {words} | {', '.join(f'{d:+.2f}' for d in diffs) or '—'} | "
                f"{(f'{statistics.mean(diffs):+.2f}' if diffs else '—')} | "
                f"{(f'{ci[1]:+.2f} to {ci[2]:+.2f}' if ci else '—')} | "
                f"{('yes' if ci and (ci[1] > 0 or ci[2] < 0) else 'no') if ci else '—'} | "
                f"{(f'{lead:+.2f}' if lead is not None and selection == 'paper' else '')} |"
            )
        learnt_nothing = bool(seeds) and all(scores_majority(r, majority) for s in seeds for r in (fsf[s], avg[s]))
        out += ["", f"**Verdict:** {verdict(claim, lead, len(seeds), learnt_nothing)}.", ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--grid", type=Path, default=GRID)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = render(collect(args.results_dir, args.grid), args.data_root)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
