#!/usr/bin/env bash
# End-to-end load measurement on scale data (DESIGN.md §2 targets: ≥ 50,000 resources/s and
# peak RSS ≤ 300 MB, both holding as the store grows).
#
#   benches/measure_load.sh            # 50 copies of data/sample: ≈2.2M resources, ≈2.2 GB
#   COPIES=10 benches/measure_load.sh  # smaller
#
# 1. builds the release binary;
# 2. `fhirlog gen --from data/sample --copies $COPIES` into a scratch directory under /tmp;
# 3. loads all of it with one `fhirlog load` under `/usr/bin/time -v` (wall time, peak RSS);
# 4. splits every generated {Type}.ndjson into four quarters by line (quarter k of each type
#    goes to quarter-k/{Type}.ndjson) and loads quarter 1, 2, 3, 4 with four `fhirlog load`
#    runs into one growing data directory, timing each; Q1 runs on an empty store, Q4 on a
#    store already holding three quarters of the data.
# Each run reports resources/s (as counted by the loader, and over the process wall time),
# peak RSS, its own CPU time, and the CPU every other process used meanwhile: on a shared
# machine a run with much of the latter is not a fair measurement.
# Everything under the scratch directory is deleted at the end (set KEEP_SCRATCH=1 to keep).
# Environment: COPIES (default 50), SCRATCH_PARENT (default /tmp).
set -euo pipefail

repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
copies="${COPIES:-50}"
scratch_parent="${SCRATCH_PARENT:-/tmp}"

if [[ ! -x /usr/bin/time ]]; then
    echo "measure_load: /usr/bin/time is missing; install it with: apt-get install -y time" >&2
    exit 1
fi

cd "$repository_root"
# shellcheck source=benches/bench_common.sh
source benches/bench_common.sh
cargo build --release --bin fhirlog
target_directory="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
fhirlog_binary="$target_directory/release/fhirlog"
# A private copy, so a concurrent rebuild cannot swap the binary mid-measurement.
scratch_directory="$(mktemp -d "$scratch_parent/fhirlog-measure-load.XXXXXX")"
if [[ "${KEEP_SCRATCH:-0}" != 1 ]]; then
    trap 'rm -rf "$scratch_directory"' EXIT
fi
cp "$fhirlog_binary" "$scratch_directory/fhirlog"
fhirlog_binary="$scratch_directory/fhirlog"
generated_directory="$scratch_directory/generated"

# Prints "<seconds> <peak RSS in kB>" from a `/usr/bin/time -v` report.
wall_seconds_and_peak_rss_kilobytes() {
    awk -F': ' '
        /Elapsed \(wall clock\) time/ {
            count = split($2, parts, ":")
            seconds = 0
            for (index_ = 1; index_ <= count; index_++) seconds = seconds * 60 + parts[index_]
        }
        /Maximum resident set size/ { peak_kilobytes = $2 }
        END { printf "%.2f %d\n", seconds, peak_kilobytes }
    ' "$1"
}

# Runs `fhirlog load` on $1 into data directory $2 under /usr/bin/time -v, with reports
# named after $3; prints "<resources> <loader seconds> <wall seconds> <peak RSS kB>
# <CPU seconds of the load> <CPU seconds of everything else on the machine meanwhile>".
# Other processes' CPU is reported because it distorts the figures on a shared machine.
timed_load() {
    local input_path="$1" data_directory="$2" report_name="$3"
    local busy_before busy_after load_cpu
    busy_before="$(machine_busy_seconds)"
    /usr/bin/time -v -o "$scratch_directory/$report_name.time" \
        "$fhirlog_binary" load "$input_path" --data-dir "$data_directory" \
        >"$scratch_directory/$report_name.summary" 2>"$scratch_directory/$report_name.log"
    busy_after="$(machine_busy_seconds)"
    load_cpu="$(cpu_seconds "$scratch_directory/$report_name.time")"
    # "N resources in X.Ys (R resources/s), ..."; X is rounded to 0.1 s, R is not.
    local summary_line resources loader_seconds
    summary_line="$(grep -E '^[0-9]+ resources in ' "$scratch_directory/$report_name.summary")"
    resources="$(awk '{ print $1 }' <<<"$summary_line")"
    loader_seconds="$(awk '{ rate = $5; sub(/^\(/, "", rate); printf "%.3f\n", $1 / rate }' \
        <<<"$summary_line")"
    echo "$resources $loader_seconds $(wall_seconds_and_peak_rss_kilobytes "$scratch_directory/$report_name.time")" \
        "$load_cpu $(other_cpu_seconds "$busy_before" "$busy_after" "$load_cpu")"
}

echo "== fhirlog gen --from data/sample --copies $copies --out $generated_directory"
/usr/bin/time -v -o "$scratch_directory/gen.time" \
    "$fhirlog_binary" gen --from data/sample --copies "$copies" --out "$generated_directory" |
    tail -n 1
gen_result="$(wall_seconds_and_peak_rss_kilobytes "$scratch_directory/gen.time")"
read -r gen_seconds gen_peak_kilobytes <<<"$gen_result"
echo "gen: ${gen_seconds}s wall, peak RSS $((gen_peak_kilobytes / 1024)) MB, $(du -sh "$generated_directory" | cut -f1) on disk"

echo
echo "== whole load: fhirlog load $generated_directory --data-dir $scratch_directory/data-whole"
whole_result="$(timed_load "$generated_directory" "$scratch_directory/data-whole" whole)"
read -r whole_resources whole_loader_seconds whole_wall_seconds whole_peak_kilobytes \
    whole_load_cpu_seconds whole_other_cpu_seconds <<<"$whole_result"
whole_store_size="$(du -sh "$scratch_directory/data-whole" | cut -f1)"
cat "$scratch_directory/whole.summary"
rm -rf "$scratch_directory/data-whole"

echo
echo "== splitting every type's lines into four quarters"
split_into_quarters "$generated_directory" "$scratch_directory/quarter"
rm -rf "$generated_directory"

declare -A quarter_results
for quarter in 1 2 3 4; do
    echo "== quarter $quarter: fhirlog load quarter-$quarter --data-dir data-quarters (growing)"
    quarter_results[$quarter]="$(timed_load "$scratch_directory/quarter-$quarter" \
        "$scratch_directory/data-quarters" "quarter-$quarter")"
    tail -n 1 "$scratch_directory/quarter-$quarter.summary"
done
quartered_store_size="$(du -sh "$scratch_directory/data-quarters" | cut -f1)"

echo
echo "== results (COPIES=$copies, $(nproc) cores)"
printf '%-22s %10s %9s %12s %8s %10s %11s %8s %11s\n' run resources "loader s" \
    "loader res/s" "wall s" "wall res/s" "peak RSS MB" "CPU s" "others CPU s"
print_result() {
    local run_name="$1" resources="$2" loader_seconds="$3" wall_seconds="$4" peak_kilobytes="$5"
    local load_cpu_seconds="$6" other_cpu_seconds="$7"
    awk -v run_name="$run_name" -v resources="$resources" -v loader_seconds="$loader_seconds" \
        -v wall_seconds="$wall_seconds" -v peak_kilobytes="$peak_kilobytes" \
        -v load_cpu_seconds="$load_cpu_seconds" -v other_cpu_seconds="$other_cpu_seconds" 'BEGIN {
        printf "%-22s %10d %9.2f %12.0f %8.2f %10.0f %11.0f %8.1f %11.1f\n", run_name,
            resources, loader_seconds, resources / loader_seconds, wall_seconds,
            resources / wall_seconds, peak_kilobytes / 1024, load_cpu_seconds, other_cpu_seconds }'
}
print_result "whole load" "$whole_resources" "$whole_loader_seconds" "$whole_wall_seconds" \
    "$whole_peak_kilobytes" "$whole_load_cpu_seconds" "$whole_other_cpu_seconds"
for quarter in 1 2 3 4; do
    # shellcheck disable=SC2086 # the result is six space-separated numbers
    print_result "quarter $quarter (growing)" ${quarter_results[$quarter]}
done
echo "store size: whole load $whole_store_size, after four quarters $quartered_store_size"
echo "loader res/s: counted by fhirlog load (durable writes / its own elapsed time);"
echo "wall res/s: resources / process wall time, including opening and closing the store."
echo "CPU s: user + system CPU of the load; others CPU s: CPU used by every other process"
echo "meanwhile (the machine has $(nproc) cores; anything well above 0 distorts the figures)."
