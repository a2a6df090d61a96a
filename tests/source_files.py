"""The project's own files, for tests that read the source: what git tracks or would track
(`git ls-files --cached --others --exclude-standard`), so that nothing a run writes into the
checkout (`.flwr-home/`'s installed app copies, `.venv/`, `results/`, `benchmarks/runs/`) is
read as source. Outside a git checkout (an unpacked archive) the same folders are left out
by name."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: what runs and installs write into a checkout (.gitignore lists them too)
RUN_OUTPUTS = (".flwr-home", ".venv", "results", "data", "build", ".gpu-site", ".git", "__pycache__")


def project_files(root: Path = REPO, suffix: str = ".py") -> list[Path]:
    """Every project file under `root` whose name ends with `suffix`, run outputs excluded."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout.split("\0")
        paths = [root / name for name in listed if name.endswith(suffix)]
    except (OSError, subprocess.CalledProcessError):
        paths = [
            p
            for p in root.rglob(f"*{suffix}")
            if not any(part in RUN_OUTPUTS or part.startswith("runs") for part in p.relative_to(root).parts[:-1])
        ]
    return sorted(p for p in paths if p.is_file())
