#!/usr/bin/env bash
# Stop the background SuperLink that `flwr run` started for local simulations, and every
# process it started (the simulation, its Ray head, raylet, agents and workers).
set -uo pipefail
roots=$(pgrep -f "flower-superlink --insecure --simulation" || true)
if [[ -z "$roots" ]]; then
  echo "no local SuperLink running"
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
