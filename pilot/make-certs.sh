#!/usr/bin/env bash
# Create the pilot's TLS material: a private CA and a SuperLink certificate signed by it.
#
#   pilot/make-certs.sh [-o DIR] [-d DAYS] [--force] NAME [NAME ...]
#
# NAME: every DNS name and IP address the sites and the operator use to reach the
# SuperLink (e.g. superlink.hospital-a.example 10.1.2.3). localhost and 127.0.0.1 are
# always added: the SuperLink's own ServerApp process connects to it on loopback.
#
# Writes into DIR (default pilot/certs):
#   ca.key         the CA's private key: keep it offline, never copy it to any machine
#   ca.crt         the CA certificate: give it to every site and to the operator
#   superlink.key  the SuperLink's private key (stays on the SuperLink machine)
#   superlink.crt  the SuperLink's certificate, with the names above as subjectAltNames
# An existing CA is reused (to issue a new SuperLink certificate) unless --force.
set -euo pipefail

out="pilot/certs"
days=825
force=0
names=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -o|--out) out="$2"; shift 2 ;;
    -d|--days) days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
command -v openssl >/dev/null || { echo "error: openssl is not installed (apt-get install openssl)" >&2; exit 1; }

names+=(localhost 127.0.0.1)
san=""
declare -A seen=()
for n in "${names[@]}"; do
  [[ -n "${seen[$n]:-}" ]] && continue
  seen[$n]=1
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then entry="IP:$n"; else entry="DNS:$n"; fi
  san="${san:+$san,}$entry"
done

mkdir -p "$out"
umask 077
if [[ $force -eq 1 || ! -f "$out/ca.key" || ! -f "$out/ca.crt" ]]; then
  openssl ecparam -name secp384r1 -genkey -noout -out "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -sha384 -days "$days" -subj "/O=FusedSpaceFed pilot/CN=pilot CA $(hostname -s 2>/dev/null || echo host) $(date -u +%Y%m%dT%H%M%SZ)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt"
  echo "created CA: $out/ca.crt"
else
  echo "reusing CA: $out/ca.crt"
fi

openssl ecparam -name secp384r1 -genkey -noout -out "$out/superlink.key"
openssl req -new -key "$out/superlink.key" -subj "/CN=${names[0]}" -out "$out/superlink.csr"
ext="$(mktemp)"
trap 'rm -f "$ext"' EXIT
cat >"$ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$out/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days "$days" -sha384 -extfile "$ext" -out "$out/superlink.crt" 2>/dev/null
rm -f "$out/superlink.csr"
chmod 644 "$out/ca.crt" "$out/superlink.crt"
openssl verify -CAfile "$out/ca.crt" "$out/superlink.crt" >/dev/null
echo "created SuperLink certificate: $out/superlink.crt (subjectAltName $san)"
