"""docs/pilot.md's commands, as written, for pilot/rehearse.sh (which runs them on
loopback) and tests/test_pilot_docs.py (which checks that every one is run or skipped
with a reason).

A command is one shell command of a ```bash block: continuation lines (`\\`) and a quoted
argument spread over lines (`flwr run --run-config '...'`) belong to it, comment-only
lines do not. Each carries its section: `1` to `8` for the numbered sections, `settings`,
or the heading's words for the others (`rehearsal on one machine`).

    python -m pilot.guide show SECTION PREFIX   # the section's commands that start with PREFIX, NUL-separated
    python -m pilot.guide settings              # the variables the Settings block sets, one a line
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "pilot.md"


@dataclass(frozen=True)
class Command:
    section: str
    text: str  # verbatim, continuation lines included

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text.replace("\\\n", " "), comments=True)


def section_of(heading: str) -> str:
    numbered = re.match(r"(\d+)\.", heading)
    return numbered.group(1) if numbered else heading.strip().lower()


def commands(text: str | None = None) -> list[Command]:
    """Every command of the guide's bash blocks, in order."""
    text = GUIDE.read_text() if text is None else text
    out: list[Command] = []
    section = ""
    in_block = False
    pending: list[str] = []
    for line in text.splitlines():
        if not in_block:
            if line.startswith("## "):
                section = section_of(line[3:])
            elif line.strip() == "```bash":
                in_block = True
            continue
        if line.strip() == "```":
            if pending:
                raise ValueError(f"section {section}: a command runs past its block: {' '.join(pending)[:120]}")
            in_block = False
            continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        joined = "\n".join(pending)
        if joined.endswith("\\"):
            continue
        try:
            shlex.split(joined.replace("\\\n", " "), comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        out.append(Command(section, joined.strip()))
        pending = []
    return out


def matching(section: str, prefix: str, text: str | None = None) -> list[Command]:
    return [c for c in commands(text) if c.section == section and c.text.startswith(prefix)]


def settings(text: str | None = None) -> list[str]:
    """The variables the Settings block sets (`NAME=value`)."""
    return [c.text.split("=", 1)[0] for c in commands(text) if c.section == "settings" and "=" in c.words[0]]


def main(argv: list[str]) -> int:
    if argv[:1] == ["show"] and len(argv) == 3:
        found = matching(argv[1], argv[2])
        if not found:
            print(f"docs/pilot.md section {argv[1]} has no command starting with {argv[2]!r}", file=sys.stderr)
            return 1
        sys.stdout.write("".join(c.text + "\0" for c in found))
        return 0
    if argv == ["settings"]:
        print("\n".join(settings()))
        return 0
    print(__doc__.split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
