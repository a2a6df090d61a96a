#!/usr/bin/env bash
# The published grid on one GPU machine, many runs in parallel sharing the GPU, with the
# lean engine (benchmarks/lean.py: the project's round loop, trainers, aggregation and
# metrics in one process per run; no Ray, no SuperLink; same metrics as the Flower
# simulation, tests/test_lean.py). It stops itself before the time limit and leaves every
# run resumable; run it again to continue, then `python -m benchmarks.report`.
#
#   benchmarks/gpu-sweep.sh prepare      # on a machine with the package registry: wheels for
#                                        # what the GPU machine lacks -> benchmarks/gpu-wheels/
#   benchmarks/gpu-sweep.sh run          # on the GPU machine (or any CUDA machine)
#   benchmarks/gpu-sweep.sh run --device cpu --grid benchmarks/gpu-grid-tiny.toml   # a CPU rehearsal
#
# Environment: PARALLEL (runs at a time, default 12), STOP_AFTER (seconds, default 480),
# OUT (results folder, default benchmarks/gpu-runs), PYTHON (default python3).
# On your own CUDA machine with the project installed (`pip install -e .`), `run` is all
# you need; the wheels only matter on a machine without Flower and medmnist.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python="${PYTHON:-python3}"
wheels="$here/benchmarks/gpu-wheels"
site="$here/.gpu-site"
action="${1:-run}"
shift || true

case "$action" in
  prepare)
    # Flower and what `import flwr.app` needs, medmnist (metadata and metrics) and pandas
    # (medmnist imports it): pure-Python or manylinux wheels for CPython 3.12, no deps
    # beyond these (torch, numpy, scikit-learn, PIL, rich, grpcio, protobuf are there).
    mkdir -p "$wheels"
    flwr_version="$("$python" -c 'import re, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(re.search(r"==([0-9.]+)", x).group(1) for x in d if x.startswith("flwr")))')"
    "$python" -m pip download --dest "$wheels" --only-binary=:all: --no-deps \
      --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 --implementation cp \
      "flwr==$flwr_version" pycryptodome cryptography cffi pycparser click typer shellingham httpx httpcore \
      h11 anyio sniffio certifi idna iterators medmnist pandas tzdata python-dateutil six fire termcolor tqdm
    du -sh "$wheels"
    echo "carry benchmarks/gpu-wheels with the working tree (it must stay under the transfer limit with the data)"
    ;;
  run)
    # installed or not, without importing them (importing medmnist loads pandas and PyTorch: 4 CPU-s)
    if ! "$python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('flwr', 'medmnist')))" 2>/dev/null; then
      [[ -d "$wheels" ]] || { echo "error: flwr/medmnist missing and no $wheels (run '$0 prepare' where the registry is reachable)" >&2; exit 2; }
      "$python" -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    device=cuda
    grid=benchmarks/gpu-grid.toml
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --device) device="$2"; shift 2 ;;
        --grid) grid="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
      esac
    done
    started=$(date +%s)
    "$python" -m benchmarks.sweep --grid "$grid" --engine lean --device "$device" \
      --parallel "${PARALLEL:-12}" --stop-after "${STOP_AFTER:-480}" --results-dir "${OUT:-benchmarks/gpu-runs}" || true
    echo "sweep wall time: $(( $(date +%s) - started )) s"
    "$python" -m benchmarks.sweep --grid "$grid" --results-dir "${OUT:-benchmarks/gpu-runs}" --dry-run | tail -1
    ;;
  *) echo "usage: $0 prepare|run [--device cuda|cpu] [--grid FILE]" >&2; exit 2 ;;
esac
