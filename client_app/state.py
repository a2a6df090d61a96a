"""A site's private state: the arrays that never leave it (encoder, control variates).

Two typed sections: `model` (the private state_dict entries: E_i, FedBN's BatchNorm) and
`extras` (non-model arrays a trainer keeps, e.g. SCAFFOLD's c_i). Kept in `context.state`
(fast, lives as long as the run on this node) and on the site's disk (survives a
SuperNode restart), under `<state-dir>/<run-name>/<site-name>/`.
Disk writes are atomic (write a temporary file, fsync, rename), so a crash mid-write
leaves the previous state intact. A file that cannot be read is reported and left in
place for inspection.

`private_state.pt` holds the newest state and the round that wrote it. The states it
replaces are kept as `history/round-<N>.pt` (the newest `keep` of them), so that when
the server re-runs a round (a run resumed from a checkpoint) the site starts that
round from the state it had before it, exactly as the first time.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from core.files import atomic_write_bytes, prune_round_files, round_file, round_files

MODEL_RECORD = "private-model"  # array record in context.state: the private model section
EXTRAS_RECORD = "private-extras"  # array record in context.state: the extras section
ROUND_KEY = "private-state-round"  # config record in context.state: the round the sections are from
FILE_NAME = "private_state.pt"
HISTORY_DIR = "history"
FORMAT = 2
_V1_EXTRA_PREFIX = "extra:"  # format 1 kept extras in the model mapping behind this prefix


@dataclass
class PrivateArrays:
    """What a site keeps to itself: private model entries and trainer extras."""

    model: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.model or self.extras)

    def cpu(self) -> PrivateArrays:
        def clean(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().contiguous() for k, v in d.items()}

        return PrivateArrays(clean(self.model), clean(self.extras))

    def flat(self) -> dict[str, torch.Tensor]:
        """Both sections in one mapping, extras named `extras/<name>` (for digests and checks)."""
        return {**self.model, **{f"extras/{k}": v for k, v in self.extras.items()}}

    def digest(self) -> str:
        return state_digest(self.flat())


def node_private_state(node_state: RecordDict) -> PrivateArrays | None:
    """The private arrays a node holds in memory (`context.state`); None before its first round."""
    records = node_state.array_records
    if MODEL_RECORD not in records:
        return None
    extras = records[EXTRAS_RECORD].to_torch_state_dict() if EXTRAS_RECORD in records else {}
    return PrivateArrays(records[MODEL_RECORD].to_torch_state_dict(), extras)


def forget_node_state(node_state: RecordDict) -> None:
    """Drop the in-memory copy, as a SuperNode restart does (the disk copy stays)."""
    for key in (MODEL_RECORD, EXTRAS_RECORD):
        if key in node_state.array_records:
            del node_state[key]


class StateError(RuntimeError):
    """A site's private state on disk is unreadable."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _safe(name: str) -> str:
    """`name` as one folder name: never "." or ".." (a run named ".." once put the state,
    and the chmod, one level above the state folder), nor hidden."""
    return re.sub(r"^\.+", "_", re.sub(r"[^A-Za-z0-9._-]+", "_", name)) or "unnamed"


def state_digest(arrays: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests mean bit-identical state."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        tensor = arrays[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _tensors(value: object, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise ValueError(f"{name!r} is not a mapping of tensors")
    return value


def read_state_file(path: Path) -> tuple[PrivateArrays, int]:
    """(private arrays, round) from a state file; StateError (file left in place) if unreadable.
    Files of format 1 (one mapping, extras behind a name prefix) are read too."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") == FORMAT:
            arrays = PrivateArrays(_tensors(saved["model"], "model"), _tensors(saved["extras"], "extras"))
        else:
            flat = _tensors(saved["arrays"], "arrays")
            arrays = PrivateArrays(
                {k: v for k, v in flat.items() if not k.startswith(_V1_EXTRA_PREFIX)},
                {k[len(_V1_EXTRA_PREFIX) :]: v for k, v in flat.items() if k.startswith(_V1_EXTRA_PREFIX)},
            )
        server_round = int(saved.get("round", 0))
    except Exception as exc:
        raise StateError(
            f"private state file {path} is unreadable ({type(exc).__name__}: {_first_line(exc)}); it was left in "
            "place for inspection. Move it away to start this site afresh (its encoder will be re-initialised)."
        ) from exc
    return arrays, server_round


class PrivateState:
    def __init__(
        self, node_state: RecordDict, state_dir: str | Path, run_name: str, site_name: str, keep: int = 3
    ) -> None:
        self.node_state = node_state
        self.dir = Path(state_dir).expanduser() / _safe(run_name) / _safe(site_name)
        self.path = self.dir / FILE_NAME
        self.keep = keep  # history files kept (0: all)
        self.source = ""  # where the last load came from: "", "memory" or a file path
        self.loaded_round = 0

    def load(self, before_round: int | None = None) -> PrivateArrays | None:
        """The newest saved private arrays from a round before `before_round` (any round
        when None): from memory, else from disk, else None (first participation)."""
        self.source, self.loaded_round = "", 0

        def fits(server_round: int) -> bool:
            return before_round is None or server_round < before_round

        in_memory = node_private_state(self.node_state)
        memory_round = 0
        if in_memory is not None:
            remembered = self.node_state.config_records.get(ROUND_KEY, {})
            memory_round = int(remembered.get("round", 0))
            # another process serving this site (the warm worker, or the in-process path while
            # the worker was down) may have saved a newer state since: then the disk decides
            disk_unchanged = list(remembered.get("file", [])) == self._file_stamp()
            if fits(memory_round) and disk_unchanged:
                self.source, self.loaded_round = "memory", memory_round
                return in_memory
        if not self.path.exists():
            if in_memory is not None and fits(memory_round):
                self.source, self.loaded_round = "memory", memory_round
                return in_memory
            return None
        arrays, server_round = read_state_file(self.path)
        path = self.path
        if not fits(server_round):
            older = [(r, p) for r, p in self.history() if fits(r)]
            if not older:
                raise StateError(
                    f"this site's newest saved state ({self.path}, round {server_round}) is not older than round "
                    f"{before_round}, which the server is running again, and no older state is kept in "
                    f"{self.dir / HISTORY_DIR}; resume from a later checkpoint, or move {self.dir} away to start "
                    "this site afresh"
                )
            server_round, path = older[-1]
            arrays, server_round = read_state_file(path)
        if in_memory is not None and fits(memory_round) and memory_round > server_round:
            arrays, server_round, path = in_memory, memory_round, "memory"  # the newest by round wins
        self._remember(arrays, server_round)
        self.source, self.loaded_round = str(path), server_round
        return arrays

    def _file_stamp(self) -> list[int]:
        """The state file's identity (inode, modification time): it changes with every save,
        by whichever process saves."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return []
        return [int(info.st_ino), int(info.st_mtime_ns)]

    def history(self) -> list[tuple[int, Path]]:
        """Kept earlier states as (round, path), oldest first."""
        return round_files(self.dir / HISTORY_DIR)

    def save(self, arrays: PrivateArrays, server_round: int) -> None:
        """Keep in memory and write atomically to disk (the previous file goes to history)."""
        arrays = arrays.cpu()
        for folder in (self.dir.parent, self.dir):  # <run>/<site>: for the site's own user only, whatever the umask
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)  # the site's encoder and optimiser state
        self._archive_current(server_round)
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "round": server_round, "model": arrays.model, "extras": arrays.extras}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())
        self._remember(arrays, server_round)  # after the write: memory knows the file it matches

    def _remember(self, arrays: PrivateArrays, server_round: int) -> None:
        self.node_state.array_records[MODEL_RECORD] = ArrayRecord(arrays.model)
        self.node_state.array_records[EXTRAS_RECORD] = ArrayRecord(arrays.extras)
        self.node_state.config_records[ROUND_KEY] = ConfigRecord({"round": server_round, "file": self._file_stamp()})

    def _archive_current(self, new_round: int) -> None:
        """Keep the file about to be replaced as history/round-<N>.pt (a hard link, or a
        copy where links are not possible); then drop history beyond `keep`."""
        if not self.path.exists():
            return
        try:
            _, old_round = read_state_file(self.path)
        except StateError:  # keep an unreadable file for inspection rather than overwrite it
            os.replace(self.path, self.path.with_name(f"{FILE_NAME}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"))
            return
        if old_round != new_round:
            history = self.dir / HISTORY_DIR
            history.mkdir(mode=0o700, exist_ok=True)
            target = round_file(history, old_round)
            tmp = history / f".tmp-{os.getpid()}-{old_round}.pt"
            tmp.unlink(missing_ok=True)
            try:
                os.link(self.path, tmp)
            except OSError:
                shutil.copy2(self.path, tmp)
            os.replace(tmp, target)
        # history of rounds at or after the new one belongs to a timeline the server abandoned
        prune_round_files(self.dir / HISTORY_DIR, self.keep, after=new_round - 1)
