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

# On a VM with free page reporting (virtio-balloon), memory freed in the guest goes back
# to the host within seconds, and each page touched again costs a fault on the host: on
# the 2-core VM these figures come from, writing 2.2 GB with dd took 0.5 s right after
# freeing memory and 5 s after 5 idle seconds. Which step pays that depends on timing,
# not on the code. FHIRLOG_BENCH_KEEP_PAGES=1 (root) turns page reporting off for the
# run, backs all free memory once, and restores the setting at exit.
page_reporting=/sys/module/page_reporting/parameters/page_reporting_order
saved_page_reporting=""
if [ "${FHIRLOG_BENCH_KEEP_PAGES:-0}" = 1 ] && [ -w "$page_reporting" ]; then
    saved_page_reporting="$(cat "$page_reporting")"
    echo 11 >"$page_reporting"
    free_gib=$(awk '/^MemFree:/ { print int($2 / 1048576) - 1 }' /proc/meminfo)
    python3 -c "b'\\x01' * ($free_gib << 30)"
    echo "page reporting off for this run (was order $saved_page_reporting); ${free_gib} GiB backed"
elif [ -r "$page_reporting" ] && [ "$(cat "$page_reporting")" -le 10 ]; then
    echo "note: free page reporting is on (order $(cat "$page_reporting")); see FHIRLOG_BENCH_KEEP_PAGES"
fi
restore_page_reporting() {
    if [ -n "$saved_page_reporting" ]; then echo "$saved_page_reporting" >"$page_reporting"; fi
}
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"; restore_page_reporting' EXIT

field() { awk -F': ' -v name="$2" '$1 ~ name { print $2 }' "$1"; }
seconds() { field "$1" 'Elapsed' | awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }'; }
peak_megabytes() { echo $(( $(field "$1" 'Maximum resident') / 1024 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

"$binary" gen --from data/sample --copies "$copies" --out "$scratch/ndjson" | tail -n 1
"$binary" load "$scratch/ndjson" --data-dir "$scratch/store" | tail -n 1
total=$(cat "$scratch"/ndjson/*.ndjson | wc -l)
sync
sleep 5

http_export_seconds() {
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    /usr/bin/time -v -o "$scratch/http.time" "$binary" serve --data-dir "$scratch/store" \
        --listen "127.0.0.1:$port" >"$scratch/http.log" 2>&1 &
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/fhir/metadata" && break; sleep 0.1; done
    python3 benches/http_export.py "http://127.0.0.1:$port/fhir" | cut -d' ' -f1
    pkill -TERM -f "^$binary serve .*127.0.0.1:$port"
    wait || true
}

echo "copies=$copies resources=$total bytes=$(du -sb "$scratch/ndjson" | cut -f1)"
printf '%-4s %-12s %-12s %-12s %-10s %-10s %-12s %-12s\n' run cp+sync_s cli_s http_s cli/cp http/cp cli_rss_MB http_rss_MB
for run in $(seq 1 "$runs"); do
    rm -rf "$scratch/copy" "$scratch/cli"
    sync
    copy_started=$(date +%s.%N)
    cp -r "$scratch/ndjson" "$scratch/copy" && sync
    copy_seconds=$(awk -v a="$copy_started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    rm -rf "$scratch/copy"
    sync
    /usr/bin/time -v -o "$scratch/cli.time" "$binary" export --data-dir "$scratch/store" --out "$scratch/cli" >/dev/null 2>&1
    cli_seconds=$(seconds "$scratch/cli.time")
    rm -rf "$scratch/cli" "$scratch/store/exports"
    sync
    http_seconds=$(http_export_seconds)
    rm -rf "$scratch/store/exports"
    sync
    printf '%-4s %-12s %-12s %-12s %-10s %-10s %-12s %-12s\n' "$run" "$copy_seconds" "$cli_seconds" "$http_seconds" \
        "$(ratio "$cli_seconds" "$copy_seconds")" "$(ratio "$http_seconds" "$copy_seconds")" \
        "$(peak_megabytes "$scratch/cli.time")" "$(peak_megabytes "$scratch/http.time")"
done
