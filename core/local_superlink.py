"""Whose is the local SuperLink? `flwr run` hands a run to whatever SuperLink answers on
127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (default 39091), and that SuperLink runs the
simulation with the Python and packages it was started with. A SuperLink left by another
checkout, or by this checkout before its last install, would run this checkout's app with
the wrong code, without a word. scripts/simulate.sh asks this module first:

    python -m core.local_superlink check      exit 0: none running, or ours and current
                                              exit 3: another checkout's (refused, one line why)
                                              exit 4: ours but older than the install (restart it)
    python -m core.local_superlink pids       this checkout's local SuperLinks (for stopping them)

A local SuperLink is recognised by its command line (`flower-superlink ... --simulation`) and
counts when it holds this checkout's local ports (so checkouts on other ports coexist):
its `--log-file` lies under the FLWR_HOME that started it, the `flower-superlink` it runs
lies in its venv. Linux only (/proc), as the scripts are.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class LocalSuperLink:
    pid: int
    flwr_home: Path | None  # from its --log-file (FLWR_HOME/local-superlink/superlink.log)
    venv: Path | None  # the environment whose `flower-superlink` it runs
    started: float  # epoch seconds
    ports: frozenset[str] = frozenset()  # its HTTP (`--port`) and Control API ports

    def answers_on(self, ports: set[str]) -> bool:
        """It is the SuperLink `flwr run` reaches with these local ports (or blocks them)."""
        return bool(self.ports & ports)

    def belongs_to(self, flwr_home: Path, venv: Path) -> bool:
        return self.flwr_home == flwr_home.resolve() and self.venv == venv.resolve()


def _boot_time() -> float:
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _started(pid: int) -> float:
    """A process's start time in epoch seconds (/proc/PID/stat field 22, in clock ticks)."""
    stat = (PROC / str(pid) / "stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def parse(pid: int, argv: list[str], started: float) -> LocalSuperLink | None:
    """The local SuperLink that `argv` starts, or None for any other command line."""
    names = [Path(a).name for a in argv[:2]]
    if "flower-superlink" not in names or "--simulation" not in argv:
        return None
    home = None
    if "--log-file" in argv[:-1]:
        log = Path(argv[argv.index("--log-file") + 1])
        home = log.resolve().parent.parent  # FLWR_HOME/local-superlink/superlink.log
    # `python .../venv/bin/flower-superlink ...` (a console script run by its shebang), or the
    # script itself as argv[0]; the interpreter resolves to the same system Python for every
    # venv, so the environment is told by where the script lies
    script = Path(argv[names.index("flower-superlink")])
    venv = script.parent.parent.resolve() if script.is_absolute() else None
    ports = set()
    for flag in ("--port", "--control-api-address"):
        if flag in argv[:-1]:
            ports.add(argv[argv.index(flag) + 1].rsplit(":", 1)[-1])
    return LocalSuperLink(pid=pid, flwr_home=home, venv=venv, started=started, ports=frozenset(ports))


def running() -> list[LocalSuperLink]:
    """The local SuperLinks on this machine; only theirs is a start time read."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            link = parse(int(entry.name), argv, started=0.0) if argv else None
            if link is not None:
                found.append(dataclasses.replace(link, started=_started(link.pid)))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def verdict(links: list[LocalSuperLink], flwr_home: Path, venv: Path, installed: float | None) -> tuple[int, str]:
    """(exit code, one line) for a run from this checkout (see the module's docstring)."""
    foreign = [link for link in links if not link.belongs_to(flwr_home, venv)]
    if foreign:
        whose = "; ".join(f"pid {link.pid}: FLWR_HOME {link.flwr_home}, environment {link.venv}" for link in foreign)
        return 3, (
            f"refusing to run: the local SuperLink was started from another checkout or install ({whose}); this "
            "run would execute there, with that code and those packages. Stop it (`make stop` in that checkout, "
            "or scripts/stop-local-superlink.sh --all) and run again"
        )
    stale = [link for link in links if installed is not None and link.started < installed]
    if stale:
        return 4, (
            f"restarting the local SuperLink (pid {stale[0].pid}): it was started before this checkout's last "
            "install, so it would run the app with the packages of the install before"
        )
    return 0, ""


def local_ports() -> set[str]:
    """The ports of the local SuperLink `flwr run` uses (Flower's defaults and variables)."""
    return {
        os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"),
        os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", "39093"),
    }


def main(argv: list[str]) -> int:
    flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    venv = Path(sys.prefix)  # run as the checkout's .venv/bin/python
    stamp = venv / ".installed"
    installed = stamp.stat().st_mtime if stamp.exists() else None
    links = [link for link in running() if link.answers_on(local_ports())]
    if argv[:1] == ["pids"]:
        print(" ".join(str(link.pid) for link in links if link.belongs_to(flwr_home, venv)))
        return 0
    code, line = verdict(links, flwr_home, venv, installed)
    if line:
        print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
