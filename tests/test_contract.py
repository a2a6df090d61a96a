"""The method contract drives the code: a method's name appears only in its three homes
(core/methods.py, strategies/, client_app/trainers/), and every field of the contract is
read by code outside its definition."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
from pathlib import Path

from core.methods import METHODS, Exchange, KeySet, MethodContract
from tests.source_files import project_files

REPO = Path(__file__).resolve().parents[1]
HOMES = ("core/methods.py", "strategies/", "client_app/trainers/")
#: scripts that pick which method a measurement runs (a run configuration, not method logic)
MEASUREMENT_SETTINGS = {
    "benchmarks/round_cost.py": "the round-cost benchmark measures a FusedSpaceFed and a FedAvg round",
    "benchmarks/dp_cost.py": "the DP benchmark's settings table names the method of each row",
}


def _code_files(root: Path = REPO) -> list[Path]:
    """The project's own code (tests/source_files.py: never a copy a run installed)."""
    skip = ("tests/", "docs/")
    return [p for p in project_files(root) if not str(p.relative_to(root)).startswith(skip)]


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def method_names_outside_homes(root: Path = REPO) -> list[str]:
    names = set(METHODS)
    found = []
    for path in _code_files(root):
        rel = str(path.relative_to(root))
        if rel.startswith(HOMES) or rel in MEASUREMENT_SETTINGS:
            continue
        for line, text in _string_literals(path):
            for token in {text, *text.replace(",", " ").replace("(", " ").replace(")", " ").split()}:
                if token in names:
                    found.append(f"{rel}:{line}: {text!r}")
    return found


def test_no_method_name_outside_its_homes():
    """A string equal to a method's name (or holding it as a word) in code outside the homes
    means code that branches on a method instead of asking its contract."""
    found = method_names_outside_homes()
    assert not found, "method names outside core/methods.py, strategies/, client_app/trainers/:\n" + "\n".join(found)


def test_the_check_would_catch_a_name():
    sample = REPO / "tests" / "_sample_for_contract_check.py"
    sample.write_text('if method == "fedbn":\n    pass\n')
    try:
        assert (2, "fedbn") not in _string_literals(sample)
        assert (1, "fedbn") in _string_literals(sample)
    finally:
        sample.unlink()


def test_every_contract_field_is_read_outside_its_definition():
    """No field that only documents: each is read (`.name`) by some module other than the
    dataclass that declares it, or by a method of the contract that other code calls."""
    sources = {p: p.read_text() for p in _code_files()}
    unread = []
    for cls in (MethodContract, Exchange, KeySet):
        for field in dataclasses.fields(cls):
            readers = [p for p, text in sources.items() if f".{field.name}" in text]
            if not readers:
                unread.append(f"{cls.__name__}.{field.name}")
    assert not unread, f"contract fields nobody reads: {unread}"


def test_every_method_declares_what_it_keeps_and_how_it_is_named():
    for name, contract in METHODS.items():
        assert contract.label and contract.summary and contract.private, name
        assert contract.shared.include, name


def _compared_constants(path: Path) -> list[tuple[int, str]]:
    """String constants that code compares something with (`x == "reference"`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    out.append((node.lineno, side.value))
    return out


def protocol_name_comparisons(root: Path = REPO) -> list[str]:
    from core.protocol import PROTOCOLS

    found = []
    for path in _code_files(root):
        rel = str(path.relative_to(root))
        if rel.startswith(("core/protocol.py", "benchmarks/")):
            continue
        found += [f"{rel}:{line}: {text!r}" for line, text in _compared_constants(path) if text in PROTOCOLS]
    return found


def test_what_a_protocol_changes_is_asked_of_its_protocol_object():
    """The system's code asks the run's `Protocol` (core/protocol.py) what to do, never
    compares the protocol's name (benchmarks may: they label runs by it), and every field
    of `Protocol` is read somewhere."""
    from core.protocol import Protocol

    found = protocol_name_comparisons()
    assert not found, f"code that compares the protocol's name: {found}"
    sources = [p.read_text() for p in _code_files() if not str(p).endswith("core/protocol.py")]
    unread = [f.name for f in dataclasses.fields(Protocol) if not any(f".{f.name}" in s for s in sources)]
    assert not unread, f"Protocol fields nobody reads: {unread}"


def test_the_source_scans_ignore_what_make_run_leaves_in_the_checkout(tmp_path):
    """`make run` installs the app's copy under .flwr-home/apps/ (benchmarks included, which
    name methods and protocols), a venv and run folders: the scans read the project's own
    files only, so `make test` after `make run` passes (and a stray file that git would track
    is still caught)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True)
    app_copy = clone / ".flwr-home" / "apps" / "fsf.fusedspacefed.1.0.0.abc" / "benchmarks"
    app_copy.mkdir(parents=True)
    (app_copy / "round_cost.py").write_text('METHOD = "fedavg"\nif protocol == "reference":\n    pass\n')
    for stray in (clone / ".venv" / "lib" / "site-packages" / "x.py", clone / "results" / "demo-fedavg" / "y.py"):
        stray.parent.mkdir(parents=True)
        stray.write_text('if method == "fedavg":\n    pass\n')
    assert method_names_outside_homes(clone) == []
    assert protocol_name_comparisons(clone) == []
    (clone / "core" / "stray.py").write_text('if method == "fedavg":\n    pass\n')  # untracked, not ignored
    assert method_names_outside_homes(clone) == ["core/stray.py:1: 'fedavg'"]
