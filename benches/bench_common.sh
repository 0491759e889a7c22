# Shell functions the measurement scripts in benches/ share; source it, do not run it.
# Every function reads `/usr/bin/time -v` reports or starts the binary in $binary.

# The value of the `/usr/bin/time -v` field matching $2 in report $1.
field() { awk -F': ' -v name="$2" '$1 ~ name { print $2 }' "$1"; }
# Wall seconds of report $1.
seconds() { field "$1" 'Elapsed' | awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }'; }
# Peak RSS in MB of report $1.
peak_megabytes() { echo $(( $(field "$1" 'Maximum resident') / 1024 )); }
# User + system CPU seconds of report $1.
cpu_seconds() {
    awk -F': ' '/User time \(seconds\)|System time \(seconds\)/ { total += $2 }
        END { printf "%.2f\n", total }' "$1"
}
rate() { awk -v count="$1" -v seconds="$2" 'BEGIN { printf "%.0f", count / seconds }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# Seconds since the epoch, with fractions.
now_seconds() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now_seconds)" 'BEGIN { printf "%.2f", b - a }'; }

# CPU seconds the whole machine has been busy since boot (from /proc/stat): the difference
# around a run, minus the run's own CPU, is what other processes took meanwhile.
machine_busy_seconds() {
    awk -v ticks_per_second="$(getconf CLK_TCK)" '/^cpu / {
        printf "%.2f\n", ($2 + $3 + $4 + $7 + $8 + $9) / ticks_per_second }' /proc/stat
}
other_cpu_seconds() {
    awk -v before="$1" -v after="$2" -v own="$3" \
        'BEGIN { other = after - before - own; printf "%.1f\n", other < 0 ? 0 : other }'
}

# On a VM with free page reporting (virtio-balloon), memory freed in the guest goes back
# to the host within seconds, and each page touched again costs a fault on the host: on
# the 2-core VM these figures come from, writing 2.2 GB with dd took 0.5 s right after
# freeing memory and 5 s after 5 idle seconds. Which step pays that depends on timing,
# not on the code. With FHIRLOG_BENCH_KEEP_PAGES=1 (root), keep_guest_pages turns page
# reporting off, backs all free memory once, and restore_guest_pages (call it at exit)
# puts the setting back.
page_reporting_setting=/sys/module/page_reporting/parameters/page_reporting_order
saved_page_reporting=""
keep_guest_pages() {
    if [ "${FHIRLOG_BENCH_KEEP_PAGES:-0}" = 1 ] && [ -w "$page_reporting_setting" ]; then
        saved_page_reporting="$(cat "$page_reporting_setting")"
        echo 11 >"$page_reporting_setting"
        local free_gib
        free_gib=$(awk '/^MemFree:/ { print int($2 / 1048576) - 1 }' /proc/meminfo)
        python3 -c "b'\\x01' * ($free_gib << 30)"
        echo "page reporting off for this run (was order $saved_page_reporting); ${free_gib} GiB backed"
    elif [ -r "$page_reporting_setting" ] && [ "$(cat "$page_reporting_setting")" -le 10 ]; then
        echo "note: free page reporting is on (order $(cat "$page_reporting_setting")); see FHIRLOG_BENCH_KEEP_PAGES"
    fi
}
restore_guest_pages() {
    if [ -n "$saved_page_reporting" ]; then echo "$saved_page_reporting" >"$page_reporting_setting"; fi
}

# Splits every {Type}.ndjson of directory $1 into four quarters by line: quarter k of each
# type goes to $2-k/{Type}.ndjson.
split_into_quarters() {
    local source_directory="$1" quarter_prefix="$2" type_file line_count
    for quarter in 1 2 3 4; do mkdir -p "$quarter_prefix-$quarter"; done
    for type_file in "$source_directory"/*.ndjson; do
        line_count="$(wc -l <"$type_file")"
        awk -v line_count="$line_count" -v output_prefix="$quarter_prefix-" \
            -v file_name="$(basename "$type_file")" '
            { quarter = int((NR - 1) * 4 / line_count) + 1
              print > (output_prefix quarter "/" file_name) }
        ' "$type_file"
    done
}

# Starts `$binary serve` on data directory $1 under /usr/bin/time -v (report $2.time, log
# $2.log) with any further arguments after $3, runs benches/http_export.py against it with
# operation path $3 (default `$export`), stops the server and prints "SECONDS RESOURCES"
# (kick-off to manifest).
serve_and_http_export() {
    local data_directory="$1" report_prefix="$2" operation_path="${3:-\$export}" port
    shift $(( $# < 3 ? $# : 3 ))
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    /usr/bin/time -v -o "$report_prefix.time" "$binary" serve --data-dir "$data_directory" \
        --listen "127.0.0.1:$port" "$@" >"$report_prefix.log" 2>&1 &
    local server_pid=$!
    for _ in $(seq 1 300); do curl -s -o /dev/null "http://127.0.0.1:$port/fhir/metadata" && break; sleep 0.1; done
    python3 "$(dirname "${BASH_SOURCE[0]}")/http_export.py" "http://127.0.0.1:$port/fhir" "$operation_path"
    pkill -TERM -f "^$binary serve .*127.0.0.1:$port"
    wait "$server_pid" || true
}

# Builds the release binary unless FHIRLOG_BIN names one, makes the scratch directory
# fhirlog-$1.XXXXXX (removed at exit, with any background job, and page reporting
# restored) and copies the binary into it: sets $scratch and $binary.
enter_scratch_with_binary() {
    if [ -z "${FHIRLOG_BIN:-}" ]; then
        cargo build --release --bin fhirlog
    fi
    scratch="$(mktemp -d "${SCRATCH_PARENT:-/tmp}/fhirlog-$1.XXXXXX")"
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"; restore_guest_pages' EXIT
    binary="$scratch/fhirlog"
    cp "${FHIRLOG_BIN:-$repository_root/target/release/fhirlog}" "$binary"
}

# Generates the 1,000-patient set (gen --copies 50) into $scratch/ndjson and loads it into
# $scratch/store.
load_thousand_patients() {
    "$binary" gen --from data/sample --copies 50 --out "$scratch/ndjson" | tail -n 1
    "$binary" load "$scratch/ndjson" --data-dir "$scratch/store" | tail -n 1
}

# Runs `fhirlog export` of $scratch/store into $scratch/$1 (further arguments passed on)
# under /usr/bin/time and removes its files; sets $exported (resources in the manifest),
# $seconds_taken and $export_costs ("peak RSS … MB; others' CPU … s").
timed_export() {
    local name="$1" busy_before
    shift
    busy_before=$(machine_busy_seconds)
    /usr/bin/time -v -o "$scratch/$name.time" "$binary" export --data-dir "$scratch/store" \
        --out "$scratch/$name" "$@" > "$scratch/$name.json" 2>/dev/null
    exported=$(python3 -c 'import json,sys; print(sum(o["count"] for o in json.load(open(sys.argv[1]))["output"]))' "$scratch/$name.json")
    seconds_taken=$(seconds "$scratch/$name.time")
    export_costs="peak RSS $(peak_megabytes "$scratch/$name.time") MB; others' CPU $(other_cpu_seconds "$busy_before" "$(machine_busy_seconds)" "$(cpu_seconds "$scratch/$name.time")") s"
    rm -rf "${scratch:?}/$name"
}
