//! Reference search: `Type/id`, a bare `id` (any target type, or the `:Type` modifier's) and
//! absolute URLs, on Reference, canonical and uri elements. A relative value matches relative
//! references only; an absolute value matches the same absolute reference.

use serde_json::Value;

use crate::fhir::{LocalBase, ResourceType};
use crate::search::fhirpath::TypedNode;

/// One reference search value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceSearchValue {
    /// `Type/id`, or a bare id under the `:Type` modifier.
    Local {
        resource_type: ResourceType,
        id: String,
    },
    /// A bare id: any type the parameter may point to.
    AnyTypeId(String),
    /// An absolute URL (or any value with a scheme, e.g. `urn:uuid:…`), compared as written.
    Absolute(String),
}

impl ReferenceSearchValue {
    /// Reads a reference value; `type_modifier` is the `:Type` modifier's type. `None` when the
    /// text names a type that is not a resource type or is empty.
    pub fn parse(text: &str, type_modifier: Option<ResourceType>) -> Option<ReferenceSearchValue> {
        if text.is_empty() {
            return None;
        }
        if text.contains(':') {
            return Some(ReferenceSearchValue::Absolute(
                strip_history(text).to_owned(),
            ));
        }
        let text = strip_history(text);
        match (text.split_once('/'), type_modifier) {
            (None, Some(resource_type)) => Some(ReferenceSearchValue::Local {
                resource_type,
                id: text.to_owned(),
            }),
            (None, None) => Some(ReferenceSearchValue::AnyTypeId(text.to_owned())),
            (Some((type_name, id)), modifier) => {
                let resource_type = ResourceType::parse(type_name).ok()?;
                if id.is_empty()
                    || id.contains('/')
                    || modifier.is_some_and(|wanted| wanted != resource_type)
                {
                    return None;
                }
                Some(ReferenceSearchValue::Local {
                    resource_type,
                    id: id.to_owned(),
                })
            }
        }
    }

    /// Whether a node refers to what this value names; references (stored and searched)
    /// under `local_base` compare in their relative form.
    pub fn matches_node(&self, node: &TypedNode<'_>, local_base: &LocalBase) -> bool {
        let reference = match node.fhir_type {
            "Reference" => node.value.get("reference").and_then(Value::as_str),
            "canonical" | "uri" | "url" | "string" => node.value.as_str(),
            _ => None,
        };
        let Some(reference) = reference else {
            return false;
        };
        let reference = local_base.relative_form(strip_history(reference));
        match self {
            ReferenceSearchValue::Absolute(url) => reference == local_base.relative_form(url),
            ReferenceSearchValue::Local { resource_type, id } => reference
                .split_once('/')
                .is_some_and(|(type_name, reference_id)| {
                    type_name == resource_type.as_str() && reference_id == id
                }),
            ReferenceSearchValue::AnyTypeId(id) => {
                !reference.contains(':')
                    && reference
                        .split_once('/')
                        .is_some_and(|(type_name, reference_id)| {
                            reference_id == id && ResourceType::parse(type_name).is_ok()
                        })
            }
        }
    }
}

/// `Patient/1/_history/2` → `Patient/1`.
fn strip_history(reference: &str) -> &str {
    match reference.find("/_history/") {
        Some(index) => &reference[..index],
        None => reference,
    }
}
