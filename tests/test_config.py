import tomllib
from dataclasses import fields

import pytest

from core.config import ConfigError, RunConfig
from tests.conftest import REPO


def test_pyproject_defaults_equal_code_defaults():
    """The field defaults as written (`norm = "auto"` before a method resolves it)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert pyproject == {f.name.replace("_", "-"): f.default for f in fields(RunConfig)}
    assert RunConfig.from_mapping(pyproject).to_mapping() == RunConfig().to_mapping()


def test_every_key_is_documented_in_readme():
    readme = (REPO / "README.md").read_text()
    missing = [k for k in RunConfig().to_mapping() if f"`{k}`" not in readme]
    assert not missing, f"README lacks config keys {missing}"


def test_values_are_coerced_and_validated():
    cfg = RunConfig.from_mapping({"alpha": 1, "task-aware": "false", "num-server-rounds": 3.0})
    assert cfg.alpha == 1.0 and cfg.task_aware is False and cfg.num_server_rounds == 3
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        RunConfig.from_mapping({"alpha": 0})
    with pytest.raises(ConfigError, match="unknown config keys \\['learning-rate'\\]"):
        RunConfig.from_mapping({"learning-rate": 0.1})
    with pytest.raises(ConfigError, match="'local-epochs' must be int"):
        RunConfig.from_mapping({"local-epochs": 1.5})
    with pytest.raises(ConfigError, match="method must be one of"):
        RunConfig.from_mapping({"method": "fedsgd"})
