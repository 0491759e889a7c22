//! Uri search: exact by default; `:below` matches URIs that start with the value, `:above`
//! URIs the value starts with.

use crate::search::fhirpath::TypedNode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UriMatch {
    Exact,
    Below,
    Above,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UriSearchValue {
    pub mode: UriMatch,
    pub uri: String,
}

impl UriSearchValue {
    pub fn matches_node(&self, node: &TypedNode<'_>) -> bool {
        let Some(text) = node.value.as_str() else {
            return false;
        };
        match self.mode {
            UriMatch::Exact => text == self.uri,
            UriMatch::Below => text.starts_with(&self.uri),
            UriMatch::Above => !text.is_empty() && self.uri.starts_with(text),
        }
    }
}
