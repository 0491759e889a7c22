"""Search latency against a running fhirlog server: p50/p99 of
`GET {BASE}/Patient?family=…` and `GET {BASE}/Observation?patient=…&code=…`, each over
varying values read from the server itself (the first 200 Patients, and a code each of
their Observations carries), one request at a time.

Usage: python3 benches/search_latency.py BASE [REQUESTS_PER_QUERY (default 200)]

Typical set-up (release build; the 1,000-patient set):
    fhirlog gen --from data/sample --copies 50 --out /tmp/gen
    fhirlog load --data-dir /tmp/store /tmp/gen
    fhirlog serve --data-dir /tmp/store --auth none &
    python3 benches/search_latency.py http://127.0.0.1:8080/fhir
"""
import json
import sys
import time
import urllib.parse
import urllib.request

base = sys.argv[1].rstrip("/")
requests_per_query = int(sys.argv[2]) if len(sys.argv) > 2 else 200


def get(path):
    started = time.perf_counter()
    with urllib.request.urlopen(base + path) as reply:
        body = json.load(reply)
    return time.perf_counter() - started, body


def resources(bundle):
    return [entry["resource"] for entry in bundle.get("entry", [])]


_, patients_page = get("/Patient?_count=200")
patients = resources(patients_page)
families = sorted({
    name["family"] for patient in patients for name in patient.get("name", []) if "family" in name
})
patient_codes = []
for patient in patients[:50]:
    _, observations = get("/Observation?" + urllib.parse.urlencode({"patient": patient["id"], "_count": 1}))
    for observation in resources(observations):
        coding = observation.get("code", {}).get("coding", [{}])[0]
        if "code" in coding:
            patient_codes.append((patient["id"], coding.get("system", "") + "|" + coding["code"]))
if not families or not patient_codes:
    sys.exit("search_latency: the store holds no Patients with names or no Observations with codes")


def measure(label, paths):
    seconds = []
    totals = []
    for path in paths:
        elapsed, bundle = get(path)
        seconds.append(elapsed)
        totals.append(bundle.get("total", 0))
    seconds.sort()
    p50 = seconds[len(seconds) // 2] * 1000
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1000
    print(f"{label}: n={len(seconds)} p50={p50:.1f} ms p99={p99:.1f} ms "
          f"max={seconds[-1] * 1000:.1f} ms mean hits={sum(totals) / len(totals):.1f}")


measure("Patient?family=", [
    "/Patient?" + urllib.parse.urlencode({"family": families[index % len(families)]})
    for index in range(requests_per_query)
])
measure("Observation?patient=&code=", [
    "/Observation?" + urllib.parse.urlencode({"patient": patient_id, "code": code})
    for patient_id, code in (patient_codes[index % len(patient_codes)] for index in range(requests_per_query))
])
