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
#
# Before the run, `--run-config` is checked against core.config.RunConfig (python -m
# core.check_config): a bad value stops here with one line naming the key and what is allowed.
# Each simulated site gets FSF_CPUS_PER_SITE CPUs (default 1; Flower's own default is 2, which
# on a 2-core machine runs the sites one at a time) unless --federation-config sets
# client-resources-num-cpus; FSF_CPUS_PER_SITE= (empty) leaves it to the SuperLink's setting.
# A local SuperLink this script starts gets the same default for later plain `flwr run .` calls.
# Exit status: 0 only when the run finished as `finished:completed` (python -m core.run_status
# reads it from the SuperLink; `flwr run --stream` itself exits 0 even when the ServerApp failed),
# 2 for a configuration error, 3 when the local SuperLink belongs to another checkout or install
# (core/local_superlink.py; one of this checkout's that predates its last install is restarted),
# otherwise non-zero.
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

# The options this script reads: every --run-config (-c) value, and whether any
# --federation-config sets the CPUs per site or is a .toml file (Flower accepts no pairs beside one).
run_configs=()
federation_sets_cpus=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  arg="${args[$i]}"
  value=""
  case "$arg" in
    --run-config=*) run_configs+=("${arg#--run-config=}") ;;
    --run-config | -c) run_configs+=("${args[$((i + 1))]:-}") ;;
    --federation-config=*) value="${arg#--federation-config=}" ;;
    --federation-config) value="${args[$((i + 1))]:-}" ;;
  esac
  [[ "$value" == *client-resources-num-cpus* || "$value" == *.toml ]] && federation_sets_cpus=1
done
check=()
for rc in "${run_configs[@]+"${run_configs[@]}"}"; do check+=(--run-config "$rc"); done
"$VENV/bin/python" -m core.check_config "${check[@]+"${check[@]}"}" || exit $?

# The local SuperLink runs the simulation with the code and packages it was started with: one
# left by another checkout (or a stale install of this one) must not run this app silently.
local_federation=0
if [[ ! -f "$FLWR_HOME/config.toml" ]] || grep -q '^default = "local"' "$FLWR_HOME/config.toml"; then
  local_federation=1
fi
if [[ "$local_federation" == 1 ]]; then
  guard=0
  "$VENV/bin/python" -m core.local_superlink check || guard=$?
  case "$guard" in
    0) ;;
    4) scripts/stop-local-superlink.sh >&2 ;;
    *) exit 3 ;;
  esac
fi

cpus="${FSF_CPUS_PER_SITE-1}"
defaults=()
if [[ -n "$cpus" && "$federation_sets_cpus" == 0 ]]; then
  # first, so that a later --federation-config of the caller's own wins
  defaults=(--federation-config "client-resources-num-cpus=$cpus")
  # A local SuperLink started here gets the same default, for plain `flwr run .` calls after this one.
  if [[ "$local_federation" == 1 ]]; then
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}") 2>/dev/null; then
      flwr federation simulation-config --client-resources-num-cpus "$cpus" >/dev/null ||
        echo "warning: could not set the local SuperLink's default CPUs per site" >&2
    fi
  fi
fi

output="$(mktemp "${TMPDIR:-/tmp}/fsf-flwr-run.XXXXXX")"
trap 'rm -f "$output"' EXIT
flwr run . --stream "${defaults[@]+"${defaults[@]}"}" "$@" > >(tee "$output" | grep --line-buffered -v -E "$filter") 2>&1 &
child=$!
status=0
wait "$child" || status=$?
child=""
sleep 0.2 # let tee write the last of the output to $output
[[ "$status" != 0 ]] && { echo "flwr run exited with status $status" >&2; exit "$status"; }
"$VENV/bin/python" -m core.run_status "$output"
