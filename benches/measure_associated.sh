#!/usr/bin/env bash
# Associated data on the 1,000-patient set (gen --copies 50): Patient-level `fhirlog export`
# without and with `--include-referenced` (includeAssociatedData=_referenced), alternating,
# ROUNDS times each (default 3): seconds, resources/s, resources added, peak RSS.
# Usage: benches/measure_associated.sh [ROUNDS]
set -euo pipefail
repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository_root"
# shellcheck source=benches/bench_common.sh
source benches/bench_common.sh
rounds="${1:-3}"
enter_scratch_with_binary measure-associated
keep_guest_pages
load_thousand_patients
rm -rf "$scratch/ndjson"
sync

patient_export() {
    local name="$1"
    shift
    timed_export "$name" --level patient "$@"
    echo "$name: $exported resources in ${seconds_taken}s = $(rate "$exported" "$seconds_taken") resources/s; $export_costs"
    echo "$exported $seconds_taken" >> "$scratch/$name.runs"
}

for _ in $(seq 1 "$rounds"); do
    patient_export plain
    patient_export referenced --include-referenced
done
python3 - "$scratch/plain.runs" "$scratch/referenced.runs" <<'PYTHON'
import statistics, sys
def load(path):
    runs = [line.split() for line in open(path)]
    return int(runs[0][0]), statistics.median(float(seconds) for _, seconds in runs)
plain_count, plain_seconds = load(sys.argv[1])
referenced_count, referenced_seconds = load(sys.argv[2])
print(f"associated resources added: {referenced_count - plain_count}; median time with/without: "
      f"{referenced_seconds:.2f}/{plain_seconds:.2f} s = {referenced_seconds / plain_seconds:.2f}x")
PYTHON
