"""Server checkpoints: everything a run needs to continue after its last finished round.

After every round the ServerApp writes `<results-dir>/<run-name>/checkpoints/round-<N>.pt`
(atomically; the newest `keep-checkpoints` are kept, 0 keeps all): the global shared
arrays, the round, the strategy's own state (e.g. SCAFFOLD's server control variate),
the metrics rows so far, and the configuration. Round 0 is the initial model, so a run
that fails in its first round can be resumed too.

A run resumes with `resume-from = "latest"` (the run's newest checkpoint; the run name
is `run-name`, or the default name derived from the configuration) or with the path of
a checkpoint file. It keeps the checkpoint's run name, so every site finds its private
state again, and continues to `num-server-rounds` with the same results layout.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import ConfigError, RunConfig
from core.files import atomic_write_bytes, prune_round_files, round_file, round_files
from server_app.server_data import run_name_for

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"

#: keys that may differ between a checkpoint's configuration and the resumed run's
MAY_CHANGE = frozenset(
    {
        "num-server-rounds",
        "resume-from",
        "round-timeout",
        "min-replies",
        "keep-checkpoints",
        "device",
        "num-threads",
        "eval-every",
        "data-root",
        "download",
        "results-dir",
        "run-name",
        "track-tensorboard",
        "track-mlflow",
    }
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to a different run."""


@dataclass
class Checkpoint:
    server_round: int
    run_name: str
    config: dict[str, Any]
    arrays: dict[str, torch.Tensor]
    strategy_state: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    path: Path | None = None


def checkpoint_dir(results_dir: str | Path, run_name: str) -> Path:
    return Path(results_dir) / run_name / CHECKPOINT_DIR


def checkpoint_path(results_dir: str | Path, run_name: str, server_round: int) -> Path:
    return round_file(checkpoint_dir(results_dir, run_name), server_round)


def list_checkpoints(results_dir: str | Path, run_name: str) -> list[tuple[int, Path]]:
    return round_files(checkpoint_dir(results_dir, run_name))


def write_checkpoint(
    cfg: RunConfig,
    server_round: int,
    arrays: dict[str, torch.Tensor],
    strategy_state: dict[str, np.ndarray],
    rows: list[dict[str, Any]],
) -> Path:
    """Write the checkpoint of `server_round` atomically and prune old ones."""
    payload = {
        "format": FORMAT,
        "round": server_round,
        "run_name": cfg.run_name,
        "config": cfg.to_mapping(),
        "arrays": {k: v.detach().cpu().contiguous() for k, v in arrays.items()},
        "strategy_state": {k: torch.from_numpy(np.array(v, copy=True)) for k, v in strategy_state.items()},
        "rows": json.loads(json.dumps(rows, default=float)),  # plain Python values only (weights_only load)
        "written_at": time.time(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = checkpoint_path(cfg.results_dir, cfg.run_name, server_round)
    atomic_write_bytes(path, buffer.getvalue())
    # a re-run from an earlier round abandons later checkpoints of the old timeline
    prune_round_files(checkpoint_dir(cfg.results_dir, cfg.run_name), cfg.keep_checkpoints, after=server_round)
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT:
            raise ValueError(f"unknown checkpoint format {payload.get('format')!r}")
        return Checkpoint(
            server_round=int(payload["round"]),
            run_name=str(payload["run_name"]),
            config=dict(payload["config"]),
            arrays=dict(payload["arrays"]),
            strategy_state={k: v.numpy() for k, v in payload["strategy_state"].items()},
            rows=list(payload["rows"]),
            path=path,
        )
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
            "it was left in place. Resume from another checkpoint in the same folder."
        ) from exc


def find_resume_checkpoint(cfg: RunConfig, in_deployment: bool = False) -> Checkpoint | None:
    """The checkpoint `resume-from` names (None when it is empty); `in_deployment`: which
    default run name `latest` looks under (server_data.run_name_for)."""
    if not cfg.resume_from:
        return None
    if cfg.resume_from == LATEST:
        run_name = run_name_for(cfg, in_deployment)
        found = list_checkpoints(cfg.results_dir, run_name)
        if not found:
            raise CheckpointError(
                f"resume-from = 'latest' but run {run_name!r} has no checkpoint in "
                f"{checkpoint_dir(cfg.results_dir, run_name)}; start it without resume-from"
            )
        return read_checkpoint(found[-1][1])
    return read_checkpoint(cfg.resume_from)


def refuse_stale_private_resume(cfg: RunConfig, checkpoint: Checkpoint) -> None:
    """Under differential privacy, resume only from the run's newest checkpoint.

    A checkpoint holds the noise generator and the accountant as they were after its round,
    so re-running later rounds from an older one would draw the same noise again: with a
    different set of replying sites, a site holding both releases recovers an absent site's
    clipped update exactly (n1*M1 - n2*M2), and the abandoned releases would be missing from
    epsilon. The newest checkpoint is never followed by a released model (a round's model is
    sent only after its checkpoint is written), so resuming from it reuses nothing
    (docs/privacy.md, "Resume")."""
    if not (cfg.dp_clip_norm > 0 and cfg.dp_noise_multiplier > 0):
        return
    newer = [r for r, _ in list_checkpoints(cfg.results_dir, cfg.run_name) if r > checkpoint.server_round]
    if newer:
        raise CheckpointError(
            f"cannot resume {checkpoint.path} (round {checkpoint.server_round}) under differential privacy: the run "
            f"has a newer checkpoint (round {max(newer)}), and re-running rounds would release the same noise twice; "
            'resume with resume-from = "latest"'
        )


def resumed_config(cfg: RunConfig, checkpoint: Checkpoint) -> RunConfig:
    """The run configuration to continue with: the checkpoint's run name, and a clear
    error when a setting that shapes the results differs from the checkpoint's."""
    if cfg.run_name and cfg.run_name != checkpoint.run_name:
        raise ConfigError(
            f"run-name {cfg.run_name!r} differs from the checkpoint's run {checkpoint.run_name!r} "
            f"({checkpoint.path}); leave run-name empty or set it to {checkpoint.run_name!r}"
        )
    current = cfg.to_mapping()
    differ = sorted(k for k, v in checkpoint.config.items() if k not in MAY_CHANGE and k in current and current[k] != v)
    if differ:
        detail = ", ".join(f"{k}: checkpoint {checkpoint.config[k]!r}, now {current[k]!r}" for k in differ)
        raise ConfigError(f"cannot resume {checkpoint.path}: the configuration differs ({detail})")
    if checkpoint.server_round > cfg.num_server_rounds:
        raise ConfigError(
            f"checkpoint {checkpoint.path} is from round {checkpoint.server_round}, beyond num-server-rounds = "
            f"{cfg.num_server_rounds}"
        )
    return cfg.replace(run_name=checkpoint.run_name)
