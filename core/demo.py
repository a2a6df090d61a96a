"""The demo's settings (`make run`): one place for scripts/demo.sh, the docs and the tests.

    python -m core.demo [OVERRIDES]   prints them as one `--run-config` string, with
                                      OVERRIDES ("key=value ...") replacing or adding keys
    python -m core.demo --federation  prints its `--federation-config`

A small non-IID federation on which both FusedSpaceFed and FedAvg learn within 5 minutes on 2
CPU cores: BloodMNIST (8 classes, so "past the majority class" is a real bar) over 2 sites,
Dirichlet alpha 0.5, 2 rounds of one local epoch. Why this small: a round's cost is each site's
training plus each site's evaluation of the whole test and validation splits, and sites beyond
the cores train in waves; 5 sites and 3 rounds took 540 s, 4 sites and 2 rounds 350 s on this
machine (README, "Times, measured"). The rest of the recipe (normalisation, learning rate,
autoencoder) is the project's default (pyproject.toml; docs/recipe.md says why).
"""

from __future__ import annotations

DEMO_SITES = 2
DEMO: dict[str, object] = {
    "dataset": "bloodmnist",
    "partition": "dirichlet-equal",
    "alpha": 0.5,
    "num-server-rounds": 2,
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


def federation_config() -> str:
    """`--federation-config` for the demo: its sites, 1 CPU each (Flower's default is 2, which
    on a 2-core machine trains the sites one after another). Telling Ray of one CPU per site
    (`init-args-num-cpus`) so that 5 sites share 2 cores at once was measured slower: round 1
    took 88.5 s against 64.7 s in waves of two (README)."""
    return f"num-supernodes={DEMO_SITES} client-resources-num-cpus=1"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--federation"]:
        print(federation_config())
    else:
        print(run_config_string(with_overrides(" ".join(sys.argv[1:]))))
