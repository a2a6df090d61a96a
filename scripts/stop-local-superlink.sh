#!/usr/bin/env bash
# Stop the background SuperLink that `flwr run` started for this checkout's local simulations
# (its FLWR_HOME and .venv: core/local_superlink.py), and every process it started (the
# simulation, its Ray head, raylet, agents and workers).
#   scripts/stop-local-superlink.sh          this checkout's
#   scripts/stop-local-superlink.sh --all    any local SuperLink on this machine, whoever started it
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
if [[ "${1:-}" == --all || ! -x "$VENV/bin/python" ]]; then
  roots=$(pgrep -f "flower-superlink --insecure --simulation" || true)
else
  roots=$("$VENV/bin/python" -m core.local_superlink pids)
fi
if [[ -z "$roots" ]]; then
  echo "no local SuperLink of this checkout running${1:+ (--all: none at all)}"
  exit 0
fi
descendants() {
  local pid kids
  for pid in "$@"; do
    kids=$(pgrep -P "$pid" || true)
    if [[ -n "$kids" ]]; then
      echo $kids
      descendants $kids
    fi
  done
}
# collect the whole tree first: once a parent dies its children are re-parented to init
all="$roots $(descendants $roots)"
kill -TERM $all 2>/dev/null || true
for _ in 1 2 3 4 5 6 7 8 9 10; do
  alive=$(for p in $all; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
  [[ -z "$alive" ]] && break
  sleep 0.5
done
[[ -n "${alive:-}" ]] && kill -KILL $alive 2>/dev/null
echo "local SuperLink and its $(echo $all | wc -w) processes stopped"
