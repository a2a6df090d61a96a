"""The one reader of a run folder, `<results-dir>/<run-name>/`: its file names, and the
reading of `config.json`, `metrics.jsonl` and `summary.json`.

`server_app/results.py` writes these files; everything that reads them (the comparison,
tracking's plots, the reports, the sweep, diagnose, every benchmark and a site loading a
global model) reads them here, so a layout change or a clearer error lands in one place.
A missing or unreadable file is a `RunFolderError` naming the file (and the line, for
metrics.jsonl), never a bare `JSONDecodeError` from deep inside a report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PARTITION_FILE = "partition.json"


class RunFolderError(ValueError):
    """A run folder's file is missing or is not what the project writes."""


def read_json(path: Path) -> dict[str, Any]:
    """One JSON object file of a run folder."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist: is {path.parent} a run folder (results/<run-name>)?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, one per round (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist: is {path.parent} a run folder (results/<run-name>)?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} cannot be read: {exc}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFolderError(f"{path}, line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise RunFolderError(f"{path}, line {number}: a {type(row).__name__}, not a round's row")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class RunFolder:
    """One run's folder. Each accessor reads its file afresh (runs in progress change)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def is_run(self) -> bool:
        """A run started here (its config is written before the first round)."""
        return self.config_path.exists()

    @property
    def finished(self) -> bool:
        """The run wrote its summary, which it does only at its end."""
        return self.summary_path.exists()

    def config(self) -> dict[str, Any]:
        return read_json(self.config_path)

    def rows(self) -> list[dict[str, Any]]:
        """Every round's row; a run that has not finished a round has none."""
        return read_rows(self.metrics_path) if self.metrics_path.exists() else []

    def rounds_done(self) -> int:
        return len(self.rows())

    def summary(self) -> dict[str, Any]:
        return read_json(self.summary_path)

    def partition(self) -> dict[str, Any]:
        """The sites' class counts (simulation), or {} where the run has none."""
        path = self.path / PARTITION_FILE
        return read_json(path) if path.exists() else {}


def run_folders(results_dir: Path) -> list[RunFolder]:
    """The run folders directly under `results_dir` (sorted by name; none if it is absent)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    return [RunFolder(p) for p in sorted(results_dir.iterdir()) if p.is_dir() and (p / CONFIG_FILE).exists()]
