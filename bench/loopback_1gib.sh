#!/usr/bin/env bash
# Upload (curl -T, verified and published) and download 1 GiB through `datastore serve` on loopback.
# Prints MB/s (10^6 bytes per second, as curl measures) for each run and the median of RUNS runs.
# Usage: bash bench/loopback_1gib.sh   (after `make run` or `make test` created .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
size_mib=${SIZE_MIB:-1024}
work=$(mktemp -d)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

head -c "$((size_mib << 20))" /dev/urandom > "$work/big.bin"
md5=$(md5sum "$work/big.bin" | cut -d' ' -f1)
size=$(stat -c %s "$work/big.bin")

.venv/bin/datastore serve --root "$work/data" --port 0 --log-level WARNING > "$work/server.out" 2>&1 &
server_pid=$!
for _ in $(seq 100); do grep -q "serving" "$work/server.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/.* at \(http:[^ ]*\)files\/$/\1/p' "$work/server.out" | head -n 1)
[ -n "$base" ] || { cat "$work/server.out"; exit 1; }

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
up=(); down=()
for i in $(seq "$runs"); do
  reply=$(curl -sS "${base}files/manifest" -H 'Content-Type: application/json' \
    -d "{\"files\": [{\"name\": \"big-$i.bin\", \"size\": $size, \"md5\": \"$md5\"}]}")
  url=$(printf '%s' "$reply" | python3 -c 'import json,sys; print(json.load(sys.stdin)["files"][0]["upload_url"])')
  up+=("$(curl -sS -f -o /dev/null -T "$work/big.bin" -w '%{speed_upload}' "$url" | awk '{printf "%.0f", $1/1e6}')")
  down+=("$(curl -sS -f -o /dev/null -w '%{speed_download}' "${base}files/big-$i.bin" | awk '{printf "%.0f", $1/1e6}')")
  rm -f "$work/data/files/big-$i.bin"
done
echo "upload   MB/s: ${up[*]}  median $(printf '%s\n' "${up[@]}" | median)"
echo "download MB/s: ${down[*]}  median $(printf '%s\n' "${down[@]}" | median)"
