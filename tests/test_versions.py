"""One exact Flower version: the `flwr[...]==X.Y.Z` pin in pyproject.toml.

Everything else derives from it or, where a file has to name a version literally (a
Dockerfile's ARG default, compose's `${FLWR_VERSION:-...}`, the docs), must name the same
one. This test finds every Flower version those files mention and fails, with file and
line, on any that differs from the pin; docker/e2e.sh reads the pin at run time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

# Files that name (or may name) the Flower version we use. Historical records of what
# a benchmark ran on (benchmarks/*.md, performance.json) are deliberately not scanned.
SCANNED = [
    "README.md",
    "docs/*.md",
    "docker/README.md",
    "docker/*Dockerfile",
    "docker/compose*.yml",
    "docker/*.sh",
    "docker/*.py",
]
# Files that must name the version literally (so a scan that finds nothing there means
# the patterns below no longer match the file, not that it agrees).
MUST_NAME = ["docker/Dockerfile", "docker/local-base.Dockerfile", "docker/compose.yml", "docker/compose.gpu.yml"]

V = r"(\d+\.\d+(?:\.\d+)?)"
PATTERNS = [
    re.compile(r"\bflwr(?:\[[^\]\s]*\])?\s*==\s*" + V),  # flwr==1.42.0, flwr[simulation]==1.42.0
    re.compile(r"\b(?:flwr|fusedspacefed)/[a-z-]+:" + V),  # flwr/superexec:1.42.0, fusedspacefed/superexec:1.42.0-cpu
    re.compile(r"FLWR_VERSION`?\s*(?::-|=|\[|\()\s*\"?" + V),  # ${FLWR_VERSION:-1.42.0}, ARG FLWR_VERSION=..., [..]
    re.compile(r"\bFlower(?:\]\([^)\s]*\))?\s+" + V),  # Flower 1.42, [Flower](https://flower.ai) 1.42
    re.compile(r"\bflwr\s+" + V + r"(?![\w-])"),  # "flwr 1.42.0"
]


def pinned_flwr(pyproject: Path) -> str:
    """X.Y.Z of the one `flwr[...]==X.Y.Z` in [project] dependencies; fails on anything looser."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    flwr = [Requirement(d) for d in deps if Requirement(d).name == "flwr"]
    assert len(flwr) == 1, f"{pyproject}: expected one flwr requirement, found {[str(r) for r in flwr]}"
    specs = list(flwr[0].specifier)
    assert len(specs) == 1 and specs[0].operator == "==" and re.fullmatch(r"\d+\.\d+\.\d+", specs[0].version), (
        f"{pyproject}: flwr must be pinned to one exact version (flwr==X.Y.Z), not {flwr[0]}"
    )
    return specs[0].version


def agrees(found: str, pin: str) -> bool:
    """`1.42` agrees with pin 1.42.0 (docs name the minor release); `1.42.0` must be equal."""
    return found == pin if found.count(".") == 2 else found == ".".join(pin.split(".")[:2])


def mentions(path: Path) -> list[tuple[int, str, str]]:
    """(line number, version, line) of every Flower version `path` names."""
    out = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for pattern in PATTERNS:
            out += [(lineno, m.group(1), line.strip()) for m in pattern.finditer(line)]
    return out


def disagreements(path: Path, pin: str, root: Path = REPO) -> list[str]:
    name = path.relative_to(root) if path.is_relative_to(root) else path
    return [
        f"{name}:{n}: Flower {v}, pyproject.toml pins {pin}: {line}"
        for n, v, line in mentions(path)
        if not agrees(v, pin)
    ]


def scanned_files(root: Path = REPO) -> list[Path]:
    return sorted({p for pattern in SCANNED for p in root.glob(pattern) if p.is_file()})


@pytest.fixture(scope="module")
def pin() -> str:
    return pinned_flwr(REPO / "pyproject.toml")


def test_every_flower_version_mentioned_equals_the_pin(pin):
    files = scanned_files()
    assert {REPO / f for f in MUST_NAME} <= set(files)
    bad = [msg for path in files for msg in disagreements(path, pin)]
    assert not bad, "Flower versions that disagree with pyproject.toml:\n" + "\n".join(bad)
    silent = [f for f in MUST_NAME if not mentions(REPO / f)]
    assert not silent, f"no Flower version found in {silent}: the patterns in this test no longer match them"


def test_installed_flwr_is_the_pin(pin):
    assert version("flwr") == pin, f"installed flwr {version('flwr')}, pyproject.toml pins {pin}: reinstall"


def test_e2e_reads_the_pin_and_the_mirror_at_run_time(pin):
    script = (REPO / "docker" / "e2e.sh").read_text()
    # the e2e's default version is pyproject's pin, read by the script's own function
    func = re.search(r"^pinned_flwr\(\) \{\n.*?^\}\n", script, re.M | re.S)
    assert func and 'flwr_version="${E2E_FLWR_VERSION:-$(pinned_flwr)}"' in script
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        ["bash", "-c", f'root="$1"; {func.group(0)}pinned_flwr', "bash", str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == pin
    # no Debian mirror named: debootstrap gets the host's, from its apt configuration
    assert not re.search(r"(https?|ftp)://\S*debian", script), "docker/e2e.sh names a Debian mirror"
    assert "/etc/apt/sources.list.d/*.sources" in script


def test_scan_catches_a_wrong_version(tmp_path):
    lines = [
        "ARG BASE_IMAGE=flwr/superexec:1.41.0",
        "ARG FLWR_VERSION=1.41.0",
        "  image: ${SUPERNODE_IMAGE:-flwr/supernode:${FLWR_VERSION:-1.41.0}}",
        "#   FLWR_VERSION [1.41.0]        Flower's image tag",
        "Variables: `FLWR_VERSION` (1.41.0),",
        "docker build -t fusedspacefed/superexec:1.41.0-cpu .",
        "the host (`pip install flwr==1.41.0`)",
        '    "flwr[simulation]==1.41.0",',
        "on [Flower](https://flower.ai) 1.41:",
        "otherwise Flower 1.41's local SuperLink",
        "| stand-in (that + flwr 1.41.0) | 391 MB |",
    ]
    wrong = tmp_path / "Dockerfile"
    wrong.write_text("\n".join(lines) + "\nflwr-datasets>=0.6 and Flower's SuperLink; torch 2.15.0\n")
    bad = disagreements(wrong, "1.42.0", root=tmp_path)
    assert [m.split(":")[1] for m in bad] == [str(n) for n in range(1, len(lines) + 1)]
    assert all(m.startswith("Dockerfile:") and "Flower 1.41" in m for m in bad)
    # the same lines naming the pin pass; nothing on the last line counts as a version
    right = tmp_path / "right.md"
    right.write_text(wrong.read_text().replace("1.41", "1.42"))
    assert disagreements(right, "1.42.0", root=tmp_path) == []
    assert len(mentions(right)) == len(lines)
    # another patch release is a disagreement too
    assert disagreements(right, "1.42.1", root=tmp_path)


def test_pin_must_be_exact(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["flwr[simulation]>=1.41,<1.43"]\n')
    with pytest.raises(AssertionError, match="exact version"):
        pinned_flwr(pyproject)
    pyproject.write_text('[project]\ndependencies = ["numpy", "flwr[simulation]==1.42.0"]\n')
    assert pinned_flwr(pyproject) == "1.42.0"


NUMERIC_STACK = ("torch", "torchvision", "numpy", "flwr", "ray", "scikit-learn")


def constraint_pins(path: Path = REPO / "constraints.txt") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, exact = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[name.strip().lower()] = exact.strip()
    return pins


def test_the_numeric_stack_is_locked_and_installed_as_locked(pin):
    """`make install` uses constraints.txt, which pins the numeric stack exactly; the
    installed versions are those (a seed's numbers depend on them)."""
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
    pins = constraint_pins()
    missing = [name for name in NUMERIC_STACK if name not in pins]
    assert not missing, f"constraints.txt does not pin {missing}"
    assert pins["flwr"] == pin
    drift = {name: (pins[name], version(name)) for name in NUMERIC_STACK if version(name) != pins[name]}
    assert not drift, f"installed versions differ from constraints.txt (locked, installed): {drift}; run make install"


def test_make_tests_groups_hold_on_the_installed_pytest(request):
    """`make test` keeps each group of the pilot's integration tests on one pytest-xdist worker through
    `--dist loadgroup`, which pytest-xdist 3.8 applies by renaming test ids; pytest 9 ignores
    that rename and spreads every group (pyproject.toml pins pytest below 9 for this). An
    integration test collected here carries the group, and the installed pytest keeps it."""
    from tests.conftest import SERIAL_GROUPS, serial_group

    assert int(version("pytest").split(".")[0]) < 9, "pytest 9 breaks pytest-xdist 3.8's loadgroup"
    integration = [i for i in request.session.items if i.get_closest_marker("integration")]
    if integration:  # the whole suite was collected (not a -m selection without them)
        assert all(i.get_closest_marker("xdist_group").args == (serial_group(i.module.__name__),) for i in integration)
        assert {serial_group(i.module.__name__) for i in integration} == set(SERIAL_GROUPS)


def test_a_module_with_a_module_fixture_stays_on_one_worker(request):
    """Under `--dist loadgroup` a module-scoped fixture would be built once per worker that
    gets one of its tests: such modules (test_simulation's Ray run, test_fuzz's round loop)
    are one group each, and modules without one are spread test by test."""
    from tests.conftest import has_module_fixture

    here = Path(__file__).parent
    assert has_module_fixture(str(here / "test_simulation.py")) and has_module_fixture(str(here / "test_fuzz.py"))
    assert not has_module_fixture(str(here / "test_fedprox.py"))
    for item in request.session.items:  # as collected in this session (all of it under make test)
        marks = {m.args for m in item.iter_markers("xdist_group")}
        if item.get_closest_marker("integration"):
            continue
        expected = {(item.module.__name__,)} if has_module_fixture(item.module.__file__) else set()
        assert marks == expected, item.nodeid
