"""Kicks off an $export at BASE (a FHIR base URL), polls until the manifest, and prints
`SECONDS RESOURCES`: kick-off to manifest, and the resources the manifest counts.
Usage: python3 benches/http_export.py BASE [OPERATION_PATH (default `$export`, e.g.
`Group/big/$export`)]"""
import json
import sys
import time
import urllib.request

base = sys.argv[1]
operation_path = sys.argv[2] if len(sys.argv) > 2 else "$export"
started = time.monotonic()
request = urllib.request.Request(
    base + "/" + operation_path,
    headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
)
with urllib.request.urlopen(request) as reply:
    status_url = reply.headers["Content-Location"]
while True:
    with urllib.request.urlopen(status_url) as reply:
        if reply.status == 200:
            manifest = json.load(reply)
            break
    time.sleep(0.02)
elapsed = time.monotonic() - started
print(f"{elapsed:.2f} {sum(item['count'] for item in manifest['output'])}")
