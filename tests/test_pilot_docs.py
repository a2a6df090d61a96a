"""docs/pilot.md's commands work as written (issue 30.2): pilot/rehearse.sh runs the
commands of sections 1-7 verbatim (pilot/guide.py reads them from the guide), and this
checks, without running anything, that every command of the guide is run by the
rehearsal or skipped there with a reason, that every name, path and port they use is a
variable of the guide's Settings block (which the rehearsal sets for loopback), that the
files they name are the ones the scripts write, and that every option they pass is one
the script or module takes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from partitions import split
from pilot import guide

REPO = Path(__file__).resolve().parents[1]
REHEARSAL = (REPO / "pilot" / "rehearse.sh").read_text()
COMMANDS = guide.commands()
# what cannot run on one machine as an unprivileged user, or after the run has ended
SKIPPABLE_IN_WALK = {("5", "scp "), ("6", "sudo "), ("7", "flwr stop")}


def declared(kind: str) -> list[tuple[str, str, list[str]]]:
    """The rehearsal's `doc SECTION PREFIX`, `start NAME SECTION PREFIX` and
    `skip SECTION PREFIX REASON` lines, as (section, prefix, the rest)."""
    out = []
    for line in REHEARSAL.splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip().startswith(kind + " ") else []
        if words[:1] == [kind]:
            args = words[2:] if kind == "start" else words[1:]
            out.append((args[0], args[1], args[2:]))
    return out


def covered_by(cmd: guide.Command, declarations) -> bool:
    return any(cmd.section == section and cmd.text.startswith(prefix) for section, prefix, _ in declarations)


def variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))


def test_the_guide_has_commands_in_every_section_of_the_walk():
    assert {c.section for c in COMMANDS} >= {"settings", "1", "2", "3", "4", "5", "6", "7"}
    # a quoted run config spread over lines is one command, continuation lines included
    [run] = [c for c in COMMANDS if c.section == "7" and c.text.startswith("flwr run")]
    assert "round-timeout=1800.0' \\\n" in run.text and run.words[-1].startswith("num-server-rounds=$ROUNDS")


def test_every_command_of_the_guide_is_run_by_the_rehearsal_or_skipped_with_a_reason():
    runs = declared("doc") + declared("start")
    skips = declared("skip")
    assert runs and skips
    for section, prefix, rest in skips:
        assert len(rest) == 1 and len(rest[0]) > 15, f"skip {section} {prefix!r} needs a reason"
    for cmd in COMMANDS:
        assert covered_by(cmd, runs) or covered_by(cmd, skips), f"neither run nor skipped: {cmd.text[:80]}"
        if cmd.section in {"1", "2", "3", "4", "5", "6", "7"} and not covered_by(cmd, runs):
            # of the walk, only what one machine cannot do is skipped (and ssh-keygen where it is missing)
            allowed = SKIPPABLE_IN_WALK | {("2", "ssh-keygen")}
            assert any(cmd.section == s and cmd.text.startswith(p) for s, p in allowed), cmd.text[:80]
    # every declaration names commands the guide has (a renamed command would leave it stale)
    for section, prefix, _ in runs + skips:
        assert guide.matching(section, prefix), f"docs/pilot.md section {section} has no {prefix!r}"


def test_every_variable_the_commands_use_is_a_setting_the_rehearsal_sets():
    settings = set(guide.settings())
    assert {"PILOT_DIR", "COORDINATOR", "PORT", "SITE", "SITE_DIR", "RESULTS"} <= settings
    used = set().union(*(variables(c.text) for c in COMMANDS if c.section != "settings"))
    # RUN_ID is a run's id, from `flwr run`/`flwr ls` (section 7 says so), the rest are Settings
    assert used - settings == {"RUN_ID"}
    assert "set `RUN_ID=` to it" in guide.GUIDE.read_text()
    # the rehearsal exports each one (the hospital's own per hospital)
    exported = {w.split("=")[0] for line in re.findall(r"export ([^\n]+)", REHEARSAL) for w in line.split()}
    assert settings | {"RUN_ID"} <= exported


def test_no_command_of_the_walk_names_a_path_or_port_outside_the_settings():
    for cmd in COMMANDS:
        if cmd.section not in {"1", "2", "3", "4", "6", "7"}:
            continue
        for word in cmd.words:
            mine = word.startswith(("/srv", "/etc", "/tmp", "pilot/keys", "pilot/certs", "pilot/state", "pilot/sites"))
            assert not mine, (word, cmd.text)
            assert not re.fullmatch(r"\d{4,5}", word), (word, cmd.text)  # a port: $PORT and friends


def test_every_script_and_option_the_guide_uses_exists():
    used = [c.words[1:] if c.words[0] == "sudo" else c.words for c in COMMANDS]
    used = [w for w in used if w[0].startswith("pilot/")]
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
        unknown = [o for o in words if o.startswith("--") and f"{o})" not in text and f"{o} " not in text]
        assert not unknown, f"{words[0]} takes no {unknown}"


def test_registration_names_the_key_files_the_key_script_writes_and_the_hospital():
    [keys] = [c.words for c in COMMANDS if c.words[0] == "pilot/make-site-keys.sh"]
    written = f"{keys[keys.index('-o') + 1]}/{keys[-1]}.key.pub"  # $PILOT_DIR/keys/$SITE.key.pub
    registers = [c.words for c in COMMANDS if c.words[:3] == ["flwr", "supernode", "register"]]
    assert [w[w.index("--name") + 1] for w in registers] == ["hospital-a", "hospital-b"]
    for words in registers:
        name = words[words.index("--name") + 1]
        assert words[3] == written.replace("$SITE", name), words
    [node] = [c.words for c in COMMANDS if c.words[0] == "pilot/start-supernode.sh"]
    assert node[node.index("--key") + 1] == written.removesuffix(".pub")
    assert node[node.index("--ca") + 1] == "$PILOT_DIR/certs/ca.crt"


def test_the_split_command_parses_as_written(monkeypatch):
    [words] = [c.words for c in COMMANDS if c.words[:3] == ["python", "-m", "partitions.split"]]
    seen = {}
    monkeypatch.setattr(split, "split_dataset", lambda *a, **k: seen.update(args=a, kwargs=k) or [])
    assert split.main(words[3:]) == 0
    assert seen["kwargs"]["download"] is True  # a first-time operator has no dataset file yet
    assert seen["kwargs"]["alpha"] == 0.5 and seen["kwargs"]["num_sites"] == 2
    [scp] = [c.words for c in COMMANDS if c.words[0] == "scp"][:1]
    assert scp[1] == words[words.index("--out") + 1] + "/site-0.npz"  # the file the split wrote


@pytest.mark.parametrize("module", ["pilot.connection", "pilot.preflight"])
def test_the_modules_the_guide_runs_take_its_options(module):
    text = (REPO / (module.replace(".", "/") + ".py")).read_text()
    for c in COMMANDS:
        if c.words[:3] == ["python", "-m", module]:
            assert all(f'"{o}"' in text for o in c.words if o.startswith("--")), c.words
