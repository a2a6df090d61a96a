#!/usr/bin/env bash
# Run this Flower app in Flower's local (Ray) simulation with the project's virtualenv.
#
#   scripts/simulate.sh [flwr run options...]
#   scripts/simulate.sh --run-config "dataset='breastmnist' num-server-rounds=2" --federation-config "num-supernodes=3"
#
# Why a wrapper: Flower 1.41's local SuperLink would otherwise build a fresh virtualenv per
# run (`uv sync`, several GB for torch); this app runs in the environment it is installed in.
# FLWR_HOME defaults to .flwr-home/ in the repository so runs do not touch ~/.flwr.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export PATH="$PWD/$VENV/bin:$PATH"
mkdir -p "$FLWR_HOME"
exec flwr run . --stream "$@"
