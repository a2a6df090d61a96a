#!/usr/bin/env bash
# The whole pilot on one machine, on loopback, with the real scripts: read it as the
# operator's walk-through of docs/pilot.md (sections 1-7), then adapt it.
#
#   pilot/rehearse.sh [--dir DIR] [--port PORT] [--rounds N] [--data-root DIR] [--keep]
#
#   --dir DIR        where everything goes (certs/, keys/, state/, sites/, hospital-*/,
#                    results/, logs/); default: a new folder under /tmp
#   --port PORT      the proxy's public port (default: a free one); the SuperLink takes
#                    another free port on 127.0.0.1 behind it
#   --rounds N       rounds of the run (default 2)
#   --data-root DIR  where breastmnist.npz is, or is downloaded to (default data/medmnist)
#   --keep           leave DIR in place (it always is when --dir is given)
#
# Steps, each printed with the command it runs: TLS material (make-certs.sh), a key pair
# per hospital (make-site-keys.sh), the SuperLink (start-superlink.sh) and the proxy in
# front of it (start-proxy.sh, nginx), the operator's CLI connection (pilot.connection),
# registration of both hospitals with their names, the site files (partitions.split),
# two SuperNodes (start-supernode.sh) and a run (`flwr run --stream`). Every process it
# started is stopped on exit, on an error and on Ctrl-C. Needs openssl and nginx
# (apt-get install openssl nginx-light). PYTHON: the project's Python (default
# .venv/bin/python, else python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="" port="" rounds=2 data_root="data/medmnist" keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) dir="$2"; keep=1; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --data-root) data_root="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$here"
python="${PYTHON:-}"
[[ -n "$python" ]] || { [[ -x .venv/bin/python ]] && python="$here/.venv/bin/python" || python="$(command -v python3)"; }
export PYTHON="$python" PATH="$(dirname "$python"):$PATH:/usr/sbin:/sbin" PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
for tool in openssl nginx flwr flower-supernode; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing (docs/pilot.md section 0)" >&2; exit 2; }
done
[[ -n "$dir" ]] || dir="$(mktemp -d "${TMPDIR:-/tmp}/pilot-rehearsal.XXXXXX")"
mkdir -p "$dir/logs"
dir="$(cd "$dir" && pwd)"
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
[[ -n "$port" ]] || port="$(free_port)"
superlink_port="$(free_port)"
# the operator's flwr CLI keeps its connection in $FLWR_HOME/config.toml (here, not ~/.flwr)
export FLWR_HOME="$dir/operator-flwr-home"

started=()  # process-group ids, in start order
descendants() {  # every process below $1 (Flower starts its SuperExec in a session of its own)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}
stop_all() {
  local status=$?
  trap - EXIT INT TERM
  echo
  echo "== stopping what this rehearsal started"
  local below=()
  for pgid in "${started[@]}"; do below+=($(descendants "$pgid")); done
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do  # SuperNodes first, the SuperLink last
    kill -TERM -- "-${started[i]}" 2>/dev/null || true
  done
  for pid in "${below[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done  # any that left the groups
  for pgid in "${started[@]}"; do
    for _ in $(seq 1 100); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [[ $keep -eq 0 && $status -eq 0 ]]; then rm -rf "$dir"; else echo "everything is in $dir"; fi
  exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; }
run() { show "$@"; "$@"; }
# start NAME CMD...: in its own session (so that stopping it stops its children), logging to logs/NAME.log
start() {
  local name="$1"
  shift
  show "$@" "  > $dir/logs/$name.log &"
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  started+=($!)
}
wait_for() {  # wait_for WHAT SECONDS TEST...
  local what="$1" seconds="$2"
  shift 2
  for _ in $(seq 1 $((seconds * 5))); do "$@" && return 0; sleep 0.2; done
  echo "error: $what not within $seconds s; the logs are in $dir/logs" >&2
  return 1
}
accepts() { "$python" -c "import socket, sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; }

step "1. TLS material for the SuperLink (coordinator): a CA and a certificate for localhost and 127.0.0.1"
run pilot/make-certs.sh -o "$dir/certs"

step "2. a key pair per hospital (each hospital makes its own; the .pub goes to the operator)"
run pilot/make-site-keys.sh -o "$dir/keys" hospital-a hospital-b

step "3. the SuperLink on loopback, and the proxy (nginx) in front of it on port $port"
mkdir -p "$dir/coordinator"
# the ServerApp runs in the SuperLink's working directory: the coordinator's own folder
start superlink bash -c "cd '$dir/coordinator' && exec '$here/pilot/start-superlink.sh' --certs '$dir/certs' \
  --db '$dir/state/superlink.db' --host 127.0.0.1 --port $superlink_port --log '$dir/state/superlink.log'"
wait_for "the SuperLink" 90 grep -q "Uvicorn running" "$dir/logs/superlink.log"
start proxy pilot/start-proxy.sh --superlink "127.0.0.1:$superlink_port" --certs "$dir/certs" \
  --host 127.0.0.1 --port "$port" --state-dir "$dir/state/proxy"
wait_for "the proxy" 30 accepts "$port"

step "4. the operator's CLI connection, and both hospitals registered with their names"
run "$python" -m pilot.connection pilot "127.0.0.1:$port" --root-certificates "$dir/certs/ca.crt" --default
run flwr supernode register "$dir/keys/hospital-a.key.pub" pilot --name hospital-a
run flwr supernode register "$dir/keys/hospital-b.key.pub" pilot --name hospital-b
run flwr supernode list pilot

step "5. the hospitals' data: breastmnist split into one file per hospital"
download=()
[[ -f "$data_root/breastmnist.npz" ]] || download=(--download)
run "$python" -m partitions.split --dataset breastmnist --data-root "$data_root" "${download[@]}" \
  --num-sites 2 --partition dirichlet-equal --alpha 0.5 --seed 0 --out "$dir/sites"

step "6. a SuperNode per hospital (each with its key, its data, its state folder)"
index=0
for site in hospital-a hospital-b; do
  start "supernode-$site" pilot/start-supernode.sh --superlink "127.0.0.1:$port" --ca "$dir/certs/ca.crt" \
    --key "$dir/keys/$site.key" --data-path "$dir/sites/site-$index.npz" \
    --site-name "$site" --state-dir "$dir/$site/state" --port "$(free_port)" --retry 12
  index=$((index + 1))
done
both_online() { [[ "$(flwr supernode list pilot 2>/dev/null | grep -c online)" -ge 2 ]]; }
wait_for "both SuperNodes online" 180 both_online
run flwr supernode list pilot

step "7. a run of $rounds rounds: submitted, streamed until it ends"
run flwr run . pilot --stream --run-config "dataset=\"breastmnist\" download=false
    num-server-rounds=$rounds local-epochs=1 warmup-epochs=1 measure-gamma=false
    min-replies=2 round-timeout=600.0 results-dir=\"$dir/results\""
run flwr ls pilot
summary="$(ls "$dir"/results/*/summary.json 2>/dev/null | head -n 1 || true)"
[[ -n "$summary" ]] || { echo "error: the run wrote no summary.json under $dir/results" >&2; exit 1; }
step "results: $(dirname "$summary")"
ls "$(dirname "$summary")"
cat "$summary"
echo "rehearsal finished: $rounds rounds over 2 hospitals"
