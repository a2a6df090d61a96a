#!/usr/bin/env bash
# Run this Flower app in Flower's local (Ray) simulation with the project's virtualenv.
#
#   scripts/simulate.sh [flwr run options...]
#   scripts/simulate.sh --run-config "dataset='breastmnist' num-server-rounds=2" --federation-config "num-supernodes=3"
#
# Why a wrapper: Flower's local SuperLink would otherwise build a fresh virtualenv per run
# (`uv sync`, several GB for torch); this app runs in the environment it is installed in.
# FLWR_HOME defaults to .flwr-home/ in the repository so runs do not touch ~/.flwr.
# Ctrl-C stops the run and every process the local simulation started (scripts/stop-local-superlink.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export PATH="$PWD/$VENV/bin:$PATH"
# Ray warns on every worker that a future version will stop overriding accelerator
# variables when no GPU is requested; opting in to that behaviour now silences it.
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="${RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO:-0}"
mkdir -p "$FLWR_HOME"
stop() {
  trap - INT TERM
  echo >&2
  echo "interrupted: stopping the run and the local simulation (scripts/stop-local-superlink.sh)" >&2
  [[ -n "${child:-}" ]] && kill -TERM "$child" 2>/dev/null
  scripts/stop-local-superlink.sh >&2
  exit 130
}
trap stop INT TERM
# Flower's simulation prints, every run, a warning about its default SuperNode count and how
# to change it (flwr/simulation/app.py, unconditional) even when the count is given: filtered
# out here (FSF_RAW_OUTPUT=1 shows everything).
filter='Since flwr 1.32, default simulated SuperNodes|To change federation size|flwr federation simulation-config'
[[ "${FSF_RAW_OUTPUT:-0}" == 1 ]] && filter='^$^'
flwr run . --stream "$@" > >(grep --line-buffered -v -E "$filter") 2>&1 &
child=$!
wait "$child"
