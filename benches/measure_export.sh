#!/usr/bin/env bash
# Measures $export on the 1,000-patient set (gen --copies 50): CLI system export against
# `cp -r` of the same ndjson, Patient level, `_since` with 1% changed, HTTP end to end,
# and HTTP exports to S3 (moto) and Azure (Azurite) when FHIRLOG_TEST_S3_ENDPOINT /
# AZURITE_BLOB_STORAGE_URL are set (as .ci/run sets them). Usage: benches/measure_export.sh
set -euo pipefail
repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository_root"
# shellcheck source=benches/bench_common.sh
source benches/bench_common.sh
cargo build --release --bin fhirlog
binary="$repository_root/target/release/fhirlog"
scratch="$(mktemp -d "${SCRATCH_PARENT:-/tmp}/fhirlog-measure-export.XXXXXX")"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT


"$binary" gen --from data/sample --copies 50 --out "$scratch/ndjson" | tail -n 1
"$binary" load "$scratch/ndjson" --data-dir "$scratch/store" | tail -n 1
total=$(cat "$scratch"/ndjson/*.ndjson | wc -l)
sync

/usr/bin/time -v -o "$scratch/system.time" "$binary" export --data-dir "$scratch/store" --out "$scratch/system" >/dev/null 2>&1
bytes=$(du -sb "$scratch/system" | cut -f1)
/usr/bin/time -v -o "$scratch/cp.time" cp -r "$scratch/ndjson" "$scratch/ndjson-copy"
system_seconds=$(seconds "$scratch/system.time"); cp_seconds=$(seconds "$scratch/cp.time")
echo "system export: $total resources in ${system_seconds}s = $(rate "$total" "$system_seconds") resources/s," \
    "$(awk -v b="$bytes" -v s="$system_seconds" 'BEGIN { printf "%.0f", b / s / 1048576 }') MB/s, peak RSS $(peak_megabytes "$scratch/system.time") MB"
echo "cp -r of the same ndjson: ${cp_seconds}s; export/cp time ratio $(awk -v a="$system_seconds" -v b="$cp_seconds" 'BEGIN { printf "%.2f", a / b }')"
rm -rf "$scratch/ndjson-copy" "$scratch/system"
/usr/bin/time -v -o "$scratch/system-again.time" "$binary" export --data-dir "$scratch/store" --out "$scratch/system" >/dev/null 2>&1
again_seconds=$(seconds "$scratch/system-again.time")
echo "system export again (load's compactions finished): ${again_seconds}s = $(rate "$total" "$again_seconds") resources/s, peak RSS $(peak_megabytes "$scratch/system-again.time") MB"
rm -rf "$scratch/system"

/usr/bin/time -v -o "$scratch/patient.time" "$binary" export --data-dir "$scratch/store" --out "$scratch/patient" --level patient > "$scratch/patient.json" 2>/dev/null
patient_count=$(python3 -c 'import json,sys; print(sum(o["count"] for o in json.load(open(sys.argv[1]))["output"]))' "$scratch/patient.json")
patient_seconds=$(seconds "$scratch/patient.time")
echo "patient export: $patient_count resources in ${patient_seconds}s = $(rate "$patient_count" "$patient_seconds") resources/s, peak RSS $(peak_megabytes "$scratch/patient.time") MB"
rm -rf "$scratch/patient"

since=$(python3 -c 'import datetime; print(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))')
sleep 1
changed=$((total / 100))
mkdir -p "$scratch/changes"
head -n "$changed" "$scratch/ndjson/Observation.ndjson" | sed 's/"status":"final"/"status":"amended"/' > "$scratch/changes/Observation.ndjson"
"$binary" load "$scratch/changes" --data-dir "$scratch/store" | tail -n 1
/usr/bin/time -v -o "$scratch/since.time" "$binary" export --data-dir "$scratch/store" --out "$scratch/since" --since "$since" > "$scratch/since.json" 2>/dev/null
since_count=$(python3 -c 'import json,sys; print(sum(o["count"] for o in json.load(open(sys.argv[1]))["output"]))' "$scratch/since.json")
echo "_since export (1% changed): $since_count resources in $(seconds "$scratch/since.time")s, peak RSS $(peak_megabytes "$scratch/since.time") MB"
rm -rf "$scratch/since"

http_export() {
    local label="$1"; shift
    serve_and_http_export "$scratch/store" "$scratch/$label" '$export' "$@" >"$scratch/$label.result"
    read -r elapsed count <"$scratch/$label.result"
    echo "HTTP $label: kick-off to manifest ${elapsed}s for $count resources = $(rate "$count" "$elapsed") resources/s"
    echo "HTTP $label: server peak RSS $(peak_megabytes "$scratch/$label.time") MB"
}
http_export local
if [ -n "${FHIRLOG_TEST_S3_ENDPOINT:-}" ]; then
    http_export s3 --create-containers --storage "s3://measure-export?endpoint=$FHIRLOG_TEST_S3_ENDPOINT&region=us-east-1&allow_http=true"
fi
if [ -n "${AZURITE_BLOB_STORAGE_URL:-}" ]; then
    http_export azurite --create-containers --storage "az://measure-export?emulator=true"
fi
