"""Device selection from the `device` config key and CPU thread settings."""

from __future__ import annotations

import torch

from core.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is visible; use device = 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def set_threads(num_threads: int) -> None:
    """0 keeps PyTorch's choice (which follows OMP_NUM_THREADS, set per Ray actor)."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
