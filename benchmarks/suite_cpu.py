"""Where `make test`'s CPU goes: every test's CPU seconds, its whole process tree included.

    .venv/bin/python -m benchmarks.suite_cpu                       # make test's own command
    .venv/bin/python -m benchmarks.suite_cpu -- tests/test_pilot.py   # any pytest arguments

The suite is CPU-bound on 2 cores, and most of its CPU is spent in processes that pytest
never waits for: Ray's daemons and actors, the pilot's SuperLink, SuperNodes, SuperExecs
and site workers (`resource.getrusage` and `time` miss them: they counted 1,929 CPU-s for a
suite that used far more). Each pytest-xdist worker therefore moves itself into a cgroup of
its own (cgroup v1 `cpuacct`, or v2), which every process it starts inherits, setsid or not;
a worker runs one test at a time, so the group's usage across a test is that test's CPU.

Writes `benchmarks/SUITE-CPU.md` (machine, command, totals, per module, the costliest tests,
and when each worker ran out of tests: the suite's tail, where the cores wait for the last
ones) and the raw rows beside it (`--rows`: test, wall, CPU, worker, end time). Needs a
writable cgroup file system (root).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS_ENV = "FSF_SUITE_CPU_ROWS"
V1 = Path("/sys/fs/cgroup/cpuacct")
V2 = Path("/sys/fs/cgroup")


NO_CGROUPS = "benchmarks.suite_cpu needs a writable cgroup file system (cgroup v1 cpuacct or v2): run as root"


def cgroups_writable() -> bool:
    """Whether a process here can move into a cgroup of its own and read its CPU: tried in a
    child process (this one stays where it is), whose group is removed after it."""
    probe = "import os, sys; from benchmarks.suite_cpu import _group_usage_reader as g; g(sys.argv[1])()"
    name = f"fsf-suite-probe-{os.getpid()}"
    done = subprocess.run([sys.executable, "-c", probe, name], cwd=ROOT, capture_output=True)
    remove_groups(name)
    return done.returncode == 0


def remove_groups(pattern: str) -> None:
    """Remove this benchmark's cgroups matching `pattern` whose processes have all ended."""
    for base in (V1, V2):
        for group in base.glob(pattern) if base.is_dir() else ():
            try:
                group.rmdir()
            except OSError:  # a process still in it
                pass


def _v2_usage(group: Path) -> float:
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6


def _group_usage_reader(name: str):
    """Make a cgroup `name`, move this process into it, and return a reader of its CPU seconds."""
    if V1.is_dir() and os.access(V1, os.W_OK):
        group, usage = V1 / name, lambda: int((group / "cpuacct.usage").read_text()) / 1e9
    elif (V2 / "cgroup.controllers").exists() and os.access(V2, os.W_OK):
        group, usage = V2 / name, lambda: _v2_usage(group)
    else:
        raise RuntimeError(NO_CGROUPS)
    group.mkdir(exist_ok=True)
    (group / "cgroup.procs").write_text(str(os.getpid()))
    return usage


# -- the pytest plugin (loaded in every xdist worker with -p benchmarks.suite_cpu) -----------------
_usage = None


def pytest_configure(config) -> None:
    global _usage
    if os.environ.get(ROWS_ENV):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        _usage = _group_usage_reader(f"fsf-suite-{worker}-{os.getpid()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _usage is None:
        yield
        return
    cpu, wall = _usage(), time.time()
    yield
    ended = time.time()
    cpu, wall = _usage() - cpu, ended - wall
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.environ[ROWS_ENV], "a") as rows:
        rows.write(f"{item.nodeid}\t{wall:.1f}\t{cpu:.1f}\t{worker}\t{ended:.1f}\n")


# -- the benchmark -------------------------------------------------------------------------------
def make_test_args() -> list[str]:
    """The Makefile's `test` target's pytest arguments (its worker count included)."""
    workers = subprocess.run(
        ["make", "-s", "--no-print-directory", "-f", "Makefile", "print-test-workers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return ["-n", workers or "3", "--dist", "loadgroup"]


#: a test's row: its id, wall seconds, CPU seconds, xdist worker, end (seconds after the suite started)
Row = tuple[str, float, float, str, float]


def worker_ends(rows: list[Row]) -> dict[str, tuple[float, str]]:
    """Each worker's last test: when it ended (seconds after the suite started) and its id."""
    ends: dict[str, tuple[float, str]] = {}
    for nodeid, _, _, worker, ended in rows:
        if ended > ends.get(worker, (-1.0, ""))[0]:
            ends[worker] = (ended, nodeid)
    return ends


def report(rows: list[Row], command: list[str], wall: float, rc: int, load: str) -> str:
    by_module: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for nodeid, test_wall, cpu, _, _ in rows:
        entry = by_module[nodeid.split("::")[0]]
        entry[0] += cpu
        entry[1] += test_wall
        entry[2] += 1
    total = sum(row[2] for row in rows)
    import torch

    lines = [
        "# Where `make test`'s CPU goes",
        "",
        f"`python -m benchmarks.suite_cpu` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"commit {git_commit()}: {cpu_model()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average at the start {load}.",
        f"Command: `{' '.join(command)}`; exit {rc}; {len(rows)} tests; wall {wall:.0f} s.",
        "",
        f"**CPU of every test's process tree: {total:.0f} CPU-s** (cgroup accounting: Ray's daemons and "
        f"the pilot's processes included). On {os.cpu_count()} cores that is at least "
        f"{total / (os.cpu_count() or 1):.0f} s of wall time however the tests are spread.",
        "A test's CPU includes what its module's long-lived processes (a pilot federation, a Ray "
        "cluster) spend while it runs, and its fixtures' set-up; the wall column is under whatever "
        "else ran beside it.",
        "",
        "| module | tests | CPU-s | share | wall-s (summed) |",
        "|---|---|---|---|---|",
    ]
    for module, (cpu, test_wall, count) in sorted(by_module.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| `{module}` | {count} | {cpu:.1f} | {100 * cpu / max(total, 1e-9):.1f} % | {test_wall:.1f} |")
    if ends := worker_ends(rows):
        lines += ["", "When each worker ran out of tests (seconds after the start; the cores wait on the rest):", ""]
        lines += ["| worker | last test ended | last test |", "|---|---|---|"]
        for worker, (ended, nodeid) in sorted(ends.items(), key=lambda kv: kv[1][0]):
            lines.append(f"| {worker} | {ended:.0f} s | `{nodeid}` |")
    lines += ["", "The 25 costliest tests:", "", "| test | CPU-s | wall-s |", "|---|---|---|"]
    for nodeid, test_wall, cpu, _, _ in sorted(rows, key=lambda r: -r[2])[:25]:
        lines.append(f"| `{nodeid}` | {cpu:.1f} | {test_wall:.1f} |")
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "SUITE-CPU.md")
    parser.add_argument("--rows", type=Path, default=None, help="the raw rows (default: beside --out, .tsv)")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: make test's)")
    args = parser.parse_args(argv)
    if not cgroups_writable():  # fail now, not in every worker
        raise RuntimeError(NO_CGROUPS)
    rows_path = args.rows or args.out.with_suffix(".tsv")
    rows_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-p", "benchmarks.suite_cpu", *(args.pytest_args or make_test_args())]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    started = time.time()
    rc = subprocess.run(command, cwd=ROOT, env={**os.environ, ROWS_ENV: str(rows_path)}).returncode
    wall = time.time() - started
    remove_groups("fsf-suite-*")  # the workers' groups, empty now that they have ended
    rows = []
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            nodeid, test_wall, cpu, worker, ended = line.split("\t")
            rows.append((nodeid, float(test_wall), float(cpu), worker, float(ended) - started))
    shown = ["pytest", *command[5:]]
    args.out.write_text(report(rows, shown, wall, rc, load))
    print(f"{len(rows)} tests, {sum(r[2] for r in rows):.0f} CPU-s, wall {wall:.0f} s -> {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
