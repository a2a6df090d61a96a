"""The demo's settings (`make run`): one place for scripts/demo.sh, the docs and the tests.

    python -m core.demo [OVERRIDES]   prints them as one `--run-config` string, with
                                      OVERRIDES ("key=value ...") replacing or adding keys

A small non-IID federation on which both FusedSpaceFed and FedAvg learn within a few
minutes on 2 CPU cores: BloodMNIST (8 classes, so "past the majority class" is a real
bar) over 5 sites, Dirichlet alpha 0.5, one local epoch per round. The rest of the
recipe (normalisation, learning rate, autoencoder) is the project's default
(pyproject.toml; docs/recipe.md says why).
"""

from __future__ import annotations

import os

DEMO_SITES = 5
DEMO: dict[str, object] = {
    "dataset": "bloodmnist",
    "partition": "dirichlet-equal",
    "alpha": 0.5,
    "num-server-rounds": 3,
    "local-epochs": 1,
    "warmup-epochs": 2,
    "eval-every": 1,
    "num-threads": 1,
    "device": "cpu",
    "seed": 0,
}


def run_config_string(values: dict[str, object]) -> str:
    """`key=value ...` as `flwr run --run-config` takes it (strings quoted)."""

    def literal(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"'{value}'" if isinstance(value, str) else str(value)

    return " ".join(f"{key}={literal(value)}" for key, value in values.items())


def with_overrides(overrides: str) -> dict[str, object]:
    """The demo's settings with `overrides` (a `--run-config` string) laid over them: one
    key once, since Flower refuses a key given twice."""
    from flwr.common.config import parse_config_args

    return {**DEMO, **(parse_config_args([overrides]) if overrides.strip() else {})}


def federation_config(cores: int | None = None) -> str:
    """`--federation-config` for the demo: its sites, each with cores/sites CPUs (at most 1), so
    that all of them train at once instead of in waves of `cores` sites (measured in the README)."""
    cores = cores or os.cpu_count() or 1
    return f"num-supernodes={DEMO_SITES} client-resources-num-cpus={min(1.0, round(cores / DEMO_SITES, 2))}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--federation"]:
        print(federation_config())
    else:
        print(run_config_string(with_overrides(" ".join(sys.argv[1:]))))
