//! Parsing untrusted resource JSON into a [`ParsedResource`] (a JSON tree, for Bundle
//! entries and the loader) or, in one pass without a tree, into [`ResourceFields`] (single
//! resources over HTTP, however large), and the canonical form that the store keeps and
//! exports byte for byte; both give the same canonical bytes.
//!
//! Canonical form: minified JSON, `resourceType`, `id` and `meta` first, `meta.versionId`
//! and `meta.lastUpdated` first inside `meta`, every other object's keys sorted.

use std::borrow::Cow;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::compartment::{PathPosition, PatientCompartment, PatientIdCollector};
use super::{
    Instant, LocalBase, ResourceId, ResourceIdParseError, ResourceType, UnknownResourceType,
};

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
    #[error("body resourceType '{found}' does not match the URL type '{expected}'")]
    UnexpectedResourceType {
        expected: ResourceType,
        found: ResourceType,
    },
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

/// The deepest nesting limit that can be configured: serde_json refuses a 128th level
/// itself, as malformed.
pub const MAX_SUPPORTED_JSON_DEPTH: usize = 127;

impl ParsedResource {
    pub fn parse_bytes(
        bytes: &[u8],
        max_depth: usize,
    ) -> Result<ParsedResource, ResourceBodyError> {
        if json_nesting_exceeds(bytes, max_depth) {
            return Err(ResourceBodyError::NestedTooDeep { limit: max_depth });
        }
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
        if json_nesting_exceeds(bytes, max_depth) {
            return Err(ResourceBodyError::NestedTooDeep { limit: max_depth });
        }
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
        for server_field in SERVER_META_FIELDS {
            meta.remove(*server_field);
        }
        let mut bytes = Vec::with_capacity(1024);
        let meta_fields_start = write_body_head(&mut bytes, resource_type, id);
        let meta_has_other_fields = !meta.is_empty();
        write_json(&mut bytes, &meta);
        for (key, value) in &json {
            bytes.push(b',');
            write_json(&mut bytes, key);
            bytes.push(b':');
            write_json(&mut bytes, value);
        }
        bytes.push(b'}');
        PreparedBody::from_canonical_bytes(bytes, meta_fields_start, meta_has_other_fields)
    }

    /// Puts together a body from canonical parts: the members of `meta` (without braces)
    /// and the other members, each `"name":value`, in canonical order.
    fn assemble<'part>(
        resource_type: ResourceType,
        id: &ResourceId,
        meta_fields: &[u8],
        members: impl Iterator<Item = &'part [u8]> + Clone,
    ) -> PreparedBody {
        let members_length: usize = members.clone().map(|member| member.len() + 1).sum();
        let mut bytes =
            Vec::with_capacity(80 + id.as_str().len() + meta_fields.len() + members_length);
        let meta_fields_start = write_body_head(&mut bytes, resource_type, id);
        bytes.push(b'{');
        bytes.extend_from_slice(meta_fields);
        bytes.push(b'}');
        for member in members {
            bytes.push(b',');
            bytes.extend_from_slice(member);
        }
        bytes.push(b'}');
        PreparedBody::from_canonical_bytes(bytes, meta_fields_start, !meta_fields.is_empty())
    }

    fn from_canonical_bytes(
        bytes: Vec<u8>,
        meta_fields_start: usize,
        meta_has_other_fields: bool,
    ) -> PreparedBody {
        PreparedBody {
            text: String::from_utf8(bytes).expect("canonical JSON is written from UTF-8 text"),
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
        let mut finished = String::new();
        self.finish_into(version, &last_updated.to_fhir_string(), &mut finished);
        finished
    }

    /// [`PreparedBody::finish`] into `finished`, replacing what it held, with `last_updated`
    /// already as [`Instant::to_fhir_string`] writes it: a writer of many versions at one
    /// instant formats it once and reuses one buffer.
    pub fn finish_into(&self, version: u64, last_updated: &str, finished: &mut String) {
        use std::fmt::Write as _;
        let (head, tail) = self.text.split_at(self.meta_fields_start);
        finished.clear();
        finished.reserve(self.text.len() + 80);
        finished.push_str(head);
        finished.push_str("\"versionId\":\"");
        write!(finished, "{version}").expect("writing to a String cannot fail");
        finished.push_str("\",\"lastUpdated\":\"");
        finished.push_str(last_updated);
        finished.push('"');
        if self.meta_has_other_fields {
            finished.push(',');
        }
        finished.push_str(tail);
    }
}

/// Whether the arrays and objects of `bytes` nest deeper than `max_depth`, counting the
/// brackets outside string literals, even in malformed text. Measures any depth without
/// recursion, before the JSON reader, whose own recursion guard stops at 128 levels.
pub fn json_nesting_exceeds(bytes: &[u8], max_depth: usize) -> bool {
    let mut depth = 0_usize;
    let mut in_string = false;
    let mut after_backslash = false;
    for &byte in bytes {
        if in_string {
            if after_backslash {
                after_backslash = false;
            } else if byte == b'\\' {
                after_backslash = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// What happens to the `id` a body carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyId {
    /// It must be a valid id if present (FHIR update).
    Validate,
    /// It is dropped, whatever it holds (FHIR create).
    Ignore,
}

/// A resource body read in one pass, without building a JSON tree: refused for the same
/// reasons as [`ParsedResource::parse_bytes`], every member but `resourceType`, `id` and
/// `meta` already in canonical form, and the patients whose compartments hold it noted on
/// the way. [`ResourceFields::into_prepared`] gives the same as [`PreparedBody::new`] and
/// [`PatientCompartment::patient_ids`] give for the body's tree.
#[derive(Debug)]
pub struct ResourceFields {
    pub resource_type: ResourceType,
    /// The body's own id (`None` when it has none or it was ignored).
    pub id: Option<ResourceId>,
    canonical: Vec<u8>,
    /// The members of the canonical `meta`, without its braces and server-assigned fields.
    meta_fields: Range<usize>,
    /// The other members, each `"name":value`, in canonical order.
    members: Vec<Range<usize>>,
    patients: PatientIdCollector<'static>,
}

impl ResourceFields {
    /// Reads `body` as a resource of `expected_type`; a body of another type is refused
    /// (after the checks [`ParsedResource::parse_bytes`] makes). Compartment patients come
    /// from the references `local_base` deems local.
    pub fn read(
        body: &[u8],
        expected_type: ResourceType,
        body_id: BodyId,
        max_depth: usize,
        local_base: &LocalBase,
    ) -> Result<ResourceFields, ResourceBodyError> {
        if max_depth >= MAX_SUPPORTED_JSON_DEPTH && json_nesting_exceeds(body, max_depth) {
            return Err(ResourceBodyError::NestedTooDeep { limit: max_depth });
        }
        let mut writer = CanonicalWriter {
            output: Vec::with_capacity(body.len()),
            members: Vec::new(),
            reorder_scratch: Vec::new(),
            patients: PatientCompartment::r4()
                .patient_id_collector(expected_type, local_base.clone()),
            nesting: Nesting::within(max_depth),
        };
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let root = ResourceRoot {
            writer: &mut writer,
        }
        .deserialize(&mut deserializer)
        .and_then(|root| deserializer.end().map(|()| root))
        .map_err(|error| {
            if writer.nesting.exceeded {
                ResourceBodyError::NestedTooDeep { limit: max_depth }
            } else {
                ResourceBodyError::MalformedJson(error.to_string())
            }
        })?;
        if let RootShape::NotAnObject { found } = root {
            return Err(ResourceBodyError::NotAnObject { found });
        }
        let CanonicalWriter {
            output,
            members: root_members,
            patients,
            ..
        } = writer;
        let mut resource_type_value = None;
        let mut id_value = None;
        let mut meta_value = None;
        let mut members = Vec::with_capacity(root_members.len());
        for member in &root_members {
            let value = member.value_start..member.end;
            match &*member.name {
                "resourceType" => resource_type_value = Some(value),
                "id" => id_value = Some(value),
                "meta" => meta_value = Some(value),
                _ => members.push(member.start..member.end),
            }
        }
        let resource_type = match resource_type_value.map(|value| string_value(&output[value])) {
            None => return Err(ResourceBodyError::MissingResourceType),
            Some(None) => return Err(ResourceBodyError::ResourceTypeNotAString),
            Some(Some(name)) => ResourceType::parse(&name)?,
        };
        let id = match (body_id, id_value.map(|value| string_value(&output[value]))) {
            (BodyId::Ignore, _) | (BodyId::Validate, None) => None,
            (BodyId::Validate, Some(None)) => return Err(ResourceBodyError::IdNotAString),
            (BodyId::Validate, Some(Some(id))) => Some(ResourceId::parse(&id)?),
        };
        let meta_fields = match meta_value {
            None => 0..0,
            Some(value) if output[value.start] == b'{' => value.start + 1..value.end - 1,
            Some(_) => return Err(ResourceBodyError::MetaNotAnObject),
        };
        if resource_type != expected_type {
            return Err(ResourceBodyError::UnexpectedResourceType {
                expected: expected_type,
                found: resource_type,
            });
        }
        Ok(ResourceFields {
            resource_type,
            id,
            canonical: output,
            meta_fields,
            members,
            patients,
        })
    }

    /// The canonical body of the resource as `id`, and the patients whose compartments
    /// hold it.
    pub fn into_prepared(self, id: &ResourceId) -> (PreparedBody, Vec<String>) {
        let members = self
            .members
            .iter()
            .map(|member| &self.canonical[member.clone()]);
        let body = PreparedBody::assemble(
            self.resource_type,
            id,
            &self.canonical[self.meta_fields.clone()],
            members,
        );
        (body, self.patients.into_patient_ids(id.as_str()))
    }
}

/// The text of a canonical JSON string value, or `None` for any other value.
fn string_value(canonical: &[u8]) -> Option<String> {
    if canonical.first() != Some(&b'"') {
        return None;
    }
    serde_json::from_slice(canonical).ok()
}

/// serde_json, built with `arbitrary_precision`, hands over a number that is no 64-bit
/// integer as a map with this one member, its text the value; `serde_json::Value` reads
/// any map whose first member has this name as a number, and so does [`CanonicalWriter`].
const SERDE_JSON_NUMBER_MEMBER: &str = "$serde_json::private::Number";

/// The `meta` members the server assigns; a client's are dropped.
const SERVER_META_FIELDS: &[&str] = &["versionId", "lastUpdated"];

/// Writes canonical JSON while serde_json reads the body: members are written as they come,
/// and an object whose members came out of order (or named twice) is rewritten in place
/// once it ends, so only one object's bytes are ever copied at a time.
struct CanonicalWriter<'de> {
    output: Vec<u8>,
    /// The members of the objects being read, innermost object's last.
    members: Vec<ObjectMember<'de>>,
    reorder_scratch: Vec<u8>,
    patients: PatientIdCollector<'static>,
    nesting: Nesting,
}

/// The nesting limit, checked as arrays and objects open while the body is read.
/// serde_json refuses a 128th level itself, before any visitor sees it, so
/// [`ResourceFields::read`] pre-scans the text at the deepest configurable limit instead.
struct Nesting {
    depth: usize,
    max_depth: usize,
    exceeded: bool,
}

impl Nesting {
    fn within(max_depth: usize) -> Nesting {
        Nesting {
            depth: 0,
            max_depth,
            exceeded: false,
        }
    }

    /// Enters an array or object; an error once it is one level too deep.
    fn enter<E: de::Error>(&mut self) -> Result<(), E> {
        self.depth += 1;
        if self.depth > self.max_depth {
            self.exceeded = true;
            return Err(E::custom("nested too deep"));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }
}

struct ObjectMember<'de> {
    name: Cow<'de, str>,
    /// Where `"name":value` starts in the output.
    start: usize,
    value_start: usize,
    end: usize,
    /// The patient references found in the value, as collector counts.
    found: Range<usize>,
}

/// How the members of an object are laid out while it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberLayout {
    /// Comma-separated inside braces: any object in the resource.
    Object,
    /// Back to back, no braces, placed later: the resource root.
    Root,
}

impl<'de> CanonicalWriter<'de> {
    fn write_members<A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
        first_name: Cow<'de, str>,
        position: PathPosition,
        layout: MemberLayout,
    ) -> Result<(), A::Error> {
        let mut next_name = Some(first_name);
        let mut is_first = true;
        while let Some(name) = next_name {
            if layout == MemberLayout::Object && !is_first {
                self.output.push(b',');
            }
            is_first = false;
            let start = self.output.len();
            match &name {
                Cow::Borrowed(unescaped) => {
                    write_unescaped_json_string(&mut self.output, unescaped)
                }
                Cow::Owned(name) => write_json(&mut self.output, name.as_str()),
            }
            self.output.push(b':');
            let value_start = self.output.len();
            let member_position = self.patients.enter_member(position, &name);
            let found_start = self.patients.found_count();
            let skipped_names = if layout == MemberLayout::Root && name == "meta" {
                SERVER_META_FIELDS
            } else {
                &[]
            };
            map.next_value_seed(CanonicalValue {
                writer: self,
                position: member_position,
                skipped_names,
            })?;
            self.patients.leave(member_position);
            if name == "reference" && self.patients.ends_a_path(position) {
                self.note_reference(position, value_start);
            }
            self.members.push(ObjectMember {
                name,
                start,
                value_start,
                end: self.output.len(),
                found: found_start..self.patients.found_count(),
            });
            next_name = map.next_key_seed(MemberName)?;
        }
        Ok(())
    }

    /// Hands the string value written at `value_start` to the collector.
    fn note_reference(&mut self, position: PathPosition, value_start: usize) {
        let value = &self.output[value_start..];
        if value.first() != Some(&b'"') {
            return;
        }
        let text = &value[1..value.len() - 1];
        if !text.contains(&b'\\') {
            if let Ok(reference) = std::str::from_utf8(text) {
                self.patients.reference_found(position, reference);
            }
        } else if let Ok(reference) = serde_json::from_slice::<String>(value) {
            self.patients.reference_found(position, &reference);
        }
    }

    /// Puts the members from `members_base` in canonical order, keeping the last of those
    /// named alike and none named in `skipped_names`; the found references of replaced
    /// members are forgotten. Returns the order as indices from `members_base`, `None` when
    /// the members already are in it.
    fn order_members(&mut self, members_base: usize, skipped_names: &[&str]) -> Option<Vec<usize>> {
        let members = &self.members[members_base..];
        let already_ordered = members.windows(2).all(|pair| pair[0].name < pair[1].name)
            && !members
                .iter()
                .any(|member| skipped_names.contains(&&*member.name));
        if already_ordered {
            return None;
        }
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by(|&left, &right| {
            members[left]
                .name
                .cmp(&members[right].name)
                .then(right.cmp(&left))
        });
        order.dedup_by(|later, kept| members[*later].name == members[*kept].name);
        if order.len() < members.len() {
            let mut is_kept = vec![false; members.len()];
            for &index in &order {
                is_kept[index] = true;
            }
            for (index, member) in members.iter().enumerate().rev() {
                if !is_kept[index] && !member.found.is_empty() {
                    self.patients.forget_found(member.found.clone());
                }
            }
        }
        order.retain(|&index| !skipped_names.contains(&&*members[index].name));
        Some(order)
    }

    /// Rewrites the object that starts at `object_start` in canonical order, once read.
    fn finish_object(&mut self, object_start: usize, members_base: usize, skipped_names: &[&str]) {
        if let Some(order) = self.order_members(members_base, skipped_names) {
            let members = &self.members[members_base..];
            self.reorder_scratch.clear();
            self.reorder_scratch
                .extend_from_slice(&self.output[object_start..]);
            self.output.truncate(object_start);
            self.output.push(b'{');
            for (position, &index) in order.iter().enumerate() {
                if position > 0 {
                    self.output.push(b',');
                }
                let member = &members[index];
                self.output.extend_from_slice(
                    &self.reorder_scratch[member.start - object_start..member.end - object_start],
                );
            }
            self.output.push(b'}');
        }
        self.members.truncate(members_base);
    }

    /// Writes the number of a map that serde_json made of one (see [`SERDE_JSON_NUMBER_MEMBER`]).
    fn write_number<A: MapAccess<'de>>(&mut self, map: &mut A) -> Result<(), A::Error> {
        let text: Cow<'de, str> = map.next_value()?;
        let number: serde_json::Number = text
            .parse()
            .map_err(|_| de::Error::custom("invalid number"))?;
        write_json(&mut self.output, &number);
        Ok(())
    }
}

/// Reads one object member name, borrowed from the body when it has no escapes.
struct MemberName;

impl<'de> DeserializeSeed<'de> for MemberName {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for MemberName {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an object member name")
    }

    fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(name))
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(name.to_owned()))
    }

    fn visit_string<E: de::Error>(self, name: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(name))
    }
}

/// Reads one JSON value and writes it in canonical form.
struct CanonicalValue<'writer, 'de> {
    writer: &'writer mut CanonicalWriter<'de>,
    position: PathPosition,
    /// Member names to drop if the value is an object.
    skipped_names: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for CanonicalValue<'_, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CanonicalValue<'_, 'de> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.writer.output.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        write_json(&mut self.writer.output, &value);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        write_json(&mut self.writer.output, &value);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        write_json(&mut self.writer.output, &value);
        Ok(())
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<(), E> {
        write_unescaped_json_string(&mut self.writer.output, value);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        write_json(&mut self.writer.output, value);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        self.writer.nesting.enter()?;
        self.writer.output.push(b'[');
        let mut is_first = true;
        loop {
            let separator_at = self.writer.output.len();
            if !is_first {
                self.writer.output.push(b',');
            }
            let item = CanonicalValue {
                writer: &mut *self.writer,
                position: self.position,
                skipped_names: &[],
            };
            if items.next_element_seed(item)?.is_none() {
                self.writer.output.truncate(separator_at);
                break;
            }
            is_first = false;
        }
        self.writer.output.push(b']');
        self.writer.nesting.leave();
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(first_name) = map.next_key_seed(MemberName)? else {
            self.writer.nesting.enter()?;
            self.writer.nesting.leave();
            self.writer.output.extend_from_slice(b"{}");
            return Ok(());
        };
        if first_name == SERDE_JSON_NUMBER_MEMBER {
            return self.writer.write_number(&mut map);
        }
        self.writer.nesting.enter()?;
        let object_start = self.writer.output.len();
        let members_base = self.writer.members.len();
        self.writer.output.push(b'{');
        self.writer
            .write_members(&mut map, first_name, self.position, MemberLayout::Object)?;
        self.writer.output.push(b'}');
        self.writer
            .finish_object(object_start, members_base, self.skipped_names);
        self.writer.nesting.leave();
        Ok(())
    }
}

/// What the top-level value turned out to be.
enum RootShape {
    /// Its members are the writer's members, in canonical order.
    Object,
    NotAnObject {
        found: &'static str,
    },
}

/// Reads the top-level value: for an object, its members are left in the writer, in
/// canonical order, for [`ResourceFields::read`] to place.
struct ResourceRoot<'writer, 'de> {
    writer: &'writer mut CanonicalWriter<'de>,
}

impl ResourceRoot<'_, '_> {
    fn not_an_object<E>(found: &'static str) -> Result<RootShape, E> {
        Ok(RootShape::NotAnObject { found })
    }
}

impl<'de> DeserializeSeed<'de> for ResourceRoot<'_, 'de> {
    type Value = RootShape;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<RootShape, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ResourceRoot<'_, 'de> {
    type Value = RootShape;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<RootShape, E> {
        Self::not_an_object("null")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RootShape, E> {
        Self::not_an_object("boolean")
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RootShape, E> {
        Self::not_an_object("number")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RootShape, E> {
        Self::not_an_object("number")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<RootShape, E> {
        Self::not_an_object("string")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, items: A) -> Result<RootShape, A::Error> {
        CanonicalValue {
            writer: self.writer,
            position: PathPosition::NOWHERE,
            skipped_names: &[],
        }
        .visit_seq(items)?;
        Self::not_an_object("array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RootShape, A::Error> {
        let Some(first_name) = map.next_key_seed(MemberName)? else {
            return Ok(RootShape::Object);
        };
        if first_name == SERDE_JSON_NUMBER_MEMBER {
            self.writer.write_number(&mut map)?;
            return Self::not_an_object("number");
        }
        self.writer.nesting.enter()?;
        let position = self.writer.patients.root();
        self.writer
            .write_members(&mut map, first_name, position, MemberLayout::Root)?;
        if let Some(order) = self.writer.order_members(0, &[]) {
            let mut members = std::mem::take(&mut self.writer.members);
            let mut ordered: Vec<Option<ObjectMember<'de>>> = members.drain(..).map(Some).collect();
            self.writer.members = order
                .into_iter()
                .filter_map(|index| ordered[index].take())
                .collect();
        }
        self.writer.nesting.leave();
        Ok(RootShape::Object)
    }
}

/// Writes `{"resourceType":…,"id":…,"meta":` and returns where the members of `meta` go.
fn write_body_head(bytes: &mut Vec<u8>, resource_type: ResourceType, id: &ResourceId) -> usize {
    bytes.extend_from_slice(b"{\"resourceType\":\"");
    bytes.extend_from_slice(resource_type.as_str().as_bytes());
    bytes.extend_from_slice(b"\",\"id\":\"");
    bytes.extend_from_slice(id.as_str().as_bytes());
    bytes.extend_from_slice(b"\",\"meta\":");
    bytes.len() + 1
}

/// Appends `value` as minified JSON; writing to a `Vec` cannot fail for JSON values.
/// Writes a string that serde_json borrowed from the body: it had no escapes, so it holds
/// no quote, backslash or control character, and its canonical text is its own bytes in
/// quotes.
fn write_unescaped_json_string(bytes: &mut Vec<u8>, unescaped: &str) {
    bytes.reserve(unescaped.len() + 2);
    bytes.push(b'"');
    bytes.extend_from_slice(unescaped.as_bytes());
    bytes.push(b'"');
}

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
    fn nesting_is_measured_on_the_text_outside_strings_at_any_depth() {
        assert!(!json_nesting_exceeds(br#"[[["[[[[\"[[["]]]"#, 3));
        assert!(json_nesting_exceeds(br#"[[["\\"[]]]"#, 3));
        assert!(json_nesting_exceeds(b"[1,][[[[", 3));
        let deep = "[".repeat(200_001);
        assert!(json_nesting_exceeds(deep.as_bytes(), 64));
        assert_eq!(
            ParsedResource::parse_bytes(deep.as_bytes(), 64),
            Err(ResourceBodyError::NestedTooDeep { limit: 64 })
        );
        assert!(matches!(
            ResourceFields::read(
                deep.as_bytes(),
                ResourceType::PATIENT,
                BodyId::Validate,
                64,
                &LocalBase::relative_only()
            ),
            Err(ResourceBodyError::NestedTooDeep { limit: 64 })
        ));
    }

    #[test]
    fn one_pass_reading_counts_nesting_as_the_text_does_whatever_the_innermost_value() {
        let basic = ResourceType::parse("Basic").unwrap();
        let read = |text: &str, max_depth| {
            ResourceFields::read(
                text.as_bytes(),
                basic,
                BodyId::Validate,
                max_depth,
                &LocalBase::relative_only(),
            )
        };
        for innermost in ["1", "1.5", "{}", "[]", r#"{"a":2.5e3}"#, r#""x""#] {
            for opening in ["[", r#"{"b":"#] {
                let closing = if opening == "[" { "]" } else { "}" };
                let body = format!(
                    r#"{{"resourceType":"Basic","x":{}{innermost}{}}}"#,
                    opening.repeat(5),
                    closing.repeat(5)
                );
                let levels = 6 + usize::from(innermost.starts_with(['{', '[']));
                assert!(!json_nesting_exceeds(body.as_bytes(), levels), "{body}");
                assert!(json_nesting_exceeds(body.as_bytes(), levels - 1), "{body}");
                assert!(read(&body, levels).is_ok(), "{body}");
                assert!(
                    matches!(
                        read(&body, levels - 1),
                        Err(ResourceBodyError::NestedTooDeep { limit }) if limit == levels - 1
                    ),
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn the_deepest_supported_limit_is_within_the_json_readers_reach() {
        let nested = |levels: usize| {
            format!(
                r#"{{"resourceType":"Basic","x":{}1{}}}"#,
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        let deepest = nested(MAX_SUPPORTED_JSON_DEPTH);
        let basic = ResourceType::parse("Basic").unwrap();
        assert!(ParsedResource::parse_bytes(deepest.as_bytes(), MAX_SUPPORTED_JSON_DEPTH).is_ok());
        assert!(
            ResourceFields::read(
                deepest.as_bytes(),
                basic,
                BodyId::Validate,
                MAX_SUPPORTED_JSON_DEPTH,
                &LocalBase::relative_only()
            )
            .is_ok()
        );
        let one_more = nested(MAX_SUPPORTED_JSON_DEPTH + 1);
        assert!(matches!(
            ParsedResource::parse_bytes(one_more.as_bytes(), MAX_SUPPORTED_JSON_DEPTH + 1),
            Err(ResourceBodyError::MalformedJson(_))
        ));
    }

    #[test]
    fn an_object_that_serde_json_takes_for_a_number_is_read_alike_by_both_paths() {
        let basic = ResourceType::parse("Basic").unwrap();
        let id = ResourceId::parse("b").unwrap();
        for member in [
            r#"{"$serde_json::private::Number":"1E5"}"#,
            r#"{"$serde_json::private::Number":"-0.50"}"#,
        ] {
            let text = format!(r#"{{"resourceType":"Basic","id":"b","x":{member}}}"#);
            let tree = parse(&text).unwrap();
            let from_tree = PreparedBody::new(basic, &id, tree.json);
            let (one_pass, _) = read_one_pass(&text, basic, BodyId::Validate)
                .unwrap()
                .into_prepared(&id);
            assert_eq!(one_pass, from_tree, "{text}");
        }
        let not_a_number = r#"{"resourceType":"Basic","x":{"$serde_json::private::Number":"x"}}"#;
        assert!(matches!(
            parse(not_a_number),
            Err(ResourceBodyError::MalformedJson(_))
        ));
        assert!(matches!(
            read_one_pass(not_a_number, basic, BodyId::Validate),
            Err(ResourceBodyError::MalformedJson(_))
        ));
    }

    fn read_one_pass(
        text: &str,
        expected_type: ResourceType,
        body_id: BodyId,
    ) -> Result<ResourceFields, ResourceBodyError> {
        ResourceFields::read(
            text.as_bytes(),
            expected_type,
            body_id,
            DEFAULT_MAX_JSON_DEPTH,
            &LocalBase::relative_only(),
        )
    }

    #[test]
    fn one_pass_reading_checks_the_type_last_and_can_ignore_the_body_id() {
        let observation = ResourceType::parse("Observation").unwrap();
        assert!(matches!(
            read_one_pass(
                r#"{"resourceType":"Observation","id":"a b"}"#,
                ResourceType::PATIENT,
                BodyId::Validate
            ),
            Err(ResourceBodyError::InvalidId(_))
        ));
        assert!(matches!(
            read_one_pass(
                r#"{"resourceType":"Observation","id":"o1"}"#,
                ResourceType::PATIENT,
                BodyId::Validate
            ),
            Err(ResourceBodyError::UnexpectedResourceType { expected, found })
                if expected == ResourceType::PATIENT && found == observation
        ));
        for ignored_id in [r#""a b""#, "7", "[1,{}]"] {
            let fields = read_one_pass(
                &format!(r#"{{"id":{ignored_id},"resourceType":"Observation"}}"#),
                observation,
                BodyId::Ignore,
            )
            .unwrap();
            assert_eq!(fields.id, None);
        }
        assert!(matches!(
            read_one_pass(
                r#"{"resourceType":"Observation","id":[1,}"#,
                observation,
                BodyId::Ignore
            ),
            Err(ResourceBodyError::MalformedJson(_))
        ));
    }

    #[test]
    fn one_pass_reading_writes_the_canonical_body_and_collects_compartment_patients() {
        let group = read_one_pass(
            r#"{"member":[{"entity":{"reference":"Patient/early"}}],"type":"person",
                "member":[{"entity":{"reference":"Patient/m2","display":"x"}},
                          {"entity":{"reference":"Practitioner/dr"}},
                          {"entity":{"reference":"Patient/m1","reference":"Patient/m3"}},
                          {"entity":{"reference":"Patient/m2"}}],
                "meta":{"versionId":"9","tag":[{"code":"b","system":"a"}],"lastUpdated":"x"},
                "resourceType":"Group","id":"g","actual":true,"quantity":1.50E+2}"#,
            ResourceType::GROUP,
            BodyId::Validate,
        )
        .unwrap();
        let id = group.id.clone().unwrap();
        let (body, patients) = group.into_prepared(&id);
        assert_eq!(
            body.finish(2, Instant::from_micros_since_epoch(0)),
            concat!(
                r#"{"resourceType":"Group","id":"g","meta":{"versionId":"2","#,
                r#""lastUpdated":"1970-01-01T00:00:00.000000Z","tag":[{"code":"b","system":"a"}]},"#,
                r#""actual":true,"member":[{"entity":{"display":"x","reference":"Patient/m2"}},"#,
                r#"{"entity":{"reference":"Practitioner/dr"}},{"entity":{"reference":"Patient/m3"}},"#,
                r#"{"entity":{"reference":"Patient/m2"}}],"quantity":1.50e+2,"type":"person"}"#
            )
        );
        assert_eq!(patients, vec!["m2", "m3"]);

        let patient = read_one_pass(
            r#"{"resourceType":"Patient","id":"ignored","link":[{"other":{"reference":"Patient/older"}},{"other":{"reference":"Patient/self"}}]}"#,
            ResourceType::PATIENT,
            BodyId::Ignore,
        )
        .unwrap();
        let (body, patients) = patient.into_prepared(&ResourceId::parse("self").unwrap());
        assert!(body.finish(1, Instant::from_micros_since_epoch(0)).starts_with(
            r#"{"resourceType":"Patient","id":"self","meta":{"versionId":"1","lastUpdated":"1970-01-01T00:00:00.000000Z"},"link":"#
        ));
        assert_eq!(patients, vec!["self", "older"]);
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
