//! Typed search queries: a query string split and percent-decoded into pairs, then each pair
//! parsed against the registry into a clause (parameter, modifier, OR-list of typed values).
//! Repeated parameters are separate clauses and all must hold (AND).

use percent_encoding::percent_decode_str;
use serde_json::Value;

use super::fhirpath::CompiledFhirPath;
use super::matching::date::{DateRange, DateSearchValue};
use super::matching::prefilter::{BodyRequirement, RawBody};
use super::matching::prefix::Prefix;
use super::matching::quantity::{NumberSearchValue, QuantitySearchValue};
use super::matching::reference::ReferenceSearchValue;
use super::matching::string::{StringMatch, StringSearchValue};
use super::matching::text::fold;
use super::matching::token::TokenSearchValue;
use super::matching::uri::{UriMatch, UriSearchValue};
use super::matching::{Criterion, MatchContext};
use super::registry::{
    ParameterLookup, SearchParameter, SearchParameterRegistry, SearchParameterType,
};
use crate::fhir::{Instant, LocalBase, ResourceType};

/// Parameters that shape results rather than select resources; this boundary refuses them
/// (the search API handles the ones it supports before parsing the rest).
const RESULT_PARAMETERS: [&str; 12] = [
    "_sort",
    "_include",
    "_revinclude",
    "_count",
    "_summary",
    "_elements",
    "_total",
    "_contained",
    "_containedType",
    "_score",
    "_format",
    "_pretty",
];

/// Special search parameters with no expression to evaluate.
const SPECIAL_PARAMETERS: [&str; 6] = ["_has", "_list", "_filter", "_query", "_text", "_content"];

/// Why a query string cannot be searched with; every variant names the parameter or text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchQueryError {
    #[error("'{fragment}' in the query is not percent-encoded UTF-8")]
    InvalidEncoding { fragment: String },
    #[error("'{parameter}' is a result parameter, which is not supported here")]
    ResultParameter { parameter: String },
    #[error("search parameter '{parameter}' is not supported: {reason}")]
    UnsupportedParameter { parameter: String, reason: String },
    #[error("'{parameter}' is not a search parameter of {resource_type}")]
    UnknownParameter {
        resource_type: ResourceType,
        parameter: String,
    },
    #[error(
        "modifier ':{modifier}' is not supported on the {parameter_type} parameter '{parameter}'"
    )]
    UnsupportedModifier {
        parameter: String,
        modifier: String,
        parameter_type: SearchParameterType,
    },
    #[error("'{value}' is not a valid value for '{parameter}': {expected}")]
    MalformedValue {
        parameter: String,
        value: String,
        expected: String,
    },
}

/// Splits a query string on `&` and `=` first, then percent-decodes each name and value, so an
/// encoded comma (`%2C`) still separates OR values. A leading `?` is skipped; empty segments
/// are dropped; a name without `=` has an empty value.
pub fn split_query(raw: &str) -> Result<Vec<(String, String)>, SearchQueryError> {
    let decode = |fragment: &str| {
        percent_decode_str(fragment)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| SearchQueryError::InvalidEncoding {
                fragment: fragment.chars().take(120).collect(),
            })
    };
    raw.strip_prefix('?')
        .unwrap_or(raw)
        .split('&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let (name, value) = segment.split_once('=').unwrap_or((segment, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// A modifier as written after `name:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SearchModifier {
    Missing,
    Exact,
    Contains,
    Not,
    Text,
    Below,
    Above,
    ResourceType(ResourceType),
}

/// One parameter of a query with its OR-list of values.
#[derive(Debug)]
pub struct SearchClause {
    parameter: &'static SearchParameter,
    expression: &'static CompiledFhirPath,
    modifier: Option<SearchModifier>,
    values: Vec<String>,
    criterion: Criterion,
}

impl SearchClause {
    /// The parameter's code, e.g. `patient` or `_lastUpdated`.
    pub fn code(&self) -> &'static str {
        self.parameter.code
    }

    pub fn parameter(&self) -> &'static SearchParameter {
        self.parameter
    }

    pub fn modifier(&self) -> Option<&SearchModifier> {
        self.modifier.as_ref()
    }

    /// The decoded values of the OR-list, unescaped, as written.
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// The typed values the clause tests.
    pub fn criterion(&self) -> &Criterion {
        &self.criterion
    }

    fn matches(&self, resource: &Value, context: &MatchContext<'_>) -> bool {
        let nodes = self.expression.evaluate(resource);
        self.criterion.matches_in(&nodes, context)
    }
}

/// A parsed search over one resource type: every clause must hold.
#[derive(Debug)]
pub struct SearchQuery {
    resource_type: ResourceType,
    clauses: Vec<SearchClause>,
    /// What the clauses need of a raw body, for those that need something checkable.
    body_requirements: Vec<BodyRequirement>,
    now: Instant,
    local_base: LocalBase,
}

impl SearchQuery {
    /// Parses decoded `(name, value)` pairs (from [`split_query`]) for `resource_type`.
    pub fn from_pairs(
        resource_type: ResourceType,
        pairs: &[(String, String)],
    ) -> Result<SearchQuery, SearchQueryError> {
        let clauses: Vec<SearchClause> = pairs
            .iter()
            .map(|(name, value)| parse_clause(resource_type, name, value))
            .collect::<Result<_, _>>()?;
        let body_requirements = clauses
            .iter()
            .filter_map(|clause| BodyRequirement::of_criterion(&clause.criterion))
            .collect();
        Ok(SearchQuery {
            resource_type,
            clauses,
            body_requirements,
            now: Instant::now(),
            local_base: LocalBase::relative_only(),
        })
    }

    /// Splits and parses a raw query string such as `category=laboratory&date=ge2020`.
    pub fn parse(resource_type: ResourceType, raw: &str) -> Result<SearchQuery, SearchQueryError> {
        SearchQuery::from_pairs(resource_type, &split_query(raw)?)
    }

    /// The query as run on the server at `local_base`: absolute references under it match
    /// their relative form (without, only relative references are local).
    pub fn on_local_base(mut self, local_base: LocalBase) -> SearchQuery {
        self.local_base = local_base;
        self
    }

    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    pub fn clauses(&self) -> &[SearchClause] {
        &self.clauses
    }

    /// False only when the stored body cannot satisfy the query, judged from its raw bytes
    /// without parsing: a cheap test before [`SearchQuery::matches`].
    pub fn may_match_body(&self, body: &RawBody<'_>) -> bool {
        self.body_requirements
            .iter()
            .all(|requirement| requirement.may_hold(body))
    }

    /// Whether `resource` (of this query's type) satisfies every clause.
    pub fn matches(&self, resource: &Value) -> bool {
        let context = MatchContext {
            now: self.now,
            local_base: &self.local_base,
        };
        self.clauses
            .iter()
            .all(|clause| clause.matches(resource, &context))
    }
}

/// Splits on commas not escaped as `\,`, unescaping them.
fn split_or_values(value: &str) -> Vec<String> {
    let mut values = Vec::new();
    let mut current = String::new();
    let mut characters = value.chars().peekable();
    while let Some(character) = characters.next() {
        match character {
            '\\' if characters.peek() == Some(&',') => {
                current.push(',');
                characters.next();
            }
            ',' => values.push(std::mem::take(&mut current)),
            other => current.push(other),
        }
    }
    values.push(current);
    values
}

fn parse_clause(
    resource_type: ResourceType,
    name: &str,
    value: &str,
) -> Result<SearchClause, SearchQueryError> {
    let (code, modifier_text) = match name.split_once(':') {
        Some((code, modifier)) => (code, Some(modifier)),
        None => (name, None),
    };
    if RESULT_PARAMETERS.contains(&code) {
        return Err(SearchQueryError::ResultParameter {
            parameter: name.to_owned(),
        });
    }
    let unsupported = |reason: &str| SearchQueryError::UnsupportedParameter {
        parameter: name.to_owned(),
        reason: reason.to_owned(),
    };
    if SPECIAL_PARAMETERS.contains(&code) {
        return Err(unsupported("special parameters are not supported"));
    }
    if code.contains('.') {
        return Err(unsupported("chained parameters are not supported"));
    }
    let parameter = match SearchParameterRegistry::r4().lookup(resource_type, code) {
        ParameterLookup::Supported(parameter) => parameter,
        ParameterLookup::Unsupported(known) => {
            return Err(unsupported(&format!(
                "{} parameters are not supported",
                known.type_code
            )));
        }
        ParameterLookup::Unknown => {
            return Err(SearchQueryError::UnknownParameter {
                resource_type,
                parameter: name.to_owned(),
            });
        }
    };
    let modifier = modifier_text
        .map(|text| parse_modifier(parameter, name, text))
        .transpose()?;
    let values = split_or_values(value);
    let malformed = |value: &str, expected: &str| SearchQueryError::MalformedValue {
        parameter: name.to_owned(),
        value: value.to_owned(),
        expected: expected.to_owned(),
    };
    if let Some(empty) = values.iter().find(|value| value.is_empty()) {
        return Err(malformed(empty, "a non-empty value"));
    }
    let criterion = typed_criterion(parameter, modifier.as_ref(), &values, &malformed)?;
    let expression = parameter.compiled().map_err(|problem| {
        unsupported(&format!(
            "its expression is outside the supported FHIRPath subset ({problem})"
        ))
    })?;
    Ok(SearchClause {
        parameter,
        expression,
        modifier,
        values,
        criterion,
    })
}

fn parse_modifier(
    parameter: &SearchParameter,
    name: &str,
    text: &str,
) -> Result<SearchModifier, SearchQueryError> {
    let modifier = match (parameter.parameter_type, text) {
        (_, "missing") => Some(SearchModifier::Missing),
        (SearchParameterType::String, "exact") => Some(SearchModifier::Exact),
        (SearchParameterType::String, "contains") => Some(SearchModifier::Contains),
        (SearchParameterType::Token, "not") => Some(SearchModifier::Not),
        (SearchParameterType::Token, "text") => Some(SearchModifier::Text),
        (SearchParameterType::Uri, "below") => Some(SearchModifier::Below),
        (SearchParameterType::Uri, "above") => Some(SearchModifier::Above),
        (SearchParameterType::Reference, type_name) => ResourceType::parse(type_name)
            .ok()
            .filter(|target| parameter.targets.is_empty() || parameter.targets.contains(target))
            .map(SearchModifier::ResourceType),
        _ => None,
    };
    modifier.ok_or_else(|| SearchQueryError::UnsupportedModifier {
        parameter: name.split(':').next().unwrap_or(name).to_owned(),
        modifier: text.to_owned(),
        parameter_type: parameter.parameter_type,
    })
}

fn typed_criterion(
    parameter: &SearchParameter,
    modifier: Option<&SearchModifier>,
    values: &[String],
    malformed: &dyn Fn(&str, &str) -> SearchQueryError,
) -> Result<Criterion, SearchQueryError> {
    Ok(match (parameter.parameter_type, modifier) {
        (_, Some(SearchModifier::Missing)) => match values {
            [single] if single == "true" => Criterion::Missing(true),
            [single] if single == "false" => Criterion::Missing(false),
            _ => return Err(malformed(&values.join(","), "true or false")),
        },
        (SearchParameterType::String, modifier) => {
            let mode = match modifier {
                Some(SearchModifier::Exact) => StringMatch::Exact,
                Some(SearchModifier::Contains) => StringMatch::Contains,
                _ => StringMatch::StartsWith,
            };
            Criterion::String(
                values
                    .iter()
                    .map(|value| StringSearchValue::new(mode, value))
                    .collect(),
            )
        }
        (SearchParameterType::Token, Some(SearchModifier::Text)) => {
            Criterion::TokenText(values.iter().map(|value| fold(value)).collect())
        }
        (SearchParameterType::Token, modifier) => {
            let tokens = values
                .iter()
                .map(|value| TokenSearchValue::parse(value))
                .collect();
            if modifier == Some(&SearchModifier::Not) {
                Criterion::NotToken(tokens)
            } else {
                Criterion::Token(tokens)
            }
        }
        (SearchParameterType::Reference, modifier) => {
            let type_modifier = match modifier {
                Some(SearchModifier::ResourceType(resource_type)) => Some(*resource_type),
                _ => None,
            };
            Criterion::Reference(each(values, |value| {
                ReferenceSearchValue::parse(value, type_modifier)
                    .ok_or_else(|| malformed(value, "Type/id, an id or an absolute URL"))
            })?)
        }
        (SearchParameterType::Date, _) => Criterion::Date(each(values, |value| {
            let (prefix, date) = Prefix::split(value)
                .ok_or_else(|| malformed(value, "a prefix among eq ne gt lt ge le sa eb ap"))?;
            let range =
                DateRange::parse(date).map_err(|problem| malformed(value, &problem.to_string()))?;
            Ok(DateSearchValue { prefix, range })
        })?),
        (SearchParameterType::Number, _) => Criterion::Number(each(values, |value| {
            NumberSearchValue::parse(value)
                .map_err(|problem| malformed(value, &problem.to_string()))
        })?),
        (SearchParameterType::Quantity, _) => Criterion::Quantity(each(values, |value| {
            QuantitySearchValue::parse(value).map_err(|problem| {
                malformed(value, &format!("{problem}, then |system|code or ||code"))
            })
        })?),
        (SearchParameterType::Uri, modifier) => {
            let mode = match modifier {
                Some(SearchModifier::Below) => UriMatch::Below,
                Some(SearchModifier::Above) => UriMatch::Above,
                _ => UriMatch::Exact,
            };
            Criterion::Uri(
                values
                    .iter()
                    .map(|value| UriSearchValue {
                        mode,
                        uri: value.clone(),
                    })
                    .collect(),
            )
        }
    })
}

fn each<T>(
    values: &[String],
    parse: impl Fn(&str) -> Result<T, SearchQueryError>,
) -> Result<Vec<T>, SearchQueryError> {
    values.iter().map(|value| parse(value)).collect()
}

#[cfg(test)]
mod tests;
