#!/usr/bin/env bash
# Start one site's SuperNode, after checking its TLS trust, key, data and state folder.
#
#   pilot/start-supernode.sh --superlink HOST:PORT --ca ca.crt --key SITE.key \
#       --data-path FILE_OR_FOLDER --site-name NAME --state-dir DIR \
#       [--dataset FLAG] [--image-size N] [--port PORT] [--retry N] [--retry-wait S]
#       [--allow-gradients] [--no-worker] [-- EXTRA...]
#
#   --superlink  the SuperLink's address, a name its certificate holds (make-certs.sh)
#   --ca         the pilot's ca.crt (not the CA key)
#   --key        this site's private key (make-site-keys.sh); its .pub must be registered
#   --data-path  the site's own data: an npz (python -m partitions.split) or an image folder
#   --site-name  a stable name: the site's private state is kept under state-dir/<run>/<name>
#   --state-dir  where the site's private encoder (and SCAFFOLD variate) is written each round
#   --dataset    the run's dataset (default: read from a partitions.split file)
#   --port       local port for the ClientApp runtime API (default 9094; one per SuperNode)
#   --allow-gradients  opt this site in to sending classifier gradients when a run sets
#                measure-gamma = true (off by default: gradients can be inverted to images)
#   --no-worker  do not start the warm site worker (python -m client_app.worker): every
#                message then imports PyTorch and loads the data in a fresh process
#   --retry N    restart the SuperNode up to N times when it exits with an error, S seconds
#                apart (--retry-wait, default 10): after a crash the SuperLink refuses the
#                node until it has missed its heartbeats (up to 60 s)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
superlink="" ca="" key="" data="" name="" state="" dataset="" size=28 port=9094 retry=0 retry_wait=10
gradients=false worker=true
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --data-path) data="$2"; shift 2 ;;
    --site-name) name="$2"; shift 2 ;;
    --state-dir) state="$2"; shift 2 ;;
    --dataset) dataset="$2"; shift 2 ;;
    --image-size) size="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --retry) retry="$2"; shift 2 ;;
    --retry-wait) retry_wait="$2"; shift 2 ;;
    --allow-gradients) gradients=true; shift ;;
    --no-worker) worker=false; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in superlink ca key data name state; do
  [[ -n "${!v}" ]] || { echo "error: --${v/data/data-path} is required (see --help)" >&2; exit 2; }
done
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: --site-name may only hold letters, digits, . _ -" >&2; exit 2; }
abs() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd)" "$(basename "$1")"); }
data="$(abs "$data")"
mkdir -p "$state"
state="$(abs "$state")"

python="${PYTHON:-python3}"
check() { PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pilot.preflight "$@"; }
check key --key "$key"
check site --data-path "$data" ${dataset:+--dataset "$dataset"} --image-size "$size" --state-dir "$state"
check tls --superlink "$superlink" --root-certificates "$ca"

export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
# Flower's SuperExec looks for a new ClientApp task every second by default; a round
# waits for that poll twice per message (0.01-60 s allowed).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"

# The warm site worker: one process that keeps PyTorch, the data and the model code
# loaded; each message's fresh ClientApp process hands it the message over a Unix
# socket (mode 0600) in the state folder. Its private state is on disk as always, so
# the worker may be restarted at any time (this script restarts it when it dies); while it
# is down, messages run in-process.
node_config="data-path=\"$data\" site-name=\"$name\" state-dir=\"$state\" allow-gradients=$gradients"
worker_pid=""
if [[ "$worker" == true ]]; then
  sock="$state/worker.sock"
  rm -f "$sock"
  # supervised: a worker that dies (killed, out of memory) is started again; a TERM to the
  # supervisor stops it and its worker
  supervise_worker() {
    local child="" code
    trap '[[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null; wait; exit 0' TERM INT
    while true; do
      PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m client_app.worker --socket "$sock" &
      child=$!
      wait "$child" && code=0 || code=$?
      child=""
      echo "site worker exited with status $code; starting it again in 2 s" >&2
      sleep 2
    done
  }
  supervise_worker >>"$state/worker.log" 2>&1 &
  worker_pid=$!
  for _ in $(seq 1 600); do
    [[ -S "$sock" ]] && break
    kill -0 "$worker_pid" 2>/dev/null || { echo "error: the site worker failed to start; see $state/worker.log" >&2; exit 1; }
    sleep 0.2
  done
  [[ -S "$sock" ]] || { echo "error: the site worker did not open $sock within 120 s; see $state/worker.log" >&2; exit 1; }
  echo "site worker ready (pid $worker_pid, log $state/worker.log)" >&2
  node_config="$node_config site-worker=\"$sock\""
fi
stop_worker() { [[ -n "$worker_pid" ]] && kill -TERM "$worker_pid" 2>/dev/null; true; }
trap stop_worker EXIT
cmd=(
  flower-supernode
  --superlink "$superlink"
  --root-certificates "$ca"
  --auth-supernode-private-key "$key"
  --port "$port"
  --node-config "$node_config"
  "${extra[@]}"
)
child=""
trap '[[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null; stop_worker; wait; exit 143' TERM INT
for ((attempt = 0; ; attempt++)); do
  "${cmd[@]}" &
  child=$!
  status=0
  wait "$child" || status=$?
  child=""
  [[ $status -eq 0 || $attempt -ge $retry ]] && exit "$status"
  echo "SuperNode exited with status $status; restarting in $retry_wait s (attempt $((attempt + 1)) of $retry)" >&2
  sleep "$retry_wait"
done
