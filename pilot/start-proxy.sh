#!/usr/bin/env bash
# Start the pilot's guard in front of the SuperLink: nginx terminating TLS on the public
# port, passing SuperNodes (/v1/fleet/*) from anywhere and the flwr CLI (/v1/control/*)
# only from the operator's addresses.
#
#   pilot/start-proxy.sh --superlink 127.0.0.1:8001 [--certs DIR] [--host ADDR] [--port PORT]
#       [--operator ADDR_OR_CIDR ...] [--state-dir DIR] [--max-body SIZE] [--max-fleet-body SIZE] [--check]
#
#   --superlink  the SuperLink's own address: loopback only (start-superlink.sh --host
#                127.0.0.1 --port 8001), so nobody reaches its Control API around this proxy
#   --certs DIR  ca.crt, superlink.crt, superlink.key from make-certs.sh (default pilot/certs):
#                the proxy presents superlink.crt and checks the SuperLink's against ca.crt
#   --host ADDR  address the sites and the operator connect to (default 0.0.0.0)
#   --port PORT  the public port (default 8000)
#   --operator   an address or network (10.0.0.7, 10.0.0.0/28, 2001:db8::/64) allowed to
#                use the Control API (flwr run, stop, log, ls, supernode register, ...);
#                repeat for several. 127.0.0.1 and ::1 (the coordinator itself) always are.
#   --state-dir  the rendered nginx.conf, its pid file and logs (access.log: every request
#                with its source address and status) (default pilot/state/proxy)
#   --max-body   largest request body from the operator (default 1g: a run's app bundle)
#   --max-fleet-body  largest request body from a SuperNode (default 64m: Flower sends a
#                message, or one array chunk of at most 5 MiB, per request)
#   --check      render the configuration and test it (nginx -t), then exit
# Needs nginx (apt-get install nginx-light, or nginx). Runs in the foreground; stop it
# with Ctrl-C or `kill PID` (SIGTERM, or SIGQUIT to let requests finish).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
certs="pilot/certs" host="0.0.0.0" port=8000 upstream="" state="pilot/state/proxy" max_body="1g" max_fleet_body="64m" check=0
operators=(127.0.0.1 ::1)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) upstream="$2"; shift 2 ;;
    --certs) certs="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --operator) operators+=("$2"); shift 2 ;;
    --state-dir) state="$2"; shift 2 ;;
    --max-body) max_body="$2"; shift 2 ;;
    --max-fleet-body) max_fleet_body="$2"; shift 2 ;;
    --check) check=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
fail() { echo "error: $*" >&2; exit 2; }
PATH="$PATH:/usr/sbin:/sbin"  # where Debian puts nginx
command -v nginx >/dev/null || fail "nginx is not installed (apt-get install nginx-light, or nginx)"
[[ -n "$upstream" ]] || fail "--superlink is required: the SuperLink's loopback address, e.g. 127.0.0.1:8001"
[[ "$upstream" =~ ^(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\]):[0-9]+$ ]] ||
  fail "--superlink $upstream is not a loopback address: start the SuperLink with --host 127.0.0.1, or the sites reach its Control API around this proxy"
[[ "$port" =~ ^[0-9]+$ ]] || fail "--port must be a number, got '$port'"
[[ "$host" =~ ^[0-9A-Fa-f.:]+$ ]] || fail "--host must be an IP address, got '$host'"
[[ "$max_body" =~ ^[0-9]+[kKmMgG]?$ ]] || fail "--max-body must be a size such as 512m or 1g, got '$max_body'"
[[ "$max_fleet_body" =~ ^[0-9]+[kKmMgG]?$ ]] || fail "--max-fleet-body must be a size such as 64m, got '$max_fleet_body'"
allow=""
for op in "${operators[@]}"; do
  [[ "$op" =~ ^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$ ]] || fail "--operator must be an IP address or network (a.b.c.d, a.b.c.d/nn), got '$op'"
  allow+="            allow $op;"$'\n'
done
for f in ca.crt superlink.crt superlink.key; do
  [[ -f "$certs/$f" ]] || fail "$certs/$f is missing; create it with pilot/make-certs.sh"
done
abs() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd)" "$(basename "$1")"); }
mkdir -p "$state/tmp"
certs="$(abs "$certs")"
state="$(abs "$state")"
for path in "$certs" "$state"; do  # they go into the configuration between double quotes
  [[ "$path" != *[\"\\\$\;]* ]] || fail "the path '$path' holds a character nginx would misread (\" \\ \$ ;)"
done
listen="$host:$port"
[[ "$host" == *:* ]] && listen="[$host]:$port"

conf="$(<"$here/pilot/nginx.conf.template")"
conf="${conf//@STATE@/$state}"
conf="${conf//@CERTS@/$certs}"
conf="${conf//@UPSTREAM@/$upstream}"
conf="${conf//@LISTEN@/$listen}"
conf="${conf//@MAX_BODY@/$max_body}"
conf="${conf//@MAX_FLEET_BODY@/$max_fleet_body}"
conf="${conf//@ALLOW@$'\n'/$allow}"
umask 077
printf '%s\n' "$conf" >"$state/nginx.conf"
nginx -t -q -e "$state/error.log" -c "$state/nginx.conf" ||
  fail "nginx refused $state/nginx.conf (see the lines above and $state/error.log)"
if [[ $check -eq 1 ]]; then
  echo "configuration OK: $state/nginx.conf"
  exit 0
fi
echo "proxy on $listen -> SuperLink at $upstream; Control API from ${operators[*]} only (log $state/access.log)" >&2
exec nginx -e "$state/error.log" -c "$state/nginx.conf"
