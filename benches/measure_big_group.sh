#!/usr/bin/env bash
# Measures a Group of 250,000 members through the HTTP server: 100 real patients (the
# sample set, gen --copies 5) and the rest ids of patients that do not exist. Prints the
# PUT's wall time, the Group $export's kick-off to manifest, and the server's peak RSS
# (VmHWM) after each. Usage: benches/measure_big_group.sh
# FHIRLOG_BINARY=path measures another build; FHIRLOG_GROUP_MEMBERS sets the size.
set -euo pipefail
repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository_root"
binary="${FHIRLOG_BINARY:-}"
if [ -z "$binary" ]; then
    cargo build --release --bin fhirlog
    binary="$repository_root/target/release/fhirlog"
fi
members="${FHIRLOG_GROUP_MEMBERS:-250000}"
scratch="$(mktemp -d "${SCRATCH_PARENT:-/tmp}/fhirlog-big-group.XXXXXX")"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT

"$binary" gen --from data/sample --copies 5 --out "$scratch/ndjson" | tail -n 1
"$binary" load "$scratch/ndjson" --data-dir "$scratch/store" | tail -n 1
python3 - "$scratch/ndjson/Patient.ndjson" "$members" >"$scratch/group.json" <<'EOF'
import json
import sys
real = [json.loads(line)["id"] for line in open(sys.argv[1])]
ids = real + [f"absent-{n:07d}" for n in range(int(sys.argv[2]) - len(real))]
group = {
    "resourceType": "Group",
    "id": "big",
    "type": "person",
    "actual": True,
    "member": [{"entity": {"reference": f"Patient/{id}"}} for id in ids],
}
print(json.dumps(group, separators=(",", ":")))
EOF
echo "Group body: $(wc -c <"$scratch/group.json") bytes, $members members"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$binary" serve --data-dir "$scratch/store" --listen "127.0.0.1:$port" \
    --max-body-bytes $((64 * 1024 * 1024)) >"$scratch/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/fhir/metadata" && break; sleep 0.2; done
peak_megabytes() { awk '/^VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$server_pid/status"; }
echo "server started: peak RSS $(peak_megabytes) MB"

read -r status seconds < <(curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -X PUT \
    -H 'Content-Type: application/fhir+json' --data-binary "@$scratch/group.json" \
    "http://127.0.0.1:$port/fhir/Group/big")
echo "PUT Group/big: $status in ${seconds}s, server peak RSS $(peak_megabytes) MB"

python3 benches/http_export.py "http://127.0.0.1:$port/fhir" 'Group/big/$export' |
    awk '{ print "Group export: kick-off to manifest " $1 "s, " $2 " resources" }'
echo "after the export: server peak RSS $(peak_megabytes) MB"
kill -TERM "$server_pid"
wait "$server_pid" || true
