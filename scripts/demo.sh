#!/usr/bin/env bash
# The default job (`make run`): FusedSpaceFed and FedAvg side by side on a small non-IID
# federation that both can learn within a few minutes on a 2-core laptop, then a printed
# comparison and a plot (results/comparison.png). Ctrl-C stops everything it started.
#
#   scripts/demo.sh [DATA_ROOT]          (RUN_CONFIG="key=value ..." overrides the demo's settings)
#
# The published protocol (BloodMNIST, 10 sites, alpha 0.05, 50 rounds) is `make published`.
set -euo pipefail
cd "$(dirname "$0")/.."
data_root="${1:-data/medmnist}"
[[ -d "$data_root" ]] && data_root="$(cd "$data_root" && pwd)"  # absolute, like the results folder below
# absolute: the ServerApp writes relative to the local SuperLink's working directory, which is
# wherever the first `flwr run` on this machine started it
results="$(mkdir -p "${RESULTS:-results}" && cd "${RESULTS:-results}" && pwd)"
# the demo's settings live in core/demo.py (also read by the docs' figures and the tests)
python="${VENV:-.venv}/bin/python"
demo="$("$python" -m core.demo "data-root='$data_root' results-dir='$results' \
${DEMO_ROUNDS:+num-server-rounds=$DEMO_ROUNDS} ${RUN_CONFIG:-}")"
# every site at once: 5 sites with 1 CPU each on 2 cores would train in three waves (2, 2, 1),
# the last on one core; with cores/sites CPUs each (at most 1) they share the cores evenly
federation="$("$python" -m core.demo --federation)"
started=$(date +%s)
for method in fusedspacefed fedavg; do
  echo "== $method"
  # the demo starts afresh each time: its previous results (and simulated site state) go
  if [[ -d "$results/demo-$method" ]]; then
    echo "replacing the previous demo run in $results/demo-$method"
    rm -rf "$results/demo-$method"
  fi
  scripts/simulate.sh --run-config "$demo method='$method' run-name='demo-$method'" --federation-config "$federation"
done
"$python" -m server_app.compare "$results/demo-fusedspacefed" "$results/demo-fedavg" \
  --out "$results/comparison.png"
echo "demo finished in $(( $(date +%s) - started )) s; each run's own plots are in $results/demo-*/plots/"
