"""Side-by-side comparison of finished runs: a printed table and one plot.

    python -m server_app.compare results/demo-fusedspacefed results/demo-fedavg [--out comparison.png]

Reads each run's metrics.jsonl and summary.json (nothing else), prints per run the final
and best-by-validation global accuracy, the worst site, local accuracy and the test
split's majority-class share (the accuracy of always predicting the most common class,
from partition.json's class counts when present), and plots global test accuracy per
round for all runs on one figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.console import console
from core.files import atomic_write_bytes
from core.run_folder import METRICS_FILE, RunFolder, RunFolderError


def _label(run: RunFolder) -> str:
    if run.is_run:
        return f"{run.config().get('method', run.name)} ({run.name})"
    return run.name


def _pct(value: Any) -> str:
    return f"{100 * value:.2f} %" if isinstance(value, int | float) else "-"


def comparison(run_dirs: list[Path], majority: float | None = None) -> list[dict[str, Any]]:
    """One summary per run (for the table and for tests)."""
    out = []
    for run_dir in run_dirs:
        run = RunFolder(run_dir)
        if not run.metrics_path.exists():
            raise RunFolderError(f"{run.path} has no {METRICS_FILE}: is it a run folder (results/<run-name>)?")
        all_rows = run.rows()
        rows = [r for r in all_rows if r.get("global_acc_mean") is not None]
        summary = run.summary() if run.finished else {}
        final = rows[-1] if rows else {}
        out.append(
            {
                "run": _label(run),
                "rounds": len(all_rows),
                "final": final.get("global_acc_mean"),
                "worst site": final.get("global_acc_worst"),
                "local": final.get("local_acc_mean"),
                "best-val": (summary.get("best_by_val") or {}).get("global_acc_mean"),
                "past majority": None if majority is None or not rows else final.get("global_acc_mean", 0) > majority,
                "curve": [(r["round"], r["global_acc_mean"]) for r in rows],
                **health(all_rows),
            }
        )
    return out


HEALTH_COLUMNS = ("R2 r1 warm-up", "R2 final", "dependence", "BN gap")


def health(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Is the run's evidence sound? The worst site's reconstruction R^2 after round 1's
    warm-up and in the last round, the worst input dependence of x_rec (FusedSpaceFed), and
    the BatchNorm gap (recomputed minus averaged statistics, local shards) of the last
    evaluated round. None where the run has no such metric."""

    def last(key: str) -> Any:
        return next((r[key] for r in reversed(rows) if isinstance(r.get(key), int | float)), None)

    first = rows[0] if rows else {}
    return {
        "R2 r1 warm-up": first.get("rec_r2_warmup_worst"),
        "R2 final": last("rec_r2_worst"),
        "dependence": last("rec_dependence_worst"),
        "BN gap": last("bn_gap"),
    }


def _num(value: Any, scale: float = 1.0, unit: str = "") -> str:
    return (
        f"{scale * value:+.1f}{unit}"
        if unit and isinstance(value, int | float)
        else (f"{scale * value:.2f}" if isinstance(value, int | float) else "-")
    )


def plot(results: list[dict[str, Any]], out: Path, majority: float | None, title: str) -> Path:
    import io

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for result in results:
        if result["curve"]:
            xs, ys = zip(*result["curve"])
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=result["run"])
    if majority is not None:
        ax.axhline(100 * majority, color="grey", ls="--", lw=1, label="majority class (always predict it)")
    ax.set(xlabel="round", ylabel="global test accuracy (%)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def majority_share(dataset: str, data_root: str) -> float | None:
    """The test split's most common class share (what a model that learnt nothing scores)."""
    try:
        import numpy as np

        from partitions.medmnist_data import load_medmnist

        labels = load_medmnist(dataset, data_root, download=False)["test"].labels
        if labels.ndim != 1:
            return None
        return float(np.bincount(labels).max() / len(labels))
    except Exception:  # no data file here: the table goes without it
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server_app.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (results/<run-name>)")
    p.add_argument("--out", help="the plot (default: comparison.png beside the first run)")
    args = p.parse_args(argv)
    run_dirs = [Path(r) for r in args.runs]
    try:
        config = RunFolder(run_dirs[0]).config()
        majority = majority_share(config["dataset"], config["data-root"])
        results = comparison(run_dirs, majority)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rich.table import Table

    title = f"{config['dataset']}, {config['partition']}, {len(results[0]['curve'])} evaluated rounds"
    table = Table(title=title)
    for column in ("run", "final", "best-val", "worst site", "local", "past majority", *HEALTH_COLUMNS):
        table.add_column(column)
    for r in results:
        past = "-" if r["past majority"] is None else ("yes" if r["past majority"] else "no")
        table.add_row(
            r["run"],
            _pct(r["final"]),
            _pct(r["best-val"]),
            _pct(r["worst site"]),
            _pct(r["local"]),
            past,
            _num(r["R2 r1 warm-up"]),
            _num(r["R2 final"]),
            _num(r["dependence"]),
            _num(r["BN gap"], 100, " pts"),
        )
    console.print(table)
    console.print(
        "[dim]health (worst site): R2 of x_rec = D(E_i(x)) after round 1's warm-up and in the last round, and the "
        "input dependence of x_rec (near 0: a constant image, the fused space carries nothing); BN gap: local "
        "accuracy with BatchNorm statistics recomputed at the site minus with the averaged ones[/dim]"
    )
    if majority is not None:
        console.print(f"majority class of the test split: {100 * majority:.2f} % (a model that learnt nothing)")
    out = plot(results, Path(args.out) if args.out else run_dirs[0].parent / "comparison.png", majority, title)
    console.print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
