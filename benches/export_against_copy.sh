#!/usr/bin/env bash
# Compares `fhirlog export` and an HTTP kick-off→manifest export of one store against
# `cp -r` of the same ndjson followed by `sync` (both durable), with peak RSS.
# Usage: benches/export_against_copy.sh [COPIES (default 50)] [RUNS (default 2)]
# FHIRLOG_BIN=path measures another build (e.g. an older commit's) on the same data.
set -euo pipefail
repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository_root"
copies="${1:-50}"
runs="${2:-2}"
if [ -z "${FHIRLOG_BIN:-}" ]; then
    cargo build --release --bin fhirlog
fi
binary="${FHIRLOG_BIN:-$repository_root/target/release/fhirlog}"
scratch="$(mktemp -d "${SCRATCH_PARENT:-/tmp}/fhirlog-export-vs-copy.XXXXXX")"

# shellcheck source=benches/bench_common.sh
source benches/bench_common.sh
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"; restore_guest_pages' EXIT
keep_guest_pages

"$binary" gen --from data/sample --copies "$copies" --out "$scratch/ndjson" | tail -n 1
"$binary" load "$scratch/ndjson" --data-dir "$scratch/store" | tail -n 1
total=$(cat "$scratch"/ndjson/*.ndjson | wc -l)
sync
sleep 5

echo "copies=$copies resources=$total bytes=$(du -sb "$scratch/ndjson" | cut -f1)"
printf '%-4s %-12s %-12s %-12s %-10s %-10s %-12s %-12s\n' run cp+sync_s cli_s http_s cli/cp http/cp cli_rss_MB http_rss_MB
for run in $(seq 1 "$runs"); do
    rm -rf "$scratch/copy" "$scratch/cli"
    sync
    copy_started=$(now_seconds)
    cp -r "$scratch/ndjson" "$scratch/copy" && sync
    copy_seconds=$(elapsed_since "$copy_started")
    rm -rf "$scratch/copy"
    sync
    /usr/bin/time -v -o "$scratch/cli.time" "$binary" export --data-dir "$scratch/store" --out "$scratch/cli" >/dev/null 2>&1
    cli_seconds=$(seconds "$scratch/cli.time")
    rm -rf "$scratch/cli" "$scratch/store/exports"
    sync
    serve_and_http_export "$scratch/store" "$scratch/http" >"$scratch/http.result"
    http_seconds=$(cut -d' ' -f1 "$scratch/http.result")
    rm -rf "$scratch/store/exports"
    sync
    printf '%-4s %-12s %-12s %-12s %-10s %-10s %-12s %-12s\n' "$run" "$copy_seconds" "$cli_seconds" "$http_seconds" \
        "$(ratio "$cli_seconds" "$copy_seconds")" "$(ratio "$http_seconds" "$copy_seconds")" \
        "$(peak_megabytes "$scratch/cli.time")" "$(peak_megabytes "$scratch/http.time")"
done
