"""A site's private state: the arrays that never leave it (encoder, control variates).

Kept in `context.state` (fast, lives as long as the run on this node) and on the
site's disk (survives a SuperNode restart). Disk writes are atomic (write a temporary
file, fsync, rename), so a crash mid-write leaves the previous state intact. A file
that cannot be read is reported and left in place for inspection.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict

RECORD_KEY = "private-state"
FILE_NAME = "private_state.pt"


class StateError(RuntimeError):
    """A site's private state on disk is unreadable."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "unnamed"


class PrivateState:
    def __init__(self, node_state: RecordDict, state_dir: str | Path, run_name: str, site_name: str) -> None:
        self.node_state = node_state
        self.path = Path(state_dir).expanduser() / _safe(run_name) / _safe(site_name) / FILE_NAME

    def load(self) -> dict[str, torch.Tensor] | None:
        """The last saved private arrays: from memory, else from disk, else None (first round)."""
        if RECORD_KEY in self.node_state.array_records:
            return self.node_state.array_records[RECORD_KEY].to_torch_state_dict()
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            arrays = saved["arrays"]
            if not isinstance(arrays, dict) or not all(isinstance(v, torch.Tensor) for v in arrays.values()):
                raise ValueError("'arrays' is not a mapping of tensors")
        except Exception as exc:
            raise StateError(
                f"private state file {self.path} is unreadable ({type(exc).__name__}: {_first_line(exc)}); it was left in place "
                "for inspection. Move it away to start this site afresh (its encoder will be re-initialised)."
            ) from exc
        self.node_state.array_records[RECORD_KEY] = ArrayRecord(arrays)
        return arrays

    def save(self, arrays: dict[str, torch.Tensor], server_round: int) -> None:
        """Keep in memory and write atomically to disk."""
        arrays = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
        self.node_state.array_records[RECORD_KEY] = ArrayRecord(arrays)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"arrays": arrays, "round": server_round}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
