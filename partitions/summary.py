"""Label-distribution summary of a partitioning: a console table and a saved plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.run_folder import PARTITION_FILE


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(sites, classes) matrix of training-sample counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def summary_dict(counts: np.ndarray, total_samples: int, scheme: str, class_names: list[str]) -> dict:
    assigned = int(counts.sum())
    return {
        "scheme": scheme,
        "total_train_samples": total_samples,
        "assigned_samples": assigned,
        "unassigned_samples": total_samples - assigned,
        "class_names": class_names,
        "counts": counts.tolist(),
    }


def print_table(counts: np.ndarray, title: str, class_names: list[str]) -> None:
    """Sites as rows, classes as columns, with totals: the partitioning at a glance."""
    from rich.table import Table

    from core.console import console

    table = Table(title=title, show_lines=False)
    table.add_column("site", justify="right")
    for name in class_names:
        table.add_column(name[:10], justify="right")
    table.add_column("total", justify="right", style="bold")
    for i, row in enumerate(counts):
        table.add_row(str(i), *(str(int(v)) for v in row), str(int(row.sum())))
    table.add_row("all", *(str(int(v)) for v in counts.sum(0)), str(int(counts.sum())), style="bold")
    console.print(table)


def save_plot(counts: np.ndarray, path: Path, title: str, class_names: list[str]) -> None:
    """Stacked bar chart of class counts per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(counts) + 2), 4))
    bottom = np.zeros(len(counts))
    cmap = plt.get_cmap("tab20")
    for c in range(counts.shape[1]):
        ax.bar(np.arange(len(counts)), counts[:, c], bottom=bottom, color=cmap(c % 20), label=class_names[c][:18])
        bottom += counts[:, c]
    ax.set_xlabel("site")
    ax.set_ylabel("training samples")
    ax.set_title(title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(
    labels: np.ndarray, parts: list[np.ndarray], out_dir: Path, scheme: str, class_names: list[str], show: bool = True
) -> dict:
    """Print the table and write `partition.json` and `partition.png` into `out_dir`."""
    counts = label_counts(labels, parts, len(class_names))
    summary = summary_dict(counts, len(labels), scheme, class_names)
    title = f"{scheme}: {summary['assigned_samples']} of {len(labels)} training samples assigned"
    if show:
        print_table(counts, title, class_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PARTITION_FILE).write_text(json.dumps(summary, indent=1))
    save_plot(counts, out_dir / "partition.png", title, class_names)
    return summary
