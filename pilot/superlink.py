"""`flower-superlink` with a longer SQLite busy timeout (start-superlink.sh runs this).

Flower 1.41 opens its SQLite database with `busy_timeout = 5000` ms. On a busy machine
(the measured case: two cores shared by the SuperLink, its ServerApp and other work) a
writer can hold the lock longer than that; requests then fail with "database is
locked", and the SuperLink's SuperExec or a running ServerApp exits on the error. This
wrapper raises the timeout (PILOT_SQLITE_BUSY_TIMEOUT_MS, default 60000) and otherwise
runs flower-superlink unchanged, with the same arguments.
"""

from __future__ import annotations

import os
import sys


def raise_busy_timeout(milliseconds: int) -> bool:
    """Patch Flower's SQLite pragmas; False (and nothing changed) where they moved."""
    try:
        from flwr.supercore import sql_mixin
    except ImportError:
        return False
    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not pragmas or not any(name == "busy_timeout" for name, _ in pragmas):
        return False
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(milliseconds) if name == "busy_timeout" else value) for name, value in pragmas
    )
    return True


def main() -> int:
    milliseconds = int(os.environ.get("PILOT_SQLITE_BUSY_TIMEOUT_MS", "60000"))
    if not raise_busy_timeout(milliseconds):
        print("warning: this Flower version keeps its own SQLite busy timeout", file=sys.stderr)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    return flower_superlink() or 0


if __name__ == "__main__":
    sys.exit(main())
