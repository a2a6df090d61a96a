"""The writer of a run's folder: config.json, metrics.jsonl, summary.json, final model
(core/run_folder.py names the files and reads them).

Every file is written atomically (temporary file, then rename) so an interrupted run
never leaves a half-written file behind.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from core.data_report import MAJORITY_KEY, majority_class
from core.files import atomic_write_bytes
from core.methods import TIMELINE_RECORD
from core.run_folder import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())


class RunResults:
    """Writes one run's files under `<results-dir>/<run-name>/`."""

    def __init__(self, results_dir: str | Path, run_name: str) -> None:
        self.dir = Path(results_dir) / run_name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / METRICS_FILE

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.dir / CONFIG_FILE, config)

    def write_rounds(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl with all rounds so far (atomic; rows are small)."""
        text = "".join(json.dumps(_clean(r)) + "\n" for r in rows)
        atomic_write_bytes(self.metrics_path, text.encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json: `summarise(rows)` and what the run adds to it."""
        atomic_write_json(self.dir / SUMMARY_FILE, summary)

    def write_timeline(self, server_round: int, exchange: Any, final: bool = False) -> None:
        """Append one line per reply of an exchange to timeline.jsonl: when the server
        pushed, when it pulled the reply, and the site's own marks (epoch seconds)."""
        lines = []
        for msg in exchange.replies:
            node = msg.metadata.src_node_id
            marks = msg.content.metric_records.get(TIMELINE_RECORD)
            lines.append(
                {
                    "round": server_round,
                    "phase": "final-evaluate" if final else msg.metadata.message_type,
                    "node": node,
                    "push_start": exchange.push_start,
                    "push_done": exchange.push_done,
                    "pulled": exchange.arrived.get(node),
                    **(dict(marks) if marks is not None else {}),
                }
            )
        with open(self.dir / "timeline.jsonl", "a") as handle:
            handle.writelines(json.dumps(_clean(line)) + "\n" for line in lines)

    def write_model(self, state: dict[str, torch.Tensor], name: str = "global_model.pt") -> Path:
        path = self.dir / name
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return path


SUMMARY_KEYS = (
    "global_acc_mean",
    "global_acc_worst",
    "global_acc_first5",
    "local_acc_mean",
    "macro_f1",
    "balanced_acc",
    "auc",
    "gamma",
    MAJORITY_KEY,
)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final round, best round on the test split (optimistic) and on the validation split."""
    evaluated = [r for r in rows if r.get("global_acc_mean") is not None]
    privacy = privacy_spent(rows)
    if not evaluated:
        return {"rounds": len(rows), "final": None, "best_by_test": None, "best_by_val": None, **privacy}

    def pick(row: dict[str, Any], how: str) -> dict[str, Any]:
        return {"round": row["round"], "selected_by": how, **{k: row.get(k) for k in SUMMARY_KEYS}}

    def score(key: str):
        return lambda r: -math.inf if r.get(key) is None or not math.isfinite(r[key]) else r[key]

    warning = {"warning": majority_warning(evaluated[-1])} if majority_class(evaluated[-1]) else {}
    return {
        "rounds": len(rows),
        "final": pick(evaluated[-1], "last evaluated round"),
        "best_by_test": pick(
            max(evaluated, key=score("global_acc_mean")), "highest global_acc_mean on the test split (optimistic)"
        ),
        "best_by_val": pick(max(evaluated, key=score("val_acc_mean")), "highest val_acc_mean on the validation split"),
        "reference_selection": reference_selection(evaluated),
        **warning,
        **privacy,
    }


def majority_warning(row: dict[str, Any]) -> str:
    return (
        f"round {row['round']}'s global accuracy {row['global_acc_mean']:.4f} equals the test split's majority-class "
        f"share ({MAJORITY_KEY}): the model predicts the most common class, it learnt nothing beyond the class prior"
    )


def privacy_spent(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"dp_epsilon": ...}` after the last noised round (strategies/privacy.py), or nothing."""
    spent = [r["dp_epsilon"] for r in rows if isinstance(r.get("dp_epsilon"), int | float)]
    return {"dp_epsilon": spent[-1], "dp_noised_rounds": len(spent)} if spent else {}


def reference_selection(evaluated: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The number the reference code reports (method.md section 7): the best, over all
    evaluated rounds, of the mean test accuracy of the first 5 sites. Optimistic: the round
    is chosen on the test split itself."""
    scored = [
        r for r in evaluated if isinstance(r.get("global_acc_first5"), float) and math.isfinite(r["global_acc_first5"])
    ]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["global_acc_first5"])
    return {
        "round": best["round"],
        "acc": best["global_acc_first5"],
        "selected_by": "best over rounds of the mean test accuracy of the first 5 sites (optimistic; the reference "
        "code's reported number)",
    }
