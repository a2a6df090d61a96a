#!/usr/bin/env bash
# The compose `init` service (runs once before the federation starts; idempotent).
#
# Mounted by compose.yml: the project at /project (read-only), the MedMNIST source
# folder at /source (read-only), the host's certificate folder at /certs, and every
# named volume under /volumes. It
#   1. creates the TLS material with the pilot's script (pilot/make-certs.sh): a CA and
#      the SuperLink's certificate for localhost, 127.0.0.1 and SUPERLINK_NAMES;
#   2. writes each site's data file into that site's data volume
#      (/volumes/site-N/data/site-N.npz) with the pilot's splitter
#      (python -m partitions.split), unless it is already there;
#   3. gives the volumes and the SuperLink's key to the containers' user (uid 49999).
# Environment: DATASET, NUM_SITES, PARTITION, ALPHA, SEED, SUPERLINK_NAMES, SUPERLINK_BIND.
# It refuses (and so the SuperLink never starts) when SUPERLINK_BIND is not a loopback
# address: this demo federation has no SuperNode authentication, so on any other address
# every machine that can reach the port could join as a site (use the pilot, docs/pilot.md).
set -euo pipefail

bind="${SUPERLINK_BIND:-127.0.0.1}"
case "$bind" in
  127.* | localhost | ::1 | "[::1]") ;;
  *)
    echo "init: refusing SUPERLINK_BIND=$bind: the demo federation has no SuperNode authentication, so it" \
      "listens on loopback only; for sites on other machines use the pilot (docs/pilot.md)" >&2
    exit 1
    ;;
esac

APP_UID=49999
dataset="${DATASET:-breastmnist}"
num_sites="${NUM_SITES:-3}"
partition="${PARTITION:-dirichlet-equal}"
alpha="${ALPHA:-0.5}"
seed="${SEED:-0}"
cd /project

# 1. TLS material --------------------------------------------------------------------
if [[ -s /certs/ca.crt && -s /certs/superlink.crt && -s /certs/superlink.key ]]; then
  echo "init: keeping the TLS material in the certificate folder"
else
  read -r -a names <<<"${SUPERLINK_NAMES:-localhost}"
  bash pilot/make-certs.sh -o /certs "${names[@]}"
fi
chown "$APP_UID:$APP_UID" /certs/superlink.key
chmod 600 /certs/superlink.key
chmod 644 /certs/ca.crt /certs/superlink.crt

# 2. Site data -----------------------------------------------------------------------
missing=()
for ((i = 0; i < num_sites; i++)); do
  [[ -d /volumes/site-$i/data ]] || { echo "init: no data volume mounted for site-$i (see docker/README.md, 'More sites')" >&2; exit 1; }
  [[ -s /volumes/site-$i/data/site-$i.npz ]] || missing+=("$i")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "init: every site already has its data file"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  python -m partitions.split --dataset "$dataset" --data-root /source --num-sites "$num_sites" \
    --partition "$partition" --alpha "$alpha" --seed "$seed" --out "$work"
  for i in "${missing[@]}"; do
    cp "$work/site-$i.npz" "/volumes/site-$i/data/site-$i.npz"
    echo "init: site-$i data -> volume site-$i-data"
  done
  if [[ -f "$work/partition.json" ]]; then
    mkdir -p /volumes/results/partition
    cp "$work"/partition.* /volumes/results/partition/ 2>/dev/null || true
  fi
fi

# 3. Ownership -------------------------------------------------------------------------
for dir in /volumes/*/ /volumes/site-*/*/; do
  [[ -d "$dir" ]] && chown -R "$APP_UID:$APP_UID" "$dir"
done
echo "init: done"
