"""Did a `flwr run` succeed? Its exit code does not say: the final status does.

    python -m core.run_status OUTPUT_OF_FLWR_RUN [--timeout SECONDS]

`flwr run . --stream` exits 0 when the ServerApp failed (Flower 1.42 only streams the logs),
so the wrappers (scripts/simulate.sh, and through it `make run` and `make published`) pass its
output here. This reads the run id from "Successfully started run <id>", asks the SuperLink for
the run's status (`flwr ls --run-id <id> --format json`) until it is `finished:*`, prints one
line and exits 0 for `finished:completed`, 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RUN_STARTED = re.compile(r"Successfully started run (\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_DETAILS = 400  # a failed ClientApp's details can hold a whole Ray traceback
COMPLETED = "finished:completed"


class RunStatusError(RuntimeError):
    """The run's status could not be read."""


def run_id_from(output: str) -> int | None:
    """The id `flwr run` printed when the SuperLink accepted the run (None: no run started)."""
    match = RUN_STARTED.search(output)
    return int(match.group(1)) if match else None


def flwr_command() -> str:
    """The `flwr` beside this interpreter (the project's virtualenv), else the one on PATH."""
    candidate = Path(sys.executable).parent / "flwr"
    return str(candidate) if candidate.exists() else "flwr"


def query_status(run_id: int) -> tuple[str, str]:
    """(status, details) of `run_id` from the SuperLink that `flwr` connects to by default."""
    proc = subprocess.run(
        [flwr_command(), "ls", "--run-id", str(run_id), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        payload = json.loads(proc.stdout)
        run = next(r for r in payload["runs"] if str(r["run-id"]) == str(run_id))
    except (json.JSONDecodeError, KeyError, StopIteration, TypeError):
        raise RunStatusError(
            f"flwr ls --run-id {run_id} gave no status (exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()[-300:]}"
        ) from None
    return str(run["status"]), str(run.get("status-details") or "")


def final_status(
    run_id: int,
    timeout: float = 60.0,
    poll: float = 1.0,
    query: Callable[[int], tuple[str, str]] = query_status,
) -> tuple[str, str]:
    """Wait (up to `timeout` s) until the run is finished; the stream can end a moment before
    the SuperLink records the final status."""
    deadline = time.monotonic() + timeout
    while True:
        status, details = query(run_id)
        if status.startswith("finished") or time.monotonic() >= deadline:
            return status, details
        time.sleep(poll)


def verdict(run_id: int | None, status: str, details: str) -> tuple[int, str]:
    """(exit code, one line) for a run's final status."""
    if run_id is None:
        return 1, "run failed: flwr run did not start a run (see its output above)"
    if status == COMPLETED:
        return 0, f"run {run_id}: {status}"
    details = " ".join(ANSI.sub("", details).split())
    if len(details) > MAX_DETAILS:
        details = details[: MAX_DETAILS - 3] + "..."
    reason = f" ({details})" if details else ""
    return 1, f"run {run_id} failed: {status}{reason}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="a file holding what `flwr run` printed")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the final status")
    args = parser.parse_args(argv)
    run_id = run_id_from(args.output.read_text(errors="replace"))
    status = details = ""
    if run_id is not None:
        try:
            status, details = final_status(run_id, args.timeout)
        except (RunStatusError, OSError, subprocess.TimeoutExpired) as exc:
            print(f"run {run_id}: cannot tell whether it succeeded: {exc}", file=sys.stderr)
            return 1
    code, line = verdict(run_id, status, details)
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
