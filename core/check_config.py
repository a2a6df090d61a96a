"""Pre-flight check of a run configuration, before `flwr run` starts anything.

    python -m core.check_config --run-config "method='fedavg' alpha=0.1" [--run-config ...]

Flower only meets a bad value inside the ServerApp, minutes later and as a traceback; this
reads the `--run-config` strings the way `flwr run` does, lays them over pyproject.toml's
`[tool.flwr.app.config]` and builds a `RunConfig`. A bad configuration prints one line
(`config error: <key> ...`) and exits 2; a good one prints nothing and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from core.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXIT_CONFIG_ERROR = 2


def describe(exc: ConfigError) -> str:
    """The one line a user sees for a bad configuration (the message names key, value and what is allowed)."""
    return f"config error: {' '.join(str(exc).split())}"


def app_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """`[tool.flwr.app.config]`: what the ServerApp receives when nothing is overridden."""
    with pyproject.open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def parse_overrides(run_configs: list[str]) -> dict[str, Any]:
    """`--run-config` strings parsed by Flower's own parser, so values get the types `flwr run` gives them."""
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(run_configs)
    except Exception as exc:  # click.ClickException (malformed pairs), OSError (a .toml file): one line too
        message = getattr(exc, "message", None) or str(exc)
        raise ConfigError(f"--run-config {' '.join(run_configs)!r}: {message}") from None


def check(run_configs: list[str], pyproject: Path = PYPROJECT) -> RunConfig:
    """The configuration `flwr run . --run-config ...` would hand the ServerApp; ConfigError if invalid."""
    return RunConfig.from_mapping({**app_defaults(pyproject), **parse_overrides(run_configs)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", action="append", default=[], help="key=value pairs, as for flwr run")
    args = parser.parse_args(argv)
    try:
        check(args.run_config)
    except ConfigError as exc:
        print(describe(exc), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
