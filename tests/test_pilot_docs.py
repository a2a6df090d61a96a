"""docs/pilot.md's commands work as written (issue 30.2): the files they name are the ones
the scripts write, every option they pass is one the script or module takes, the split
command parses, and hospitals are registered with their names."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from partitions import split

REPO = Path(__file__).resolve().parents[1]
GUIDE = (REPO / "docs" / "pilot.md").read_text()


def commands() -> list[list[str]]:
    """Every one-line (after joining `\\` continuations) command of the guide's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", GUIDE, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # a quoted run config spread over lines (flwr run): not a script call
                continue
            if words and words[0] == "sudo":
                words = words[1:]
            if words:
                out.append(words)
    return out


def options(words: list[str]) -> set[str]:
    return {w for w in words if w.startswith("--")}


def test_every_script_and_option_the_guide_uses_exists():
    used = [w for w in commands() if w[0].startswith("pilot/")]
    assert {w[0] for w in used} >= {
        "pilot/make-certs.sh",
        "pilot/make-site-keys.sh",
        "pilot/start-superlink.sh",
        "pilot/start-proxy.sh",
        "pilot/start-supernode.sh",
        "pilot/rehearse.sh",
    }
    for words in used:
        script = REPO / words[0]
        assert script.exists(), words[0]
        text = script.read_text()
        unknown = [o for o in options(words) if f"{o})" not in text and f"{o} " not in text]
        assert not unknown, f"{words[0]} takes no {unknown}"


def test_registration_names_the_key_files_the_key_script_writes_and_the_hospital():
    made = {}
    for words in commands():
        if words[0] == "pilot/make-site-keys.sh":
            out = words[words.index("-o") + 1]
            made.update({f"{out}/{name}.key.pub": name for name in words[3:]})
    registers = [w for w in commands() if w[:3] == ["flwr", "supernode", "register"]]
    assert registers
    for words in registers:
        key = words[3]
        assert key.startswith("pilot/keys/"), words
        name = words[words.index("--name") + 1]
        assert key == f"pilot/keys/{name}.key.pub", words
    assert "pilot/keys/hospital-a.key.pub" in made  # the path section 2 writes


def test_the_split_command_parses_as_written(monkeypatch):
    [words] = [w for w in commands() if w[:3] == ["python", "-m", "partitions.split"]]
    seen = {}
    monkeypatch.setattr(split, "split_dataset", lambda *a, **k: seen.update(args=a, kwargs=k) or [])
    assert split.main(words[3:]) == 0
    assert seen["kwargs"]["download"] is True  # a first-time operator has no dataset file yet
    assert seen["kwargs"]["alpha"] == 0.5 and seen["kwargs"]["num_sites"] == 2


@pytest.mark.parametrize("module", ["pilot.connection", "pilot.preflight"])
def test_the_modules_the_guide_runs_take_its_options(module):
    text = (REPO / (module.replace(".", "/") + ".py")).read_text()
    for words in commands():
        if words[:3] == ["python", "-m", module]:
            assert all(f'"{o}"' in text for o in options(words)), words
