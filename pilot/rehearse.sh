#!/usr/bin/env bash
# The whole pilot on one machine, on loopback, with the real scripts: read it as the
# operator's walk-through of docs/pilot.md (sections 1-7), then adapt it.
#
#   pilot/rehearse.sh [--dir DIR] [--port PORT] [--rounds N] [--data-root DIR] [--keep]
#
#   --dir DIR        where everything goes (pilot/ for PILOT_DIR, hospital-*/ for each
#                    SITE_DIR, results/, logs/); default: a new folder under /tmp
#   --port PORT      the proxy's public port (default: a free one); the SuperLink takes
#                    another free port on 127.0.0.1 behind it
#   --rounds N       rounds of the run (default 2)
#   --data-root DIR  DATA_ROOT: where breastmnist.npz is, or is downloaded to (default data/medmnist)
#   --keep           leave DIR in place (it always is when --dir is given)
#
# It runs the commands of docs/pilot.md's sections 1-7 exactly as they are written there
# (pilot/guide.py reads them from the guide), with the guide's Settings set for loopback:
# TLS material (make-certs.sh), a key pair per hospital (make-site-keys.sh), the SuperLink
# (start-superlink.sh) and the proxy in front of it (start-proxy.sh, nginx), the
# operator's CLI connection (pilot.connection), registration of both hospitals with their
# names, the site files (partitions.split), two SuperNodes (start-supernode.sh) and a run
# (`flwr run --stream`, `flwr ls`, `flwr log`). It prints each command before it runs it,
# and each command of the guide it does not run (scp, sudo, `flwr stop`) with the reason.
# Every process it started is stopped on exit, on an error and on Ctrl-C. Needs openssl
# and nginx (apt-get install openssl nginx-light). PYTHON: the project's Python (default
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
wait_for() {  # wait_for WHAT SECONDS TEST...: a wall-clock deadline (a TEST such as `flwr` takes seconds)
  local what="$1" seconds="$2" log
  shift 2
  local deadline=$((SECONDS + seconds))
  while ((SECONDS < deadline)); do "$@" && return 0; sleep 0.5; done
  echo "error: $what not within $seconds s; the logs are in $dir/logs (their last lines below)" >&2
  for log in "$dir"/logs/*.log "$PILOT_DIR"/state/superlink.log "$dir"/hospital-*/state/worker.log; do
    [[ -f "$log" ]] || continue
    echo "-- $log" >&2
    tail -n 15 "$log" >&2
  done
  return 1
}
accepts() { "$python" -c "import socket, sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; }

# -- docs/pilot.md's commands, exactly as written there (pilot/guide.py reads them) ----------------
# doc SECTION PREFIX: run every command of that section that starts with PREFIX;
# start NAME SECTION PREFIX: start the one such command in the background (logs/NAME.log);
# skip SECTION PREFIX REASON: say why a command of the guide does not run in this rehearsal.
guide() {
  local found=()
  mapfile -d '' -t found < <("$python" -m pilot.guide show "$1" "$2")
  [[ ${#found[@]} -gt 0 ]] || { echo "error: docs/pilot.md section $1 has no command starting with '$2'" >&2; exit 1; }
  printf '%s\0' "${found[@]}"
}
doc() {
  local cmds=()
  mapfile -d '' -t cmds < <(guide "$1" "$2")
  [[ ${#cmds[@]} -gt 0 ]] || exit 1
  for cmd in "${cmds[@]}"; do show "$cmd"; bash -c "$cmd" </dev/null; done
}
start() {
  local name="$1" cmds=()
  mapfile -d '' -t cmds < <(guide "$2" "$3")
  [[ ${#cmds[@]} -eq 1 ]] || { echo "error: section $2 has ${#cmds[@]} commands starting with '$3', not one" >&2; exit 1; }
  show "${cmds[0]}"
  echo "  (in the background; its output: $dir/logs/$name.log)"
  setsid bash -c "${cmds[0]}" >"$dir/logs/$name.log" 2>&1 </dev/null &
  started+=($!)
}
skipped=()
skip() {
  local cmds=()
  mapfile -d '' -t cmds < <(guide "$1" "$2")
  [[ ${#cmds[@]} -gt 0 ]] || exit 1
  for cmd in "${cmds[@]}"; do printf 'skipped here (%s):\n    %s\n' "$3" "${cmd//$'\n'/$'\n'    }"; done
  skipped+=("section $1: $2 ($3)")
}

step "Settings (docs/pilot.md): the guide's variables, for one machine on loopback"
skip settings "" "the rehearsal sets these for loopback: printed below"
export PILOT_DIR="$dir/pilot" COORDINATOR=127.0.0.1 COORDINATOR_IP=127.0.0.1 PORT="$port"
export SUPERLINK_PORT="$superlink_port" OPERATOR_IP=127.0.0.1 DATA_ROOT="$data_root" RESULTS="$dir/results"
export ROUNDS="$rounds" EPOCHS=1
hospitals=(hospital-a hospital-b)
for name in PILOT_DIR COORDINATOR COORDINATOR_IP PORT SUPERLINK_PORT OPERATOR_IP DATA_ROOT RESULTS ROUNDS EPOCHS; do
  echo "$name=${!name}"
done
echo "and at each hospital: SITE=hospital-a or hospital-b, SITE_DIR=$dir/SITE, CLIENTAPP_PORT=a free port"
# each hospital's own settings (its shell's, in the guide)
at_hospital() {
  local index="$1"
  export SITE="${hospitals[index]}" SITE_DIR="$dir/${hospitals[index]}" CLIENTAPP_PORT="${clientapp_ports[index]}"
}
clientapp_ports=("$(free_port)" "$(free_port)")

step "1. TLS material for the SuperLink (coordinator)"
doc 1 "pilot/make-certs.sh"
doc 1 "openssl x509"

step "2. a key pair per hospital (each hospital makes its own; the .pub goes to the operator)"
for index in 0 1; do
  at_hospital "$index"
  echo "(at $SITE: SITE=$SITE)"
  doc 2 "pilot/make-site-keys.sh"
  if command -v ssh-keygen >/dev/null; then
    doc 2 "ssh-keygen"
  else
    skip 2 "ssh-keygen" "ssh-keygen is not installed on this machine"
  fi
done
echo "(one machine: the .pub files are already in the operator's \$PILOT_DIR/keys/)"

step "3. the SuperLink on loopback, and the proxy (nginx) in front of it on port $PORT"
start superlink 3 "pilot/start-superlink.sh"
wait_for "the SuperLink" 90 grep -q "Uvicorn running" "$dir/logs/superlink.log"
start proxy 3 "pilot/start-proxy.sh"
wait_for "the proxy" 30 accepts "$PORT"

step "4. the operator's CLI connection, and both hospitals registered with their names"
doc 4 "python -m pilot.connection"
doc 4 "flwr supernode register"
doc 4 "flwr supernode list"

step "5. the hospitals' data: breastmnist split into one file per hospital"
doc 5 "python -m partitions.split"
skip 5 "scp " "one machine: each hospital's file is copied into its SITE_DIR below instead"
for index in 0 1; do
  at_hospital "$index"
  run mkdir -p "$SITE_DIR"
  run cp "$PILOT_DIR/sites/site-$index.npz" "$SITE_DIR/site.npz"
done

step "6. a SuperNode per hospital (each with its key, its data, its state folder)"
skip 6 "sudo " "needs root and two system users: tests/test_pilot_isolation.py rehearses the isolated ClientApp as root"
for index in 0 1; do
  at_hospital "$index"
  echo "(at $SITE: SITE=$SITE SITE_DIR=$SITE_DIR CLIENTAPP_PORT=$CLIENTAPP_PORT)"
  start "supernode-$SITE" 6 "pilot/start-supernode.sh"
done
both_online() { [[ "$(flwr supernode list pilot 2>/dev/null | grep -c online)" -ge 2 ]]; }
wait_for "both SuperNodes online" 300 both_online
doc 4 "flwr supernode list"

step "7. a run of $ROUNDS rounds: submitted, streamed until it ends"
doc 7 "flwr run"
doc 7 "flwr ls"
RUN_ID="$(flwr ls pilot --format json | "$python" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["run-id"])')"
export RUN_ID
echo "RUN_ID=$RUN_ID (the run's id, from flwr ls)"
doc 7 "flwr log"
skip 7 "flwr stop" "the run has ended: nothing to stop (tests/test_pilot_proxy.py stops runs through the proxy)"
summary="$(ls "$RESULTS"/*/summary.json 2>/dev/null | head -n 1 || true)"
[[ -n "$summary" ]] || { echo "error: the run wrote no summary.json under $RESULTS" >&2; exit 1; }
step "results: $(dirname "$summary")"
ls "$(dirname "$summary")"
cat "$summary"

step "not part of sections 1-7"
skip 8 "flwr run" "a resume after a SuperLink restart: benchmarks/network_faults.py (case superlink-kill) and tests/test_pilot_faults.py rehearse it"
skip "rehearsal on one machine" "pilot/rehearse.sh" "this rehearsal itself, which runs all of the above"
skip "rehearsal on one machine" ".venv/bin/pytest" "the pilot's tests, which run this rehearsal among others"
echo "rehearsal finished: $ROUNDS rounds over 2 hospitals, every command of docs/pilot.md sections 1-7 run as written but ${#skipped[@]} skipped:"
printf '  %s\n' "${skipped[@]}"
