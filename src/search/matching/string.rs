//! String search on string and markdown elements and the text parts of HumanName and Address.

use serde_json::Value;

use super::text::{fold, folded_contains, folded_starts_with};
use crate::search::fhirpath::TypedNode;

/// How a string value compares: the default starts-with, `:exact` or `:contains`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringMatch {
    StartsWith,
    Exact,
    Contains,
}

/// One string search value, folded once unless it compares exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StringSearchValue {
    pub mode: StringMatch,
    /// The value as written (exact) or folded (starts-with, contains).
    pub compared: String,
}

const HUMAN_NAME_PARTS: [&str; 5] = ["family", "given", "prefix", "suffix", "text"];
const ADDRESS_PARTS: [&str; 7] = [
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
    "text",
];

impl StringSearchValue {
    pub fn new(mode: StringMatch, text: &str) -> StringSearchValue {
        let compared = match mode {
            StringMatch::Exact => text.to_owned(),
            StringMatch::StartsWith | StringMatch::Contains => fold(text),
        };
        StringSearchValue { mode, compared }
    }

    fn matches_text(&self, text: &str) -> bool {
        match self.mode {
            StringMatch::Exact => text == self.compared,
            StringMatch::StartsWith => folded_starts_with(text, &self.compared),
            StringMatch::Contains => folded_contains(text, &self.compared),
        }
    }

    fn matches_parts(&self, value: &Value, parts: &[&str]) -> bool {
        parts.iter().any(|part| match value.get(part) {
            Some(Value::String(text)) => self.matches_text(text),
            Some(Value::Array(items)) => items
                .iter()
                .any(|item| item.as_str().is_some_and(|text| self.matches_text(text))),
            _ => false,
        })
    }

    pub fn matches_node(&self, node: &TypedNode<'_>) -> bool {
        match node.fhir_type {
            "HumanName" => self.matches_parts(node.value, &HUMAN_NAME_PARTS),
            "Address" => self.matches_parts(node.value, &ADDRESS_PARTS),
            _ => node
                .value
                .as_str()
                .is_some_and(|text| self.matches_text(text)),
        }
    }
}
