//! Token search: `code`, `system|code`, `|code` and `system|` on Coding, CodeableConcept,
//! Identifier, ContactPoint and plain code, string, id, uri and boolean elements. Codes and
//! systems compare exactly.

use serde_json::Value;

use super::text::folded_starts_with;
use crate::search::fhirpath::TypedNode;

/// Which system a token value asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSystem {
    /// `code`: any system or none.
    Any,
    /// `|code`: no system.
    Absent,
    /// `system|code` or `system|`.
    Exactly(String),
}

/// One token search value; `code` is `None` for `system|`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSearchValue {
    pub system: TokenSystem,
    pub code: Option<String>,
}

impl TokenSearchValue {
    /// Reads `code`, `system|code`, `|code` or `system|`; `\|` is a literal bar.
    pub fn parse(text: &str) -> TokenSearchValue {
        match split_unescaped_bar(text) {
            None => TokenSearchValue {
                system: TokenSystem::Any,
                code: Some(unescape_bar(text)),
            },
            Some((system, code)) => TokenSearchValue {
                system: if system.is_empty() {
                    TokenSystem::Absent
                } else {
                    TokenSystem::Exactly(unescape_bar(system))
                },
                code: (!code.is_empty()).then(|| unescape_bar(code)),
            },
        }
    }

    fn matches_pair(&self, system: Option<&str>, code: Option<&str>) -> bool {
        let system_matches = match &self.system {
            TokenSystem::Any => true,
            TokenSystem::Absent => system.is_none(),
            TokenSystem::Exactly(wanted) => system == Some(wanted.as_str()),
        };
        system_matches
            && match &self.code {
                None => true,
                Some(wanted) => code == Some(wanted.as_str()),
            }
    }

    /// Whether a node carries this token.
    pub fn matches_node(&self, node: &TypedNode<'_>) -> bool {
        let value = node.value;
        let field = |name: &str| value.get(name).and_then(Value::as_str);
        match node.fhir_type {
            "Coding" => self.matches_pair(field("system"), field("code")),
            "CodeableConcept" => {
                value
                    .get("coding")
                    .and_then(Value::as_array)
                    .is_some_and(|codings| {
                        codings.iter().any(|coding| {
                            let field = |name: &str| coding.get(name).and_then(Value::as_str);
                            self.matches_pair(field("system"), field("code"))
                        })
                    })
            }
            "Identifier" => self.matches_pair(field("system"), field("value")),
            "ContactPoint" => self.matches_pair(None, field("value")),
            "boolean" => {
                let text = value
                    .as_bool()
                    .map(|flag| if flag { "true" } else { "false" });
                self.matches_pair(None, text)
            }
            _ => self.matches_pair(None, value.as_str()),
        }
    }
}

/// Whether a node's display text (CodeableConcept.text, Coding.display, Identifier.type.text)
/// starts with `folded_text` under case and accent folding: the `:text` modifier.
pub fn node_text_starts_with(node: &TypedNode<'_>, folded_text: &str) -> bool {
    let value = node.value;
    let text_of = |value: &Value, name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .is_some_and(|text| folded_starts_with(text, folded_text))
    };
    let any_display = |value: &Value| {
        value
            .get("coding")
            .and_then(Value::as_array)
            .is_some_and(|codings| codings.iter().any(|coding| text_of(coding, "display")))
    };
    match node.fhir_type {
        "CodeableConcept" => text_of(value, "text") || any_display(value),
        "Coding" => text_of(value, "display"),
        "Identifier" => value
            .get("type")
            .is_some_and(|kind| text_of(kind, "text") || any_display(kind)),
        _ => false,
    }
}

fn split_unescaped_bar(text: &str) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    (0..bytes.len())
        .find(|&index| bytes[index] == b'|' && (index == 0 || bytes[index - 1] != b'\\'))
        .map(|index| (&text[..index], &text[index + 1..]))
}

fn unescape_bar(text: &str) -> String {
    text.replace("\\|", "|")
}
