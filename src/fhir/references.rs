//! Rewriting `Reference.reference` values, e.g. `urn:uuid:` placeholders in Bundles.

use std::collections::HashMap;

use serde_json::Value;

/// Replaces every `"reference": "<key>"` string found in `map` by its value, at any depth.
/// Returns how many references were rewritten.
pub fn rewrite_references(value: &mut Value, map: &HashMap<String, String>) -> usize {
    let mut rewritten = 0;
    let mut pending: Vec<&mut Value> = vec![value];
    while let Some(current) = pending.pop() {
        match current {
            Value::Object(fields) => {
                for (key, field) in fields.iter_mut() {
                    if key == "reference"
                        && let Value::String(reference) = field
                    {
                        if let Some(replacement) = map.get(reference.as_str()) {
                            replacement.clone_into(reference);
                            rewritten += 1;
                        }
                        continue;
                    }
                    pending.push(field);
                }
            }
            Value::Array(items) => pending.extend(items.iter_mut()),
            _ => {}
        }
    }
    rewritten
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrites_known_references_at_any_depth_only() {
        let mut resource = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "performer": [{"reference": "urn:uuid:2"}, {"reference": "Practitioner/x"}],
            "note": [{"text": "urn:uuid:1"}]
        });
        let map = HashMap::from([("urn:uuid:1".to_owned(), "Patient/p1".to_owned())]);
        assert_eq!(rewrite_references(&mut resource, &map), 1);
        assert_eq!(resource["subject"]["reference"], "Patient/p1");
        assert_eq!(resource["performer"][0]["reference"], "urn:uuid:2");
        assert_eq!(resource["note"][0]["text"], "urn:uuid:1");
    }
}
