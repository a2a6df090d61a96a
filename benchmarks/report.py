"""Turn the sweep's runs into benchmarks/RESULTS.md and benchmarks/figures/*.png.

    .venv/bin/python -m benchmarks.report                      # runs under benchmarks/runs/
    .venv/bin/python -m benchmarks.report --results-dir DIR --out benchmarks/RESULTS.md

Only finished runs (summary.json present) enter the tables; runs still going are counted.
A cell is (dataset, partition, alpha or k, method, variant, rounds, local epochs, norm); its
numbers are the mean +- sample standard deviation over the seeds it has. `norm` (BatchNorm
handling: "batch-recal", "batch", "group") is named in a cell's title only where it is not
"batch", which runs older than the key were (their titles stay as they were). A method whose
default is scored its own way (FuseFL: the calibrated model's own statistics, `norm = "batch"`)
sits in the recipe's cells with both its default runs and its `batch-recal` ones, the latter
labelled "(batch-recal: ...)". Accuracy is the
global accuracy of method.md section 4 (official test split; FusedSpaceFed through each
site's own encoder, mean over sites), in percent.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.methods import BASELINE, DEFAULT_METHOD, METHODS, PUBLISHED, PUBLISHED_ROUNDS, RECIPE_NORM, contract_for
from core.run_folder import run_folders

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "runs"
DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_FIGURES = ROOT / "benchmarks" / "figures"


def _labels() -> dict[str, str]:
    """Run labels (method, FusedSpaceFed's variant, protocol) -> how tables name them, from
    the method contracts: the standard protocol first, then the reference protocol."""
    labels: dict[str, str] = {}
    for name, contract in METHODS.items():
        if contract.uses_encoder:
            labels[name] = f"{contract.label} (task-aware)"
            labels[f"{name}-decoupled"] = f"{contract.label} (decoupled)"
        else:
            labels[name] = contract.label
        if contract.default_norm != RECIPE_NORM:  # scored its own way by default; the recipe's way is an option
            labels[f"{name}-{RECIPE_NORM}"] = f"{contract.label} ({RECIPE_NORM}: statistics recomputed at each site)"
    for name, contract in METHODS.items():  # the reference protocol (method.md section 7)
        if contract.uses_encoder:
            for variant, words in (("no-warmup", "no warm-up"), ("warmup", "warm-up"), ("l2sp", "L2-SP")):
                labels[f"{name}-ref-{variant}"] = f"{contract.label}, reference protocol, {words}"
        else:
            labels[f"{name}-ref"] = f"{contract.label}, reference protocol"
    return labels


LABELS = _labels()
ORDER = list(LABELS)
FSF, FEDAVG = DEFAULT_METHOD, BASELINE
FSF_DEC = f"{FSF}-decoupled"
DEFAULT_NORM = "batch"  # runs older than the `norm` key used plain BatchNorm
# health of a run, from its last row that has the key (training metrics are in every row,
# evaluation ones in evaluated rows only): FusedSpaceFed's autoencoder, and BatchNorm's statistics
R2_WORST, DEPENDENCE, BN_GAP = "rec_r2_worst", "rec_dependence", "bn_gap"


@dataclass
class Run:
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    partition: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Method key with the protocol and the FusedSpaceFed variant."""
        m, c = self.config["method"], self.config
        fused = m in METHODS and METHODS[m].uses_encoder
        if c.get("protocol", "standard") == "reference":
            if not fused:
                return f"{m}-ref"
            if c.get("l2sp-lambda", 0.0) > 0:
                return f"{m}-ref-l2sp"
            return f"{m}-ref-" + ("warmup" if c.get("warmup-epochs", 0) > 0 else "no-warmup")
        if self.scored_its_own_way and self.norm == RECIPE_NORM:
            return f"{m}-{RECIPE_NORM}"
        return f"{m}-decoupled" if fused and not c.get("task-aware", True) else m

    @property
    def scored_its_own_way(self) -> bool:
        """The method's default evaluation is not the recipe's (FuseFL: the calibrated model's
        own BatchNorm statistics, not statistics recomputed at each site)."""
        m = self.config["method"]
        return m in METHODS and METHODS[m].default_norm != RECIPE_NORM

    def reference_acc(self) -> float | None:
        pick = self.summary.get("reference_selection") or {}
        value = pick.get("acc")
        return None if value is None else 100.0 * value

    @property
    def spread(self) -> str:
        p = self.config["partition"]
        if p.startswith("dirichlet"):
            return f"alpha={self.config['alpha']:g}"
        return f"k={self.config['classes-per-client']}" if p == "pathological" else "iid"

    @property
    def norm(self) -> str:
        return self.config.get("norm") or DEFAULT_NORM

    @property
    def cell_norm(self) -> str:
        """The normalisation of the cell the run belongs to: its own, except for a method
        scored its own way, whose default and the recipe's both sit in the recipe's cells
        (their labels say which statistics scored them)."""
        if self.scored_its_own_way and self.norm in (RECIPE_NORM, METHODS[self.config["method"]].default_norm):
            return RECIPE_NORM
        return self.norm

    @property
    def group(self) -> tuple:
        """Everything but method and seed: the runs compared in one table (runs of another
        BatchNorm recipe never average with the old ones)."""
        c = self.config
        return (c["dataset"], c["partition"], self.spread, c["num-server-rounds"], c["local-epochs"], self.cell_norm)

    def acc(self, which: str) -> float | None:
        pick = self.summary.get(which) or {}
        value = pick.get("global_acc_mean")
        return None if value is None else 100.0 * value

    def final_row(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def last(self, key: str) -> float | None:
        """The value of `key` in the last row that has it (None where no row has it)."""
        for row in reversed(self.rows):
            value = row.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None


def load_runs(results_dir: Path) -> tuple[list[Run], list[str]]:
    """Finished runs, and the names of unfinished ones."""
    runs, unfinished = [], []
    for run in run_folders(results_dir):
        if not run.finished:
            unfinished.append(run.name)
            continue
        runs.append(
            Run(name=run.name, config=run.config(), summary=run.summary(), rows=run.rows(), partition=run.partition())
        )
    return runs, unfinished


# -- statistics ---------------------------------------------------------------------------


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None for fewer than 2 values) and count, ignoring None/NaN."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def paired_difference(a: dict[int, float | None], b: dict[int, float | None]) -> tuple[float | None, float | None, int]:
    """Mean and std of a - b over the seeds both have (the FusedSpaceFed - FedAvg difference)."""
    seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    return mean_std([a[s] - b[s] for s in seeds])


def signed(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    text = f"{mean:+.2f}"
    return f"{text} ± {std:.2f}" if std is not None else text


def by_seed(runs: list[Run], which: str) -> dict[int, float | None]:
    return {int(r.config["seed"]): r.acc(which) for r in runs}


def published(dataset: str, partition: str, spread: str, method: str) -> float | None:
    # every FusedSpaceFed variant is compared with the one published number
    method = next((m for m in METHODS if method == m or method.startswith(m + "-")), method)
    if partition.startswith("dirichlet") and spread == "alpha=0.05":
        return PUBLISHED["dirichlet"].get(dataset, {}).get(method)
    if partition == "pathological" and spread == "k=2":
        return PUBLISHED["pathological"].get(dataset, {}).get(method)
    return None


def pub(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


# -- tables -------------------------------------------------------------------------------


def cells(runs: list[Run]) -> dict[tuple, dict[str, list[Run]]]:
    table: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        table[run.group][run.label].append(run)
    return table


def norm_suffix(norm: str) -> str:
    """How a cell names its BatchNorm recipe: nothing for plain BatchNorm (the old runs)."""
    return "" if norm == DEFAULT_NORM else f", norm {norm}"


def norm_slug(norm: str) -> str:
    """The same in a file name (old runs' figures keep their names)."""
    return "" if norm == DEFAULT_NORM else f"-norm-{norm}"


def group_title(group: tuple) -> str:
    dataset, partition, spread, rounds, epochs, norm = group
    return f"{dataset}, {partition} ({spread}), {rounds} rounds x {epochs} local epochs{norm_suffix(norm)}"


def health(runs: list[Run] | None) -> dict[str, str]:
    """The health columns of one method's runs, mean ± sd over seeds ("—" where no run has them):
    the autoencoder's R² at its worst site, its dependence (near 0 = a constant output image),
    and the BatchNorm gap in accuracy points (recalibrated − averaged running statistics)."""
    runs = runs or []
    gap = mean_std([None if (g := r.last(BN_GAP)) is None else 100.0 * g for r in runs])
    return {
        "r2_worst": fmt(*mean_std([r.last(R2_WORST) for r in runs])[:2], digits=3),
        "dependence": fmt(*mean_std([r.last(DEPENDENCE) for r in runs])[:2], digits=3),
        "bn_gap": signed(*gap[:2]),
    }


def headline_table(groups: dict[tuple, dict[str, list[Run]]]) -> list[str]:
    lines = [
        "| dataset | partition | seeds | rounds | FusedSpaceFed final | FedAvg final | **difference final** "
        "| FusedSpaceFed best-val | FedAvg best-val | **difference best-val** | decoupled − FedAvg final "
        "| published FusedSpaceFed | published FedAvg | published difference "
        "| R² worst site (FusedSpaceFed) | dependence (FusedSpaceFed) | BN gap (pts) FusedSpaceFed "
        "| BN gap (pts) FedAvg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in sorted(groups):
        methods = groups[group]
        if FSF not in methods or FEDAVG not in methods:
            continue
        dataset, partition, spread, rounds, _, norm = group
        fsf, avg = methods[FSF], methods[FEDAVG]
        row = [dataset, f"{partition} {spread}{norm_suffix(norm)}", f"{len(fsf)} / {len(avg)}", str(rounds)]
        for which in ("final", "best_by_val"):
            a, b = by_seed(fsf, which), by_seed(avg, which)
            row += [fmt(*mean_std(list(a.values()))[:2]), fmt(*mean_std(list(b.values()))[:2])]
            row.append(f"**{signed(*paired_difference(a, b)[:2])}**")
        dec = methods.get(FSF_DEC)
        row.append(signed(*paired_difference(by_seed(dec, "final"), by_seed(avg, "final"))[:2]) if dec else "—")
        p_fsf, p_avg = (published(dataset, partition, spread, m) for m in (FSF, FEDAVG))
        row += [pub(p_fsf), pub(p_avg), f"{p_fsf - p_avg:+.2f}" if p_fsf is not None and p_avg is not None else "—"]
        h_fsf, h_avg = health(fsf), health(avg)
        row += [h_fsf["r2_worst"], h_fsf["dependence"], h_fsf["bn_gap"], h_avg["bn_gap"]]
        lines.append("| " + " | ".join(row) + " |")
    return lines


_SHARED_BYTES: dict[tuple, float] = {}


def upload_megabytes(run: Run) -> float | None:
    """What one site uploaded over the run (MB of arrays): the rounds' `upload_bytes` where the
    run recorded them, else the method's shared arrays (its contract) times the rounds."""
    recorded = [r["upload_bytes"] for r in run.rows if isinstance(r.get("upload_bytes"), int | float)]
    if recorded:
        return sum(recorded) / 1e6
    c = run.config
    key = (c["method"], c["dataset"], c.get("image-size", 28), c.get("protocol", "standard"), c.get("head-blocks", 0))
    if key not in _SHARED_BYTES:
        from core.config import RunConfig
        from models import build_run_model
        from partitions.inputs import input_spec

        known = {f.replace("_", "-") for f in RunConfig.__dataclass_fields__}
        cfg = RunConfig.from_mapping({k: v for k, v in c.items() if k in known})
        model = build_run_model(
            cfg,
            input_spec(cfg.dataset, cfg.image_size, cfg.rules.reference_inputs),
            seed=0,
            contract=contract_for(cfg.method),
        )
        state = model.state_dict()
        shared = METHODS[cfg.method].shared_keys(model, cfg.head_blocks)
        _SHARED_BYTES[key] = float(sum(state[k].numel() * state[k].element_size() for k in shared))
    return _SHARED_BYTES[key] * len(run.rows) / 1e6


def _size(megabytes: float) -> str:
    return f"{megabytes:.2f}" if megabytes >= 0.1 else f"{megabytes:.4f}"


def side_by_side(groups: dict[tuple, dict[str, list[Run]]]) -> list[str]:
    """Every method of the recipe's cells (BatchNorm recalibrated at the sites, three or more
    methods), one table per dataset: final global and local accuracy per partition, and what
    one site uploads over the run."""
    chosen = sorted(g for g in groups if g[5] == "batch-recal" and len(groups[g]) >= 3)
    lines: list[str] = []
    for dataset in sorted({g[0] for g in chosen}):
        cells_ = [g for g in chosen if g[0] == dataset]
        header = ["method"]
        for g in cells_:
            header += [f"{g[1]} {g[2]}, {g[3]} r: global", "local"]
        header.append("upload per site over the run")
        lines += [f"**{dataset}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label in [m for m in ORDER if any(m in groups[g] for g in cells_)]:
            row, uploads = [LABELS[label]], set()
            for group in cells_:
                runs = groups[group].get(label, [])
                if not runs:
                    row += ["—", "—"]
                    continue
                finals = [(r.summary.get("final") or {}) for r in runs]
                g = mean_std([r.acc("final") for r in runs])
                local = mean_std([100.0 * f["local_acc_mean"] for f in finals if f.get("local_acc_mean") is not None])
                row += [f"{fmt(*g[:2])} (n={len(runs)})", fmt(*local[:2])]
                uploads.add((group[3], upload_megabytes(runs[0])))
            row.append(", ".join(f"{_size(mb)} MB ({r} r)" for r, mb in sorted(uploads) if mb is not None) or "—")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def rounds_list(runs: list[Run], which: str) -> str:
    rounds = [str((r.summary.get(which) or {}).get("round", "?")) for r in sorted(runs, key=lambda r: r.config["seed"])]
    return ",".join(rounds)


def cell_table(group: tuple, methods: dict[str, list[Run]]) -> list[str]:
    dataset, partition, spread, _, _, _ = group
    lines = [
        "| method | seeds | final acc | best-val acc (round per seed) | best-test acc (optimistic) | worst site (final) "
        "| local acc (final) | macro-F1 (final) | balanced acc (final) | AUC (final) | Gamma (final round) | published "
        "| R² worst site | dependence | BN gap (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ORDER:
        runs = methods.get(label)
        if not runs:
            continue

        def final(key: str, scale: float = 100.0, runs=runs) -> str:
            values = [(r.summary.get("final") or {}).get(key) for r in runs]
            return fmt(*mean_std([None if v is None else scale * v for v in values])[:2])

        gamma = mean_std([r.final_row().get("gamma") for r in runs])
        h = health(runs)
        lines.append(
            "| "
            + " | ".join(
                [
                    LABELS[label],
                    f"{len(runs)} ({','.join(str(r.config['seed']) for r in sorted(runs, key=lambda r: r.config['seed']))})",
                    fmt(*mean_std([r.acc("final") for r in runs])[:2]),
                    f"{fmt(*mean_std([r.acc('best_by_val') for r in runs])[:2])} (r {rounds_list(runs, 'best_by_val')})",
                    fmt(*mean_std([r.acc("best_by_test") for r in runs])[:2]),
                    final("global_acc_worst"),
                    final("local_acc_mean"),
                    final("macro_f1"),
                    final("balanced_acc"),
                    final("auc"),
                    fmt(*gamma[:2], digits=3),
                    pub(published(dataset, partition, spread, label)),
                    h["r2_worst"],
                    h["dependence"],
                    h["bn_gap"],
                ]
            )
            + " |"
        )
    return lines


def gamma_table(groups: dict[tuple, dict[str, list[Run]]]) -> list[str]:
    """FusedSpaceFed's decomposition Gamma_fused = Gamma_orig + R + Phi at the final round."""
    lines = [
        "| cell | variant | seeds | Gamma_fused | Gamma_orig | R | Phi | Phi < −R (fusion lowers Gamma) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in sorted(groups):
        for label in (FSF, FSF_DEC):
            runs = groups[group].get(label)
            if not runs:
                continue
            stats = {
                k: mean_std([r.final_row().get(k) for r in runs])
                for k in ("gamma", "gamma_orig", "gamma_R", "gamma_Phi")
            }
            phi, big_r = stats["gamma_Phi"][0], stats["gamma_R"][0]
            lines.append(
                f"| {group_title(group)} | {LABELS[label]} | {len(runs)} | "
                + " | ".join(fmt(*stats[k][:2], digits=3) for k in ("gamma", "gamma_orig", "gamma_R", "gamma_Phi"))
                + f" | {'yes' if phi is not None and big_r is not None and phi < -big_r else 'no'} |"
            )
    return lines


# -- protocol -----------------------------------------------------------------------------

# the recipe's keys (runs older than them show "—")
RECIPE_KEYS = (
    "norm",
    "lr-schedule",
    "ae-optimizer",
    "rec-loss",
    "ae-lr-ramp",
    "warmup-min-steps",
    "shared-encoder-init",
)
PROTOCOL_KEYS = (
    "num-server-rounds",
    "local-epochs",
    "warmup-epochs",
    "batch-size",
    "lr",
    "lr-ae",
    "momentum",
    "weight-decay",
    "lambda-rec",
    "ae-arch",
    "dz",
    "proximal-mu",
    "weighted",
    "fraction-train",
    "eval-every",
    "gamma-batch-size",
    "image-size",
    "device",
    "num-threads",
    *RECIPE_KEYS,
)


def protocol(runs: list[Run]) -> list[str]:
    values: dict[str, set] = defaultdict(set)
    for run in runs:
        for key in PROTOCOL_KEYS:
            absent = key in RECIPE_KEYS and key not in run.config
            values[key].add("—" if absent else json.dumps(run.config.get(key)))
    sites = {int(r.rows[0].get("num_replies", 0)) for r in runs if r.rows}
    per_dataset_rounds: dict[str, set] = defaultdict(set)
    for run in runs:
        per_dataset_rounds[run.config["dataset"]].add(run.config["num-server-rounds"])
    lines = [
        f"- Sites: {', '.join(map(str, sorted(sites)))} simulated sites (Flower {flwr_version()}; Flower's Ray "
        "simulation or the sweep's lean engine, which writes the same metrics for the same seed, tests/test_lean.py; "
        "one process per run), all sampled every round.",
        "- Rounds per dataset (every method of one table has the same number): "
        + "; ".join(f"{d} {', '.join(map(str, sorted(r)))}" for d, r in sorted(per_dataset_rounds.items()))
        + (
            ". **The published protocol uses 50 rounds; two shared CPU cores forced fewer here wherever a "
            "table says less than 50.**"
            if any(min(r) < PUBLISHED_ROUNDS for r in per_dataset_rounds.values())
            else "."
        ),
    ]
    for key in PROTOCOL_KEYS[1:]:
        shown = ", ".join(sorted(values[key]))
        lines.append(f"- `{key}`: {shown}")
    assigned = {
        (r.config["dataset"], r.config["partition"], r.spread, r.config["seed"]): r.partition
        for r in runs
        if r.partition
    }
    if assigned:
        parts = []
        for (dataset, partition, spread, seed), p in sorted(assigned.items()):
            parts.append(
                f"{dataset} {partition} {spread} seed {seed}: {p.get('assigned_samples')} of "
                f"{p.get('total_train_samples')}"
            )
        lines.append("- Training samples assigned by the partition (ours assigns all): " + "; ".join(parts) + ".")
    return lines


def flwr_version() -> str:
    try:
        import flwr

        return flwr.__version__
    except Exception:  # pragma: no cover - report without flwr installed
        return "?"


# -- figures ------------------------------------------------------------------------------


def _curve(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    per_round: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for row in run.rows:
            value = row.get(key)
            if value is not None and math.isfinite(value):
                per_round[int(row["round"])].append(value)
    xs = sorted(per_round)
    means = [statistics.fmean(per_round[x]) for x in xs]
    stds = [statistics.stdev(per_round[x]) if len(per_round[x]) > 1 else 0.0 for x in xs]
    return xs, means, stds


def slug(group: tuple) -> str:
    dataset, partition, spread, rounds, epochs, norm = group
    return f"{dataset}-{partition}-{spread.replace('=', '')}-r{rounds}-e{epochs}{norm_slug(norm)}"


def figures(groups: dict[tuple, dict[str, list[Run]]], out_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, Path]] = []
    for group in sorted(groups):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label in ORDER:
            runs = groups[group].get(label)
            if not runs:
                continue
            for ax, key, scale in ((axes[0], "global_acc_mean", 100.0), (axes[1], "gamma", 1.0)):
                xs, means, stds = _curve(runs, key)
                if not xs:
                    continue
                m = [scale * v for v in means]
                s = [scale * v for v in stds]
                ax.plot(xs, m, marker="o", ms=3, label=f"{LABELS[label]} (n={len(runs)})")
                ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15)
        axes[0].set(xlabel="round", ylabel="global test accuracy (%)", title=group_title(group)[:70])
        axes[1].set(xlabel="round", ylabel="Gamma (gradient dissimilarity)", title="Gamma per round")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"accuracy-per-round-{slug(group)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((f"Accuracy and Gamma per round: {group_title(group)}", path))

    # accuracy and Gamma vs alpha, one figure per dataset (Dirichlet partitions), like the published PathMNIST plots
    by_dataset: dict[tuple, dict[str, dict[float, list[Run]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for (dataset, partition, spread, rounds, epochs, norm), methods in groups.items():
        if not partition.startswith("dirichlet"):
            continue
        alpha = float(spread.split("=")[1])
        for label, runs in methods.items():
            by_dataset[(dataset, partition, rounds, epochs, norm)][label][alpha] += runs
    for (dataset, partition, rounds, epochs, norm), methods in sorted(by_dataset.items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label in ORDER:
            if label not in methods:
                continue
            alphas = sorted(methods[label])
            acc = [mean_std([r.acc("final") for r in methods[label][a]]) for a in alphas]
            gam = [mean_std([r.final_row().get("gamma") for r in methods[label][a]]) for a in alphas]
            for ax, stats in ((axes[0], acc), (axes[1], gam)):
                points = [(a, st) for a, st in zip(alphas, stats) if st[0] is not None]  # Gamma is optional
                if not points:
                    continue
                ax.errorbar(
                    [a for a, _ in points],
                    [st[0] for _, st in points],
                    yerr=[st[1] or 0.0 for _, st in points],
                    marker="o",
                    capsize=3,
                    label=LABELS[label],
                )
        title = f"{dataset}, {partition}, {rounds} rounds x {epochs} epochs{norm_suffix(norm)}"
        axes[0].set(xlabel="Dirichlet alpha", ylabel="final global test accuracy (%)", xscale="log", title=title)
        axes[1].set(xlabel="Dirichlet alpha", ylabel="Gamma (final round)", xscale="log", title="Gamma vs alpha")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"vs-alpha-{dataset}-{partition}-r{rounds}-e{epochs}{norm_slug(norm)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        alphas_seen = {a for runs_by_alpha in methods.values() for a in runs_by_alpha}
        note = " (a single alpha so far: one point per method)" if len(alphas_seen) == 1 else ""
        made.append((f"Accuracy and Gamma vs alpha: {title}{note}", path))
    return made


# -- the file -----------------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "?"


def centralised_table(centralised: dict[str, Any]) -> list[str]:
    """The pooled-data reference of `benchmarks/centralised.py`: can the model learn at all, and how fast."""
    lines = [
        "## Centralised reference (pooled training data, same model and optimiser)",
        "",
        "`.venv/bin/python -m benchmarks.centralised`: the pre-activation ResNet-20 trained on all training images "
        "of a dataset at once with SGD (the settings per row), no autoencoder; test accuracy (%) after the epochs "
        "shown. A check that the model, data and evaluation learn, and how many SGD steps that takes; not a "
        "federated result.",
        "",
        "| dataset | settings | training images | majority share | test accuracy by epoch (SGD steps) | best | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, result in sorted(centralised.items()):
        points = result["points"]
        curve = ", ".join(f"{p['epoch']} ({p['steps']}): {100 * p['acc']:.1f}" for p in points)
        best = max(points, key=lambda p: p["acc"])
        share = result.get("majority_share")
        c = result.get("config")
        settings = (
            f"lr {c.get('lr')} {c.get('lr_schedule', 'constant')}, batch {c.get('batch_size')}, "
            f"{c.get('norm', 'batch')} norm, {c.get('epochs')} epochs"
            if c
            else "—"
        )
        lines.append(
            f"| {dataset} | {settings} | {result['train_samples']} | {'—' if share is None else f'{100 * share:.2f}'} | {curve} "
            f"| {100 * best['acc']:.2f} (epoch {best['epoch']}) | {result['seconds']:.0f} |"
        )
    return lines


def reference_table(groups: dict[tuple, dict[str, list[Run]]]) -> list[str]:
    """published | reference protocol on our engine | our protocol, per cell and method."""
    lines = [
        "Per cell, the published number beside both protocols run on this engine (mean ± sd over seeds). "
        "**reference selection** = what the reference code reports: the best, over the evaluated rounds, of the mean "
        "test accuracy of the first 5 sites (chosen on the test split itself, so optimistic); **final** = the last "
        "round, all sites; **best-val** = the round with the best validation accuracy, all sites.",
        "",
        "| cell | method | protocol | seeds | published | reference selection | final | best-val |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in sorted(groups):
        methods = groups[group]
        if not any(label.split("-")[1:2] == ["ref"] for label in methods):
            continue
        dataset, partition, spread, rounds, _, norm = group
        for label in ORDER:
            runs = methods.get(label)
            if not runs:
                continue
            seeds = ",".join(str(r.config["seed"]) for r in sorted(runs, key=lambda r: r.config["seed"]))
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"{dataset} {partition} {spread}, {rounds} rounds{norm_suffix(norm)}",
                        LABELS[label],
                        "reference" if "-ref" in label else "standard",
                        f"{len(runs)} ({seeds})",
                        pub(published(dataset, partition, spread, label)),
                        fmt(*mean_std([r.reference_acc() for r in runs])[:2]),
                        fmt(*mean_std([r.acc("final") for r in runs])[:2]),
                        fmt(*mean_std([r.acc("best_by_val") for r in runs])[:2]),
                    ]
                )
                + " |"
            )
    return lines if len(lines) > 4 else []


def render(
    runs: list[Run],
    unfinished: list[str],
    figure_list: list[tuple[str, Path]],
    out: Path,
    notes: str,
    centralised: dict[str, Any] | None = None,
    grid: str = "benchmarks/grid.toml",
) -> str:
    groups = cells(runs)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `.venv/bin/python -m benchmarks.report` from the runs of `benchmarks/sweep.py` "
        f"(grid: `{grid}`; code at commit {git_commit()}). "
        f"{len(runs)} finished runs" + (f", {len(unfinished)} unfinished (not in the tables)." if unfinished else "."),
        "",
        "Accuracy: global accuracy (%) on the official **test** split, mean over sites (FusedSpaceFed: through each "
        "site's own encoder with the global decoder and classifier; baselines: the global model; FedBN: each site's "
        "own BatchNorm). Cells: mean ± sample standard deviation over seeds. **final** = the last round; "
        "**best-val** = the evaluated round with the highest validation-split accuracy (the round is given per seed); "
        "best-test (selected on the test split itself) is optimistic and shown for comparison only. "
        "The difference is FusedSpaceFed (task-aware) − FedAvg, paired by seed, whatever its sign.",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## Protocol", "", *protocol(runs), ""] if runs else []
    lines += ["## Headline: FusedSpaceFed − FedAvg", "", *headline_table(groups), ""]
    overview = side_by_side(groups)
    if overview:
        lines += [
            "## Methods side by side (final round: global / local accuracy %, mean ± sd over seeds)",
            "",
            "Global: each site's model (its private parts, or Ditto's personal model, FuseFL's fused model) on the "
            "official test split, mean over sites; local: the same model on the site's own held-out shard. Upload: "
            "the arrays one site sends over the whole run (from the rounds' `upload_bytes`, else the method's shared "
            "arrays times the rounds).",
            "",
            *overview,
            "",
        ]
    reference = reference_table(groups)
    if reference:
        lines += [
            "## Reference protocol beside ours (published | reference protocol | our protocol)",
            "",
            *reference,
            "",
        ]
    lines += ["## All methods per cell", ""]
    for group in sorted(groups):
        lines += [f"### {group_title(group)}", "", *cell_table(group, groups[group]), ""]
    lines += [
        "## Gamma decomposition (FusedSpaceFed, final round)",
        "",
        "Gamma_fused = Gamma_orig + R + Phi (method.md section 3), measured on the global model before local "
        "training, on a fixed 256-sample batch per site.",
        "",
        *gamma_table(groups),
        "",
    ]
    if centralised:
        lines += [*centralised_table(centralised), ""]
    if figure_list:
        lines += ["## Figures", ""]
        for caption, path in figure_list:
            rel = path.relative_to(out.parent) if path.is_relative_to(out.parent) else path
            lines += [f"**{caption}**", "", f"![{caption}]({rel.as_posix()})", ""]
    if unfinished:
        lines += ["## Unfinished runs", "", *[f"- {n}" for n in unfinished], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help="folder(s) of runs, comma-separated")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--figures", default=str(DEFAULT_FIGURES))
    p.add_argument("--notes", default="", help="a Markdown file whose text goes below the introduction")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument(
        "--grid", default="benchmarks/grid.toml", help="the grid file the runs came from (named in the text)"
    )
    p.add_argument(
        "--centralised", default=str(DEFAULT_OUT.parent / "centralised.json"), help="benchmarks/centralised.py's output"
    )
    args = p.parse_args(argv)
    runs, unfinished = [], []
    for folder in args.results_dir.split(","):  # e.g. benchmarks/runs (local) and evidence/reference-grid (committed)
        found, open_runs = load_runs(Path(folder))
        known = {r.name for r in runs}
        runs += [r for r in found if r.name not in known]
        unfinished += [n for n in open_runs if n not in known | {r.name for r in found}]
    out = Path(args.out).resolve()
    figure_list = [] if args.no_figures or not runs else figures(cells(runs), Path(args.figures).resolve())
    notes = Path(args.notes).read_text() if args.notes else ""
    centralised_file = Path(args.centralised)
    centralised = json.loads(centralised_file.read_text()) if centralised_file.exists() else None
    out.write_text(render(runs, unfinished, figure_list, out, notes, centralised, grid=args.grid))
    print(f"{out}: {len(runs)} runs, {len(unfinished)} unfinished, {len(figure_list)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
