#!/usr/bin/env bash
# `_typeFilter` and search on the 1,000-patient set (gen --copies 50): a system export with
# no filter, then with each filter of issue 11, reporting resources scanned per second (every
# resource in the store is read; Observations are tested against the filter) and how many
# were exported; then the search latency of benches/search_latency.py against a server.
# Usage: benches/measure_type_filter.sh [SEARCH_REQUESTS (default 200)]
set -euo pipefail
repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository_root"
# shellcheck source=benches/bench_common.sh
source benches/bench_common.sh
search_requests="${1:-200}"
enter_scratch_with_binary measure-type-filter
keep_guest_pages
load_thousand_patients
total=$(cat "$scratch"/ndjson/*.ndjson | wc -l)
sync

export_with() {
    local name="$1"
    shift
    timed_export "$name" "$@"
    echo "$name: scanned $total resources in ${seconds_taken}s = $(rate "$total" "$seconds_taken") scanned/s; exported $exported; $export_costs"
}

export_with "unfiltered"
export_with "loinc-8302-2" --type-filter 'Observation?code=http://loinc.org|8302-2'
export_with "laboratory-since-2015" --type-filter 'Observation?category=laboratory&date=ge2015-01-01'
export_with "unfiltered-again"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$binary" serve --data-dir "$scratch/store" --listen "127.0.0.1:$port" --auth none >"$scratch/serve.log" 2>&1 &
for _ in $(seq 1 300); do curl -s -o /dev/null "http://127.0.0.1:$port/fhir/metadata" && break; sleep 0.1; done
python3 benches/search_latency.py "http://127.0.0.1:$port/fhir" "$search_requests"
