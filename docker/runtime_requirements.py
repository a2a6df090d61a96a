"""Print the Python requirements of the app's runtime image, one per line.

They are the project's own dependencies from pyproject.toml, less what the image
provides another way:

- flwr: the base image (Flower's SuperExec image) already has it; reinstalling
  could replace the running Flower with another version.
- ray: only the simulation engine needs it; a deployment never imports it.
- torch, torchvision: chosen by the image's TORCH_VARIANT / TORCH_SPEC build args.
- medmnist: installed without its dependencies (it declares torch and torchvision,
  but the app only uses its metadata and, for downloading, its dataset classes).
- grpcio: a dependency of flwr itself.

Pillow is added because medmnist imports it with its dataset classes.

    python docker/runtime_requirements.py [pyproject.toml]          # requirements
    python docker/runtime_requirements.py --no-deps [pyproject.toml]  # the --no-deps set
    python docker/runtime_requirements.py --torch [pyproject.toml]    # torch, torchvision
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: flwr depends on tomli
    import tomli as tomllib

PROVIDED = {"flwr", "ray", "torch", "torchvision", "grpcio", "medmnist"}
NO_DEPS = {"medmnist"}
TORCH = {"torch", "torchvision"}
EXTRA = ["pillow"]


def name_of(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, which: str = "") -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if which == "--no-deps":
        return [d for d in deps if name_of(d) in NO_DEPS]
    if which == "--torch":
        return [d for d in deps if name_of(d) in TORCH]
    kept = [d for d in deps if name_of(d) not in PROVIDED]
    return kept + [e for e in EXTRA if e not in {name_of(d) for d in kept}]


def main(argv: list[str]) -> int:
    which = next((a for a in argv if a in ("--no-deps", "--torch")), "")
    args = [a for a in argv if not a.startswith("--")]
    pyproject = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(pyproject, which)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
