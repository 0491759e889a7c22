#!/usr/bin/env bash
# The scale curve: gen, load in four quarters into one growing store and all at once into
# a new one, a durable `cp -r && sync` of the same ndjson, `fhirlog export`, and an HTTP
# kick-off to manifest, at one size, printed as one table.
#
#   benches/measure_scale.sh           # 300 copies of data/sample: ≈13.5M resources, ≈13 GB
#   benches/measure_scale.sh 50        # ≈2.25M resources
#
# It checks free disk space first (about 170 MB per copy at the peak), runs the release
# binary (FHIRLOG_BIN=path measures another build), and deletes everything it wrote at
# exit. SCRATCH_PARENT (default /tmp) picks the disk; FHIRLOG_BENCH_KEEP_PAGES=1 (root)
# keeps guest pages backed on a VM (see bench_common.sh). The "others CPU s" column is
# the CPU every other process used during the step: well above 0 means a shared machine
# distorted that row.
set -euo pipefail
repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository_root"
# shellcheck source=benches/bench_common.sh
source benches/bench_common.sh
copies="${1:-300}"
scratch_parent="${SCRATCH_PARENT:-/tmp}"
megabytes_needed_per_copy=170

for tool in /usr/bin/time curl python3; do
    command -v "$tool" >/dev/null || { echo "measure_scale: $tool is missing" >&2; exit 1; }
done
megabytes_free=$(df -Pm "$scratch_parent" | awk 'NR == 2 { print $4 }')
megabytes_needed=$((copies * megabytes_needed_per_copy))
if [ "$megabytes_free" -lt "$megabytes_needed" ]; then
    echo "measure_scale: $copies copies need about $megabytes_needed MB free under $scratch_parent; $megabytes_free MB are" >&2
    exit 1
fi

if [ -z "${FHIRLOG_BIN:-}" ]; then
    cargo build --release --bin fhirlog
fi
scratch="$(mktemp -d "$scratch_parent/fhirlog-measure-scale.XXXXXX")"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"; restore_guest_pages' EXIT
# A private copy, so a concurrent rebuild cannot swap the binary mid-measurement.
cp "${FHIRLOG_BIN:-$repository_root/target/release/fhirlog}" "$scratch/fhirlog"
binary="$scratch/fhirlog"
keep_guest_pages

rows=()
# Appends a row: step, resources, seconds, peak RSS MB, CPU s of the step, others' CPU s.
add_row() { rows+=("$(printf '%-26s %11s %9s %12s %8s %8s %9s' "$1" "$2" "$3" \
    "$( [ "$2" = - ] && echo - || rate "$2" "$3")" "$4" "$5" "$6")"); }

busy_before=$(machine_busy_seconds)
/usr/bin/time -v -o "$scratch/gen.time" "$binary" gen --from data/sample --copies "$copies" \
    --out "$scratch/generated" | tail -n 1
total=$(cat "$scratch"/generated/*.ndjson | wc -l)
ndjson_bytes=$(du -sb "$scratch/generated" | cut -f1)
add_row "gen --copies $copies" "$total" "$(seconds "$scratch/gen.time")" \
    "$(peak_megabytes "$scratch/gen.time")" "$(cpu_seconds "$scratch/gen.time")" \
    "$(other_cpu_seconds "$busy_before" "$(machine_busy_seconds)" "$(cpu_seconds "$scratch/gen.time")")"

split_into_quarters "$scratch/generated" "$scratch/quarter"
rm -rf "$scratch/generated"
sync

# Loads the paths after $3 into data directory $2 as one `fhirlog load` and adds row $1.
timed_load() {
    local step="$1" data_directory="$2" report="$scratch/load-${#rows[@]}" loaded
    shift 2
    busy_before=$(machine_busy_seconds)
    /usr/bin/time -v -o "$report.time" "$binary" load "$@" --data-dir "$data_directory" \
        >"$report.summary" 2>"$report.log"
    loaded=$(awk '/^[0-9]+ resources in / { print $1 }' "$report.summary")
    add_row "$step" "$loaded" "$(seconds "$report.time")" "$(peak_megabytes "$report.time")" \
        "$(cpu_seconds "$report.time")" \
        "$(other_cpu_seconds "$busy_before" "$(machine_busy_seconds)" "$(cpu_seconds "$report.time")")"
}

for quarter in 1 2 3 4; do
    timed_load "load quarter $quarter (growing)" "$scratch/store" "$scratch/quarter-$quarter"
done
store_bytes=$(du -sb "$scratch/store" | cut -f1)
timed_load "load all in one run" "$scratch/store-one-run" "$scratch"/quarter-{1,2,3,4}
rm -rf "$scratch/store-one-run"
sync
sleep 5

mkdir -p "$scratch/copy"
busy_before=$(machine_busy_seconds)
copy_started=$(now_seconds)
cp -r "$scratch"/quarter-1 "$scratch"/quarter-2 "$scratch"/quarter-3 "$scratch"/quarter-4 "$scratch/copy/" && sync
copy_seconds=$(elapsed_since "$copy_started")
add_row "cp -r && sync of the ndjson" "-" "$copy_seconds" "-" "-" \
    "$(other_cpu_seconds "$busy_before" "$(machine_busy_seconds)" 0)"
rm -rf "$scratch/copy"
sync

busy_before=$(machine_busy_seconds)
/usr/bin/time -v -o "$scratch/export.time" "$binary" export --data-dir "$scratch/store" \
    --out "$scratch/export" >"$scratch/export.json" 2>"$scratch/export.log"
exported=$(python3 -c 'import json, sys; print(sum(o["count"] for o in json.load(open(sys.argv[1]))["output"]))' "$scratch/export.json")
export_bytes=$(du -sb "$scratch/export" | cut -f1)
export_seconds=$(seconds "$scratch/export.time")
add_row "fhirlog export (system)" "$exported" "$export_seconds" "$(peak_megabytes "$scratch/export.time")" \
    "$(cpu_seconds "$scratch/export.time")" \
    "$(other_cpu_seconds "$busy_before" "$(machine_busy_seconds)" "$(cpu_seconds "$scratch/export.time")")"
rm -rf "$scratch/export"
sync

busy_before=$(machine_busy_seconds)
serve_and_http_export "$scratch/store" "$scratch/http" >"$scratch/http.result"
read -r http_seconds http_exported <"$scratch/http.result"
add_row "HTTP kick-off to manifest" "$http_exported" "$http_seconds" "$(peak_megabytes "$scratch/http.time")" \
    "$(cpu_seconds "$scratch/http.time")" \
    "$(other_cpu_seconds "$busy_before" "$(machine_busy_seconds)" "$(cpu_seconds "$scratch/http.time")")"

echo
echo "copies=$copies resources=$total ndjson=$((ndjson_bytes / 1048576)) MB store=$((store_bytes / 1048576)) MB" \
    "export=$((export_bytes / 1048576)) MB cores=$(nproc)"
printf '%-26s %11s %9s %12s %8s %8s %9s\n' step resources seconds "resources/s" "RSS MB" "CPU s" "others s"
printf '%s\n' "${rows[@]}"
echo "export / (cp -r && sync): fhirlog export $(ratio "$export_seconds" "$copy_seconds")×," \
    "HTTP $(ratio "$http_seconds" "$copy_seconds")×"
