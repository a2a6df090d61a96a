"""Wall-clock marks of one message at a site, sent back for the round-cost timeline.

The reply's `timeline` record holds epoch seconds: when this process started, when the
app's own imports began and ended, and the marks of the handler (data loaded, model
built, evaluated, trained, state saved, reply ready). `fresh` says whether this process
served a message before (a deployment's ClientApp process serves one; a simulation's
Ray actor or a warm site worker serves many). Timing only: nothing about the data.
"""

from __future__ import annotations

import os
import time

from client_app import IMPORT_STARTED

_served = 0


def process_started() -> float:
    """When this process started (Linux: /proc; elsewhere: the app's import start)."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as boot:
            btime = next(int(line.split()[1]) for line in boot if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return IMPORT_STARTED


class Timeline:
    """Marks of one message, in order."""

    def __init__(self, imported: float, via: str = "process", app_loaded: float | None = None) -> None:
        global _served
        self.marks: dict[str, float] = {
            "process_start": process_started(),
            "import_start": IMPORT_STARTED,
            "app_loaded": app_loaded or IMPORT_STARTED,  # the thin ClientApp module
            "import_done": imported,  # torch, data and model code (client_app.site)
            "handler_start": time.time(),
        }
        self.info = {"fresh": float(_served == 0), "worker": float(via == "worker"), "pid": float(os.getpid())}
        _served += 1

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def record(self) -> dict[str, float]:
        return {**self.marks, **self.info}
