"""The dependency rules of ../shared/docs/architecture.md, read from the imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "models", "partitions", "strategies", "client_app", "server_app", "pilot")
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "partitions": {"core"},
    "strategies": {"core", "models"},
    "client_app": {"core", "models", "partitions"},
    "server_app": {"core", "models", "partitions", "strategies"},
    "pilot": {"core", "partitions"},
}


def project_imports(package: str) -> set[tuple[str, str]]:
    """(file, imported project package) for every import in `package`, lazy ones included."""
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.add((str(path.relative_to(REPO)), top))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_architecture(package):
    broken = sorted((f, top) for f, top in project_imports(package) if top not in ALLOWED[package])
    assert not broken, f"{package} may import only {sorted(ALLOWED[package])}; found {broken}"


def test_every_method_has_its_contract_trainer_and_strategy():
    for name, contract in METHODS.items():
        trainer_module = contract.trainer.split(":")[0]
        strategy_module = contract.strategy.split(":")[0]
        assert trainer_module.startswith("client_app.trainers.") and strategy_module.startswith("strategies.")
        assert hasattr(contract.load_trainer(), "train"), name
        assert contract.load_strategy_class().__name__, name
        assert f"`{name}`" in (REPO / "README.md").read_text(), f"README's method table lacks {name}"
