#!/usr/bin/env bash
# Start one site's SuperNode, after checking its TLS trust, key, data and state folder.
#
#   pilot/start-supernode.sh --superlink HOST:PORT --ca ca.crt --key SITE.key \
#       --data-path FILE_OR_FOLDER --site-name NAME --state-dir DIR \
#       [--dataset FLAG] [--image-size N] [--port PORT] [--retry N] [--retry-wait S]
#       [--allow-gradients] [--min-dp-noise-multiplier M] [--no-worker]
#       [--isolate-app-user USER --site-user SITE_USER [--app-dir DIR]] [-- EXTRA...]
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
#   --min-dp-noise-multiplier M  take part only in runs with differential privacy of at
#                least noise multiplier M (node config min-dp-noise-multiplier; docs/privacy.md)
#   --no-worker  do not start the warm site worker (python -m client_app.worker): every
#                message then imports PyTorch and loads the data in a fresh process
#   --retry N    restart the SuperNode up to N times when it exits with an error or gives up
#                reconnecting (Flower's "Giving up reconnection": the script then stops it and
#                it exits with 75), S seconds apart (--retry-wait, default 10): after a crash
#                the SuperLink refuses the node until it has missed its heartbeats (up to 60 s).
#                On a network that may partition for minutes, keep N large (e.g. 1000)
#   --isolate-app-user USER  run every run's ClientApp (code the coordinator sends) as USER,
#                a system user that cannot read --data-path, --state-dir or --key (checked
#                before the start). Needs root. The SuperNode runs with --isolation process;
#                `flower-superexec`, which starts the ClientApps, runs as USER; the site worker
#                (required) is the only reader of the data and takes its node config from
#                this script, and its socket is USER's only way in. Create USER once:
#                useradd --system --user-group --no-create-home --shell /usr/sbin/nologin USER
#   --site-user SITE_USER  with --isolate-app-user: the site worker (which the untrusted app
#                talks to) runs as SITE_USER, neither root nor USER. SITE_USER must read
#                --data-path (e.g. chown SITE_USER FILE; chmod 0600 FILE); the script gives it
#                --state-dir. Create it once like USER (another name, e.g. fsf-site)
#   --app-dir DIR  USER's side (default STATE-DIR.app): the worker's socket and the SuperExec
#                secret (group USER, 0750) and USER's own FLWR_HOME (home/); every folder
#                above it must be searchable by USER
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
superlink="" ca="" key="" data="" name="" state="" dataset="" size=28 port=9094 retry=0 retry_wait=10
gradients=false worker=true app_user="" app_dir="" min_dp="" site_user=""
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
    --min-dp-noise-multiplier) min_dp="$2"; shift 2 ;;
    --no-worker) worker=false; shift ;;
    --isolate-app-user) app_user="$2"; shift 2 ;;
    --app-dir) app_dir="$2"; shift 2 ;;
    --site-user) site_user="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in superlink ca key data name state; do
  [[ -n "${!v}" ]] || { echo "error: --${v/data/data-path} is required (see --help)" >&2; exit 2; }
done
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: --site-name may only hold letters, digits, . _ -" >&2; exit 2; }
fail() { echo "error: $*" >&2; exit 2; }
[[ -z "$min_dp" || "$min_dp" =~ ^[0-9]+(\.[0-9]+)?$ ]] || fail "--min-dp-noise-multiplier must be a number, got '$min_dp'"
abs() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd)" "$(basename "$1")"); }
data="$(abs "$data")"
mkdir -p "$state"
chmod 0700 "$state"
state="$(abs "$state")"
# everything this site writes from here on (worker.log with its pre-clip norms, Flower's files) is its user's only
umask 077

python="${PYTHON:-python3}"
check() { PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pilot.preflight "$@"; }
check key --key "$key"
check site --data-path "$data" ${dataset:+--dataset "$dataset"} --image-size "$size" --state-dir "$state"
check tls --superlink "$superlink" --root-certificates "$ca"

# The ClientApp as its own user: it may hand messages to the worker, and read nothing of the site's.
as_app=() as_site=()
[[ -z "$site_user" || -n "$app_user" ]] || fail "--site-user goes with --isolate-app-user (without it, run this script as the site's user)"
if [[ -n "$app_user" ]]; then
  [[ $EUID -eq 0 ]] || fail "--isolate-app-user needs root (to start the ClientApp side as $app_user)"
  [[ "$worker" == true ]] || fail "--isolate-app-user needs the site worker (drop --no-worker): it is the only reader of the data"
  command -v setpriv >/dev/null || fail "setpriv is missing (apt-get install util-linux)"
  app_uid="$(id -u "$app_user" 2>/dev/null)" ||
    fail "user $app_user does not exist; create it: useradd --system --user-group --no-create-home --shell /usr/sbin/nologin $app_user"
  app_gid="$(id -g "$app_user")"
  [[ "$app_uid" -ne 0 ]] || fail "--isolate-app-user must name an unprivileged user, not $app_user (uid 0)"
  as_app=(setpriv --reuid "$app_uid" --regid "$app_gid" --init-groups --inh-caps=-all --no-new-privs --)
  [[ -n "$site_user" ]] ||
    fail "--isolate-app-user needs --site-user SITE_USER: the worker the app talks to must not run as root; create it: useradd --system --user-group --no-create-home --shell /usr/sbin/nologin fsf-site"
  site_uid="$(id -u "$site_user" 2>/dev/null)" ||
    fail "user $site_user does not exist; create it: useradd --system --user-group --no-create-home --shell /usr/sbin/nologin $site_user"
  site_gid="$(id -g "$site_user")"
  [[ "$site_uid" -ne 0 && "$site_uid" -ne "$app_uid" ]] ||
    fail "--site-user must be an unprivileged user other than $app_user, not $site_user (uid $site_uid)"
  if id -G "$site_user" | tr ' ' '\n' | grep -qx "$app_gid"; then
    fail "$site_user must not be in $app_user's group ($app_gid)"
  fi
  as_site=(setpriv --reuid "$site_uid" --regid "$site_gid" --init-groups --inh-caps=-all --no-new-privs --)
  chown -R "$site_uid:$site_gid" "$state"
  "${as_site[@]}" test -w "$state" ||
    fail "$site_user cannot reach $state: every folder above it must be searchable by $site_user (chmod o+x)"
  "${as_site[@]}" test -r "$data" ||
    fail "$site_user cannot read $data; make it $site_user's (chown -R $site_user PATH; chmod -R go-rwx PATH)"
  app_dir="${app_dir:-$state.app}"
  mkdir -p "$app_dir/home"
  app_dir="$(abs "$app_dir")"
  [[ "$app_dir/" != "$state/"* ]] || fail "--app-dir must lie outside --state-dir (which $app_user must not read)"
  # the worker (as the site user) makes its socket here; setgid: the socket gets the app user's group
  chown "$site_uid:$app_gid" "$app_dir" && chmod 2750 "$app_dir"
  chown "$app_uid:$app_gid" "$app_dir/home" && chmod 0700 "$app_dir/home"
  superexec="$(command -v flower-superexec)" || fail "flower-superexec is not on PATH"
  "${as_app[@]}" env -i "$superexec" -V >/dev/null 2>&1 ||
    fail "$app_user cannot run $superexec (or its Python): install the project's environment where others may read and run it (e.g. /opt/fusedspacefed with a system Python)"
  "${as_app[@]}" test -x "$app_dir" ||
    fail "$app_user cannot reach $app_dir: every folder above it must be searchable by others (chmod o+x), or choose another --app-dir"
  # what the untrusted code must not read (find lists only what it can see; keep the data's folders 0700/0750)
  readable="$("${as_app[@]}" find "$data" "$state" "$(abs "$key")" -readable -print 2>/dev/null | head -5 || true)"
  [[ -z "$readable" ]] || fail "$app_user can read the site's data, state or key, e.g.:
$readable
make them the site user's only (chmod -R go-rwx PATH, or chown and chmod 0750 with a group $app_user is not in)"
  secret="$app_dir/superexec.secret"
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret")
  chown "0:$app_gid" "$secret" && chmod 0640 "$secret"
  echo "ClientApps run as $app_user (uid $app_uid); its side: $app_dir" >&2
fi

export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
# Flower's SuperExec looks for a new ClientApp task every second by default; a round
# waits for that poll twice per message (0.01-60 s allowed).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"

# The warm site worker: one process that keeps PyTorch, the data and the model code
# loaded; each message's fresh ClientApp process hands it the message over a Unix
# socket (mode 0600) in the state folder. Its private state is on disk as always, so
# the worker may be restarted at any time (this script restarts it when it dies); while it
# is down, messages run in-process. With --isolate-app-user the socket is in the app
# user's folder (0660, its group), the worker takes the node config from here, and
# messages fail while it is down (the app user cannot read the data).
node_config="data-path=\"$data\" site-name=\"$name\" state-dir=\"$state\" allow-gradients=$gradients"
[[ -z "$min_dp" ]] || node_config="$node_config min-dp-noise-multiplier=$min_dp"  # the worker's too
# supervised: a process that dies (killed, out of memory) is started again; a TERM to the
# supervisor stops it and its process
supervise() {
  local what="$1" child="" code
  shift
  trap '[[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null; wait; exit 0' TERM INT
  while true; do
    "$@" &
    child=$!
    wait "$child" && code=0 || code=$?
    child=""
    # 78 (EX_CONFIG): a start no restart can mend, such as a socket path that is too long
    [[ $code -ne 78 ]] || { echo "$what exited with status 78 (a configuration error): not restarting it" >&2; exit 78; }
    echo "$what exited with status $code; starting it again in 2 s" >&2
    sleep 2
  done
}
worker_pid="" superexec_pid="" sock_dir=""
if [[ "$worker" == true ]]; then
  sock="$state/worker.sock"
  [[ -z "$app_user" ]] || sock="$app_dir/worker.sock"
  # a Unix socket's path holds at most 107 bytes: under a deep folder the socket goes into a
  # short private folder of its own instead (the same owner, group and mode as its place)
  if (( ${#sock} > 107 )); then
    sock_dir="$(mktemp -d /tmp/fsf-worker.XXXXXX)"  # 0700, this user's
    [[ -z "$app_user" ]] || { chown "$site_uid:$app_gid" "$sock_dir" && chmod 2750 "$sock_dir"; }
    echo "the worker's socket $sock would be ${#sock} bytes, over the 107 a Unix socket allows: it is $sock_dir/worker.sock" >&2
    sock="$sock_dir/worker.sock"
  fi
  worker_args=(--socket "$sock")
  if [[ -n "$app_user" ]]; then
    node_config="$node_config site-worker=\"$sock\" site-worker-required=true"
    worker_args=(--socket "$sock" --group "$app_gid" --node-config "$node_config")
  fi
  rm -f "$sock" "$sock.stopping"
  touch "$state/worker.log" && chmod 0600 "$state/worker.log"  # it logs the pre-clip update norms
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
    supervise "site worker" "${as_site[@]}" env HOME="$state" "$python" -m client_app.worker "${worker_args[@]}" \
    >>"$state/worker.log" 2>&1 &
  worker_pid=$!
  for _ in $(seq 1 600); do
    [[ -S "$sock" ]] && break
    kill -0 "$worker_pid" 2>/dev/null || { echo "error: the site worker failed to start; see $state/worker.log" >&2; exit 1; }
    sleep 0.2
  done
  [[ -S "$sock" ]] || { echo "error: the site worker did not open $sock within 120 s; see $state/worker.log" >&2; exit 1; }
  echo "site worker ready (pid $worker_pid, log $state/worker.log)" >&2
  [[ -n "$app_user" ]] || node_config="$node_config site-worker=\"$sock\""
fi
stop_worker() {
  # first the mark that tells the ClientApps started meanwhile not to train without the
  # worker (client_app/app.py: the site is stopping)
  [[ -n "$worker_pid" ]] && { : >"$sock.stopping"; } 2>/dev/null
  [[ -n "$worker_pid" ]] && kill -TERM "$worker_pid" 2>/dev/null
  [[ -n "$superexec_pid" ]] && kill -TERM "$superexec_pid" 2>/dev/null
  [[ -n "$sock_dir" ]] && { sleep 1; rm -rf "$sock_dir"; } 2>/dev/null
  true
}
trap stop_worker EXIT
cmd=(
  flower-supernode
  --superlink "$superlink"
  --root-certificates "$ca"
  --auth-supernode-private-key "$key"
  --port "$port"
  --node-config "$node_config"
)
if [[ -n "$app_user" ]]; then
  # Flower's SuperExec, which starts a ClientApp process per message, as the app user, with
  # a clean environment; the SuperNode lets only holders of the secret take its tasks
  cmd+=(--isolation process --superexec-auth-secret-file "$secret")
  app_env=(PATH="$PATH" HOME="$app_dir/home" FLWR_HOME="$app_dir/home/.flwr" LANG=C.UTF-8)
  for var in $(compgen -e); do  # Flower's settings (telemetry, polling), nothing else of ours
    [[ "$var" == FLWR_* && "$var" != FLWR_HOME ]] && app_env+=("$var=${!var}")
  done
  supervise "flower-superexec (as $app_user)" "${as_app[@]}" env -i "${app_env[@]}" "$superexec" --insecure \
    --runtime-api-address "127.0.0.1:$port" --superexec-auth-secret-file "$secret" &
  superexec_pid=$!
fi
cmd+=("${extra[@]}")
# Flower 1.42's SuperNode gives up on a request whose error names TLS (a handshake that timed
# out on a lossy link or during a network partition among them) and then stays alive but no
# longer reaches the SuperLink (docs/RELIABILITY.md). Its log says "SSL/TLS handshake error
# detected" or "Giving up reconnection": on either line this script stops it (TERM, KILL
# after 20 s), so it exits with status 75 and --retry starts it again (or the service
# manager does, e.g. systemd's Restart=on-failure).
# Only the SuperNode's own log is read; nothing inside Flower is changed.
pid_file="$(mktemp "${TMPDIR:-/tmp}/supernode-$name.XXXXXX")"
gave_up="$pid_file.gave-up"
watch_for_give_up() {
  local line
  while IFS= read -r line; do
    printf '%s\n' "$line"
    if [[ ("$line" == *"Giving up reconnection"* || "$line" == *"SSL/TLS handshake error detected"*) && ! -e "$gave_up" ]]; then
      : >"$gave_up"
      echo "start-supernode: the SuperNode gave up reconnecting to $superlink; stopping it so that it starts again" >&2
      # this attempt's pid: the loop below writes it just after the start, and a SuperNode
      # that gives up at once may log the line before that (the file is emptied per attempt)
      local pid="" tries
      for ((tries = 0; tries < 100; tries++)); do
        pid="$(cat "$pid_file" 2>/dev/null)"
        [[ -n "$pid" ]] && break
        sleep 0.1
      done
      kill -TERM "$pid" 2>/dev/null || true
      (sleep 20 && kill -KILL "$pid" 2>/dev/null) &
    fi
  done
}
child=""
trap '[[ -n "$worker_pid" ]] && { : >"$sock.stopping"; } 2>/dev/null; [[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null; stop_worker; rm -f "$pid_file" "$gave_up"; wait; exit 143' TERM INT
for ((attempt = 0; ; attempt++)); do
  rm -f "$gave_up"
  : >"$pid_file"
  "${cmd[@]}" 2> >(watch_for_give_up >&2) &
  child=$!
  echo "$child" >"$pid_file"
  status=0
  wait "$child" || status=$?
  child=""
  [[ -e "$gave_up" ]] && status=75
  if [[ $status -eq 0 || $attempt -ge $retry ]]; then
    rm -f "$pid_file" "$gave_up"
    exit "$status"
  fi
  echo "SuperNode exited with status $status; restarting in $retry_wait s (attempt $((attempt + 1)) of $retry)" >&2
  sleep "$retry_wait"
done
