#!/usr/bin/env bash
# Start the pilot's SuperLink: TLS, SuperNode authentication, a persistent database.
#
#   pilot/start-superlink.sh [--certs DIR] [--db FILE] [--host ADDR] [--port PORT] [--log FILE]
#       [--unguarded] [-- EXTRA...]
#
#   --certs DIR  ca.crt, superlink.crt, superlink.key from make-certs.sh (default pilot/certs)
#   --db FILE    SQLite database: registered SuperNodes and runs survive a restart
#                (default pilot/state/superlink.db)
#   --host ADDR  address to listen on: loopback only (default 127.0.0.1). The sites reach it
#                through pilot/start-proxy.sh, which keeps the Control API (flwr run, stop)
#                to the operator; listening on another address (0.0.0.0) bypasses that guard,
#                so any site holding ca.crt could submit runs, and is refused
#   --unguarded  allow a --host other than loopback anyway (a closed test network only)
#   --port PORT  the one port for SuperNodes (Fleet API), the flwr CLI (Control API) and
#                the ServerApp (default 8000, as flower-superlink)
#   --log FILE   also write the log to FILE (rotated daily)
# The ServerApp runs with this process's working directory: relative results-dir paths
# land there. Telemetry and the update check are off unless the environment turns them
# on; app dependencies are never installed at run time (install them beforehand).
# PYTHON: the Python that has Flower installed (default python3).
set -euo pipefail

certs="pilot/certs"
db="pilot/state/superlink.db"
host="127.0.0.1"
port=8000
log=""
unguarded=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) certs="$2"; shift 2 ;;
    --db) db="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    --unguarded) unguarded=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! "$host" =~ ^(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|::1|\[::1\])$ && $unguarded -eq 0 ]]; then
  echo "error: --host $host is not loopback: the sites would reach the Control API around pilot/start-proxy.sh" \
    "(anyone holding ca.crt could submit runs). Keep --host 127.0.0.1 and start the proxy in front;" \
    "--unguarded allows it on a closed test network" >&2
  exit 2
fi
for f in ca.crt superlink.crt superlink.key; do
  [[ -f "$certs/$f" ]] || { echo "error: $certs/$f is missing; create it with pilot/make-certs.sh" >&2; exit 2; }
done
mkdir -p "$(dirname "$db")"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
# The ServerApp's SuperExec looks for new runs every second (Flower's default): a run starts up
# to a second after it is submitted. Polling every 0.1 s (as the sites' SuperExecs do, once per
# message) saved that second at 4 CPU-s a minute of the SuperLink's while idle
# (benchmarks/PILOT-IDLE.md); set the variable to change it.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-1.0}"
args=(
  --ssl-ca-certfile "$certs/ca.crt"
  --ssl-certfile "$certs/superlink.crt"
  --ssl-keyfile "$certs/superlink.key"
  --enable-supernode-auth
  --database "$db"
  --host "$host"
  --port "$port"
  --disable-runtime-dependency-installation
)
[[ -n "$log" ]] && args+=(--log-file "$log")
# flower-superlink itself, with a longer SQLite busy timeout (see pilot/superlink.py)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m pilot.superlink "${args[@]}" "${extra[@]}"
