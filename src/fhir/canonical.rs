//! Parsing untrusted resource JSON into a [`ParsedResource`], and the canonical form that
//! the store keeps and exports byte for byte.
//!
//! Canonical form: minified JSON, `resourceType`, `id` and `meta` first, `meta.versionId`
//! and `meta.lastUpdated` first inside `meta`, every other object's keys sorted.

use serde_json::{Map, Value};

use super::{Instant, ResourceId, ResourceIdParseError, ResourceType, UnknownResourceType};

/// Why a body is not an acceptable FHIR resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceBodyError {
    #[error("body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("body is a JSON {found}, not a JSON object")]
    NotAnObject { found: &'static str },
    #[error("resource has no resourceType")]
    MissingResourceType,
    #[error("resourceType must be a string")]
    ResourceTypeNotAString,
    #[error(transparent)]
    UnknownResourceType(#[from] UnknownResourceType),
    #[error("resource JSON is nested deeper than {limit} levels")]
    NestedTooDeep { limit: usize },
    #[error("resource id must be a string")]
    IdNotAString,
    #[error("invalid resource id: {0}")]
    InvalidId(#[from] ResourceIdParseError),
    #[error("resource meta must be a JSON object")]
    MetaNotAnObject,
}

/// A structurally valid resource: a JSON object with a known `resourceType` and, if it has
/// one, a valid `id`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedResource {
    pub resource_type: ResourceType,
    pub id: Option<ResourceId>,
    pub json: Map<String, Value>,
}

/// Nesting limit applied when no other is configured.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;

impl ParsedResource {
    pub fn parse_bytes(
        bytes: &[u8],
        max_depth: usize,
    ) -> Result<ParsedResource, ResourceBodyError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|error| ResourceBodyError::MalformedJson(error.to_string()))?;
        ParsedResource::from_value(value, max_depth)
    }

    /// Parses a body whose `id`, if any, is to be ignored (FHIR create): the id is
    /// dropped before validation, so an invalid one is no error.
    pub fn parse_bytes_ignoring_id(
        bytes: &[u8],
        max_depth: usize,
    ) -> Result<ParsedResource, ResourceBodyError> {
        let mut value: Value = serde_json::from_slice(bytes)
            .map_err(|error| ResourceBodyError::MalformedJson(error.to_string()))?;
        if let Value::Object(fields) = &mut value {
            fields.remove("id");
        }
        ParsedResource::from_value(value, max_depth)
    }

    pub fn from_value(value: Value, max_depth: usize) -> Result<ParsedResource, ResourceBodyError> {
        if json_depth_exceeds(&value, max_depth) {
            return Err(ResourceBodyError::NestedTooDeep { limit: max_depth });
        }
        let json = match value {
            Value::Object(json) => json,
            other => {
                return Err(ResourceBodyError::NotAnObject {
                    found: json_kind_name(&other),
                });
            }
        };
        let resource_type = match json.get("resourceType") {
            None => return Err(ResourceBodyError::MissingResourceType),
            Some(Value::String(name)) => ResourceType::parse(name)?,
            Some(_) => return Err(ResourceBodyError::ResourceTypeNotAString),
        };
        let id = match json.get("id") {
            None => None,
            Some(Value::String(id)) => Some(ResourceId::parse(id)?),
            Some(_) => return Err(ResourceBodyError::IdNotAString),
        };
        if json.get("meta").is_some_and(|meta| !meta.is_object()) {
            return Err(ResourceBodyError::MetaNotAnObject);
        }
        Ok(ParsedResource {
            resource_type,
            id,
            json,
        })
    }
}

fn json_kind_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn json_depth_exceeds(value: &Value, max_depth: usize) -> bool {
    let mut pending: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((current, depth)) = pending.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match current {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(fields) => Box::new(fields.values()),
            _ => continue,
        };
        if depth > max_depth {
            return true;
        }
        pending.extend(children.map(|child| (child, depth + 1)));
    }
    false
}

/// A canonical body still missing its server-assigned `meta.versionId` and
/// `meta.lastUpdated`; [`PreparedBody::finish`] inserts them without re-serialising.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedBody {
    text: String,
    meta_fields_start: usize,
    meta_has_other_fields: bool,
}

impl PreparedBody {
    /// Canonicalises `json` as resource `resource_type`/`id`; any `meta.versionId` and
    /// `meta.lastUpdated` the client sent are dropped.
    pub fn new(
        resource_type: ResourceType,
        id: &ResourceId,
        mut json: Map<String, Value>,
    ) -> PreparedBody {
        json.remove("resourceType");
        json.remove("id");
        let mut meta = match json.remove("meta") {
            Some(Value::Object(meta)) => meta,
            _ => Map::new(),
        };
        meta.remove("versionId");
        meta.remove("lastUpdated");
        let mut bytes = Vec::with_capacity(1024);
        bytes.extend_from_slice(b"{\"resourceType\":\"");
        bytes.extend_from_slice(resource_type.as_str().as_bytes());
        bytes.extend_from_slice(b"\",\"id\":\"");
        bytes.extend_from_slice(id.as_str().as_bytes());
        bytes.extend_from_slice(b"\",\"meta\":");
        let meta_fields_start = bytes.len() + 1;
        let meta_has_other_fields = !meta.is_empty();
        write_json(&mut bytes, &meta);
        for (key, value) in &json {
            bytes.push(b',');
            write_json(&mut bytes, key);
            bytes.push(b':');
            write_json(&mut bytes, value);
        }
        bytes.push(b'}');
        let text = String::from_utf8(bytes).expect("serde_json writes UTF-8");
        PreparedBody {
            text,
            meta_fields_start,
            meta_has_other_fields,
        }
    }

    /// blake3 of the canonical body without server-assigned metadata: equal digests mean
    /// equal content.
    pub fn content_digest(&self) -> [u8; 32] {
        *blake3::hash(self.text.as_bytes()).as_bytes()
    }

    /// The exported body of version `version` written at `last_updated`.
    pub fn finish(&self, version: u64, last_updated: Instant) -> String {
        let (head, tail) = self.text.split_at(self.meta_fields_start);
        let mut finished = String::with_capacity(self.text.len() + 80);
        finished.push_str(head);
        finished.push_str("\"versionId\":\"");
        finished.push_str(&version.to_string());
        finished.push_str("\",\"lastUpdated\":\"");
        finished.push_str(&last_updated.to_fhir_string());
        finished.push('"');
        if self.meta_has_other_fields {
            finished.push(',');
        }
        finished.push_str(tail);
        finished
    }
}

/// Appends `value` as minified JSON; writing to a `Vec` cannot fail for JSON values.
fn write_json<T: serde::Serialize + ?Sized>(bytes: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(&mut *bytes, value).expect("serialising JSON into memory cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ParsedResource, ResourceBodyError> {
        ParsedResource::parse_bytes(text.as_bytes(), DEFAULT_MAX_JSON_DEPTH)
    }

    #[test]
    fn rejects_each_kind_of_bad_body() {
        assert!(matches!(
            parse("{"),
            Err(ResourceBodyError::MalformedJson(_))
        ));
        assert_eq!(
            parse("[1]"),
            Err(ResourceBodyError::NotAnObject { found: "array" })
        );
        assert_eq!(parse("{}"), Err(ResourceBodyError::MissingResourceType));
        assert_eq!(
            parse(r#"{"resourceType":3}"#),
            Err(ResourceBodyError::ResourceTypeNotAString)
        );
        assert!(matches!(
            parse(r#"{"resourceType":"Nope"}"#),
            Err(ResourceBodyError::UnknownResourceType(_))
        ));
        assert_eq!(
            parse(r#"{"resourceType":"Patient","id":7}"#),
            Err(ResourceBodyError::IdNotAString)
        );
        assert!(matches!(
            parse(r#"{"resourceType":"Patient","id":"a b"}"#),
            Err(ResourceBodyError::InvalidId(_))
        ));
        assert_eq!(
            parse(r#"{"resourceType":"Patient","meta":[]}"#),
            Err(ResourceBodyError::MetaNotAnObject)
        );
    }

    #[test]
    fn enforces_the_nesting_limit() {
        let nested = |levels: usize| {
            format!(
                r#"{{"resourceType":"Basic","x":{}1{}}}"#,
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        assert!(ParsedResource::parse_bytes(nested(8).as_bytes(), 9).is_ok());
        assert_eq!(
            ParsedResource::parse_bytes(nested(9).as_bytes(), 9),
            Err(ResourceBodyError::NestedTooDeep { limit: 9 })
        );
    }

    #[test]
    fn canonical_form_orders_keys_and_inserts_server_metadata() {
        let parsed = parse(
            r#"{"gender":"female","meta":{"versionId":"9","profile":["p"]},"id":"a","resourceType":"Patient","active":true}"#,
        )
        .unwrap();
        let id = parsed.id.clone().unwrap();
        let prepared = PreparedBody::new(parsed.resource_type, &id, parsed.json);
        let instant = Instant::parse("2024-01-01T00:00:00Z").unwrap();
        assert_eq!(
            prepared.finish(3, instant),
            r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"3","lastUpdated":"2024-01-01T00:00:00.000000Z","profile":["p"]},"active":true,"gender":"female"}"#
        );
    }

    #[test]
    fn digest_ignores_server_metadata_and_key_order_but_not_content() {
        let digest_of = |text: &str| {
            let parsed = parse(text).unwrap();
            let id = parsed.id.clone().unwrap();
            PreparedBody::new(parsed.resource_type, &id, parsed.json).content_digest()
        };
        let original =
            digest_of(r#"{"resourceType":"Patient","id":"a","active":true,"gender":"male"}"#);
        let reordered = digest_of(
            r#"{"gender":"male","meta":{"versionId":"4","lastUpdated":"2020-01-01T00:00:00Z"},"active":true,"id":"a","resourceType":"Patient"}"#,
        );
        let changed =
            digest_of(r#"{"resourceType":"Patient","id":"a","active":false,"gender":"male"}"#);
        assert_eq!(original, reordered);
        assert_ne!(original, changed);
    }

    #[test]
    fn decimals_keep_their_written_precision() {
        let parsed =
            parse(r#"{"resourceType":"Observation","id":"o","valueQuantity":{"value":1.50}}"#)
                .unwrap();
        let id = parsed.id.clone().unwrap();
        let finished = PreparedBody::new(parsed.resource_type, &id, parsed.json)
            .finish(1, Instant::from_micros_since_epoch(0));
        assert!(
            finished.ends_with(r#""valueQuantity":{"value":1.50}}"#),
            "{finished}"
        );
    }
}
