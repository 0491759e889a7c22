//! Matching typed search values against the nodes a parameter's expression selects. Each
//! criterion holds one parameter's OR-list of values, parsed and folded once per query.

pub mod date;
pub mod prefilter;
pub mod prefix;
pub mod quantity;
pub mod reference;
pub mod string;
pub mod text;
pub mod token;
pub mod uri;

use crate::search::fhirpath::TypedNode;
use date::{DateRange, DateSearchValue};
use quantity::{NumberSearchValue, QuantitySearchValue};
use reference::ReferenceSearchValue;
use string::StringSearchValue;
use token::TokenSearchValue;
use uri::UriSearchValue;

use crate::fhir::{Instant, LocalBase};

/// What matching needs besides the values: the clock for `ap`, and this server's base, so
/// that `{base}/Patient/x` and `Patient/x` name the same resource.
pub struct MatchContext<'a> {
    pub now: Instant,
    pub local_base: &'a LocalBase,
}

/// What one clause asks of a resource: any of its values (comma = OR).
#[derive(Clone, Debug, PartialEq)]
pub enum Criterion {
    /// `:missing=true` (no value) or `:missing=false` (some value).
    Missing(bool),
    String(Vec<StringSearchValue>),
    Token(Vec<TokenSearchValue>),
    /// `:not`: no node carries any of the tokens.
    NotToken(Vec<TokenSearchValue>),
    /// `:text`: folded starts-with on the display texts.
    TokenText(Vec<String>),
    Reference(Vec<ReferenceSearchValue>),
    Date(Vec<DateSearchValue>),
    Number(Vec<NumberSearchValue>),
    Quantity(Vec<QuantitySearchValue>),
    Uri(Vec<UriSearchValue>),
}

impl Criterion {
    /// Whether the nodes one resource yields for the parameter satisfy this criterion, on a
    /// server whose base is unknown (only relative references are local); `now` anchors
    /// the `ap` prefix.
    pub fn matches(&self, nodes: &[TypedNode<'_>], now: Instant) -> bool {
        self.matches_in(
            nodes,
            &MatchContext {
                now,
                local_base: &LocalBase::relative_only(),
            },
        )
    }

    /// Whether the nodes one resource yields for the parameter satisfy this criterion.
    pub fn matches_in(&self, nodes: &[TypedNode<'_>], context: &MatchContext<'_>) -> bool {
        let now = context.now;
        let any = |test: &dyn Fn(&TypedNode<'_>) -> bool| nodes.iter().any(test);
        match self {
            Criterion::Missing(wanted_missing) => nodes.is_empty() == *wanted_missing,
            Criterion::String(values) => {
                any(&|node| values.iter().any(|value| value.matches_node(node)))
            }
            Criterion::Token(values) => {
                any(&|node| values.iter().any(|value| value.matches_node(node)))
            }
            Criterion::NotToken(values) => {
                !any(&|node| values.iter().any(|value| value.matches_node(node)))
            }
            Criterion::TokenText(folded) => any(&|node| {
                folded
                    .iter()
                    .any(|text| token::node_text_starts_with(node, text))
            }),
            Criterion::Reference(values) => any(&|node| {
                values
                    .iter()
                    .any(|value| value.matches_node(node, context.local_base))
            }),
            Criterion::Date(values) => any(&|node| {
                DateRange::of_node(node)
                    .is_some_and(|range| values.iter().any(|value| value.matches(range, now)))
            }),
            Criterion::Number(values) => {
                any(&|node| values.iter().any(|value| value.matches_node(node)))
            }
            Criterion::Quantity(values) => {
                any(&|node| values.iter().any(|value| value.matches_node(node)))
            }
            Criterion::Uri(values) => {
                any(&|node| values.iter().any(|value| value.matches_node(node)))
            }
        }
    }
}

#[cfg(test)]
mod tests;
