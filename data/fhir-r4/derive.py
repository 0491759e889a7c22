#!/usr/bin/env python3
"""Derives elements.txt from the R4 facts in ../shared/fhir-r4 (choice-types.json, element-types.json).

One element per line, sorted by path:
  `Path type` for an element of one type;
  `Path [x] Suffix:type Suffix:type ...` for a choice element, whose JSON names are the element
  name followed by a suffix (the suffixes come from choice-types.json only; each suffix's type is
  the type element-types.json gives the expanded element).
Expanded choice names (`Observation.valueQuantity`) are not elements of their own and are left out,
as are the few paths below an element that is not a backbone element (`ElementDefinition.extension.url`:
the element's type defines its members).
Usage: python3 derive.py ../../../shared/fhir-r4 > elements.txt
"""
import json
import sys

source = sys.argv[1]
choices = json.load(open(f"{source}/choice-types.json"))["choices"]
elements = json.load(open(f"{source}/element-types.json"))["elements"]

expanded = set()
lines = {}
for path, suffixes in choices.items():
    options = []
    for suffix in suffixes:
        expanded_path = path + suffix
        expanded.add(expanded_path)
        options.append(f"{suffix}:{elements[expanded_path]['type']}")
    lines[path] = f"{path} [x] " + " ".join(options)
for path, definition in elements.items():
    if path in expanded:
        continue
    if path in lines:
        raise SystemExit(f"{path} is both a choice and a plain element")
    lines[path] = f"{path} {definition['type']}"
def under_a_non_backbone_element(path):
    parent = path.rsplit(".", 1)[0]
    if "." not in parent:
        return False
    return elements.get(parent, {}).get("type") not in ("BackboneElement", "Element")


for path in sorted(lines):
    if not under_a_non_backbone_element(path):
        print(lines[path])
