#!/usr/bin/env bash
# Create a SuperNode authentication key pair per site (EC P-384, OpenSSH format).
#
#   pilot/make-site-keys.sh [-o DIR] SITE [SITE ...]
#
# Writes DIR/SITE.key (private: stays on that site's machine, passed to
# flower-supernode --auth-supernode-private-key) and DIR/SITE.key.pub (public: sent to
# the SuperLink operator, who registers it with `flwr supernode register`).
# DIR defaults to pilot/keys. An existing key is never overwritten. Run it on each
# site's machine for its own SITE, so the private key never travels.
set -euo pipefail

out="pilot/keys"
sites=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -o|--out) out="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) sites+=("$1"); shift ;;
  esac
done
[[ ${#sites[@]} -gt 0 ]] || { echo "usage: $0 [-o DIR] SITE [SITE ...]" >&2; exit 2; }
python="${PYTHON:-python3}"
mkdir -p "$out"
umask 077
for site in "${sites[@]}"; do
  [[ "$site" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: site name '$site' may only hold letters, digits, . _ -" >&2; exit 2; }
  key="$out/$site.key"
  if [[ -e "$key" ]]; then
    echo "keeping existing key $key"
    continue
  fi
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$key"
  else  # the same key format through Python's cryptography (a Flower dependency)
    "$python" - "$key" "$site" <<'PY'
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, comment = Path(sys.argv[1]), sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()))
public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
Path(str(path) + ".pub").write_bytes(public + b" " + comment.encode() + b"\n")
PY
  fi
  chmod 600 "$key"
  chmod 644 "$key.pub"
  echo "created $key and $key.pub"
done
