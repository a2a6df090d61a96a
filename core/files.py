"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

Readers see the old file or the new one, never half of one, even if the process dies.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable: without it a power cut can bring back the old file."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform without directory descriptors
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the file itself is synced
    finally:
        os.close(fd)


# -- files numbered by round (server checkpoints, a site's state history) -------------


def round_file(folder: Path, server_round: int) -> Path:
    return Path(folder) / f"round-{server_round:04d}.pt"


def round_files(folder: Path) -> list[tuple[int, Path]]:
    """`round-<N>.pt` files in `folder` as (N, path), oldest first."""
    found = []
    for path in Path(folder).glob("round-*.pt"):
        try:
            found.append((int(path.stem.split("-", 1)[1]), path))
        except ValueError:
            continue
    return sorted(found)


def prune_round_files(folder: Path, keep: int, after: int | None = None) -> None:
    """Delete the files of rounds after `after` (a timeline that was abandoned when a
    round ran again), then all but the newest `keep` (0 keeps all)."""
    if after is not None:
        for server_round, path in round_files(folder):
            if server_round > after:
                path.unlink(missing_ok=True)
    if keep > 0:
        kept = round_files(folder)
        for _, path in kept[: max(0, len(kept) - keep)]:
            path.unlink(missing_ok=True)
