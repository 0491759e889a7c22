//! A test on a stored body's raw JSON bytes that rules out resources a criterion cannot
//! match, so that a scan parses only bodies that might. It may let a non-match through; it
//! never rejects a match.
//!
//! Soundness rests on two facts about JSON. Without a `\u` escape in the body, a character
//! other than `"`, `\`, `/` and control characters appears in a decoded string exactly as in
//! the raw bytes. And a body that is pure ASCII folds (case and accents) to its ASCII
//! lowercase form, so a folded needle is found by an ASCII-caseless search.

use std::cell::OnceCell;

use memchr::memmem;

use super::Criterion;
use super::reference::ReferenceSearchValue;
use super::string::{StringMatch, StringSearchValue};
use super::token::{TokenSearchValue, TokenSystem};

/// Bytes a decoded string of the body must contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyNeedle {
    /// Compared byte for byte.
    Exact(Vec<u8>),
    /// Already folded to ASCII lowercase; compared ignoring ASCII case, on ASCII bodies only.
    AsciiCaseless(Vec<u8>),
}

/// What a criterion needs of a raw body: one of `needles` (an OR-list). `None` from
/// [`BodyRequirement::of_criterion`] means the criterion needs nothing checkable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyRequirement {
    needles: Vec<BodyNeedle>,
}

/// Facts about one raw body, computed on first need and once however many requirements
/// test it (a query with no checkable requirement costs nothing).
pub struct RawBody<'a> {
    bytes: &'a [u8],
    has_unicode_escape: OnceCell<bool>,
    is_ascii: OnceCell<bool>,
}

impl<'a> RawBody<'a> {
    pub fn new(bytes: &'a [u8]) -> RawBody<'a> {
        RawBody {
            bytes,
            has_unicode_escape: OnceCell::new(),
            is_ascii: OnceCell::new(),
        }
    }

    fn has_unicode_escape(&self) -> bool {
        *self
            .has_unicode_escape
            .get_or_init(|| memmem::find(self.bytes, b"\\u").is_some())
    }

    fn is_ascii(&self) -> bool {
        *self.is_ascii.get_or_init(|| self.bytes.is_ascii())
    }
}

impl BodyRequirement {
    /// The needles that every match of `criterion` contains, when each of its OR-values
    /// yields one.
    pub fn of_criterion(criterion: &Criterion) -> Option<BodyRequirement> {
        let needles: Vec<BodyNeedle> = match criterion {
            Criterion::String(values) => values.iter().map(string_needle).collect(),
            Criterion::Token(values) => values.iter().map(token_needle).collect(),
            Criterion::Reference(values) => values.iter().map(reference_needle).collect(),
            Criterion::Missing(_)
            | Criterion::NotToken(_)
            | Criterion::TokenText(_)
            | Criterion::Date(_)
            | Criterion::Number(_)
            | Criterion::Quantity(_)
            | Criterion::Uri(_) => None,
        }?;
        (!needles.is_empty()).then_some(BodyRequirement { needles })
    }

    /// False only when no decoded string of `body` can hold any needle.
    pub fn may_hold(&self, body: &RawBody<'_>) -> bool {
        if body.has_unicode_escape() {
            return true;
        }
        self.needles.iter().any(|needle| match needle {
            BodyNeedle::Exact(bytes) => memmem::find(body.bytes, bytes).is_some(),
            BodyNeedle::AsciiCaseless(folded) => {
                !body.is_ascii() || contains_ignoring_ascii_case(body.bytes, folded)
            }
        })
    }
}

/// Whether a needle of these bytes survives raw JSON unchanged (see the module docs).
fn is_plain(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte != b'"' && byte != b'\\' && byte != b'/' && byte >= 0x20)
}

fn exact_needle(text: &str) -> Option<BodyNeedle> {
    is_plain(text).then(|| BodyNeedle::Exact(text.as_bytes().to_vec()))
}

fn string_needle(value: &StringSearchValue) -> Option<BodyNeedle> {
    match value.mode {
        StringMatch::Exact => exact_needle(&value.compared),
        StringMatch::StartsWith | StringMatch::Contains => (value.compared.is_ascii()
            && is_plain(&value.compared))
        .then(|| BodyNeedle::AsciiCaseless(value.compared.as_bytes().to_vec())),
    }
}

fn token_needle(value: &TokenSearchValue) -> Option<BodyNeedle> {
    match (&value.code, &value.system) {
        (Some(code), _) => exact_needle(code),
        (None, TokenSystem::Exactly(system)) => exact_needle(system),
        (None, TokenSystem::Any | TokenSystem::Absent) => None,
    }
}

fn reference_needle(value: &ReferenceSearchValue) -> Option<BodyNeedle> {
    match value {
        ReferenceSearchValue::Local { id, .. } | ReferenceSearchValue::AnyTypeId(id) => {
            exact_needle(id)
        }
        ReferenceSearchValue::Absolute(_) => None,
    }
}

/// `folded` is ASCII lowercase.
fn contains_ignoring_ascii_case(haystack: &[u8], folded: &[u8]) -> bool {
    let Some((&first, rest)) = folded.split_first() else {
        return true;
    };
    let mut start = 0;
    while let Some(offset) = memchr::memchr2(first, first.to_ascii_uppercase(), &haystack[start..])
    {
        let at = start + offset;
        let candidate = &haystack[at + 1..];
        if candidate.len() >= rest.len() && candidate[..rest.len()].eq_ignore_ascii_case(rest) {
            return true;
        }
        start = at + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::RawBody;
    use crate::fhir::ResourceType;
    use crate::search::query::SearchQuery;

    fn passes(query: &str, body: &str) -> bool {
        SearchQuery::parse(ResourceType::parse("Observation").unwrap(), query)
            .unwrap()
            .may_match_body(&RawBody::new(body.as_bytes()))
    }

    const LAB_HEIGHT: &str = r#"{"resourceType":"Observation","category":[{"coding":[{"code":"laboratory"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8302-2"}]},"subject":{"reference":"Patient/p1"}}"#;

    #[test]
    fn bodies_without_the_searched_text_are_rejected_unparsed() {
        assert!(passes("code=http://loinc.org|8302-2", LAB_HEIGHT));
        assert!(!passes("code=http://loinc.org|2345-7", LAB_HEIGHT));
        assert!(passes("category=laboratory&date=ge2015", LAB_HEIGHT));
        assert!(!passes("category=vital-signs&date=ge2015", LAB_HEIGHT));
        assert!(passes("code=2345-7,8302-2", LAB_HEIGHT), "comma ORs");
        assert!(
            !passes("code=8302-2&subject=Patient/p2", LAB_HEIGHT),
            "& ANDs"
        );
        assert!(passes("subject=p1", LAB_HEIGHT));
    }

    #[test]
    fn string_search_folds_case_on_ascii_bodies_and_leaves_accented_ones_to_the_parser() {
        let patient = |family: &str| {
            SearchQuery::parse(ResourceType::PATIENT, "family=SMITH")
                .unwrap()
                .may_match_body(&RawBody::new(
                    format!(r#"{{"resourceType":"Patient","name":[{{"family":"{family}"}}]}}"#)
                        .as_bytes(),
                ))
        };
        assert!(patient("Smith"));
        assert!(patient("smithson"));
        assert!(!patient("Jones"));
        assert!(patient("Smíth"));
    }

    #[test]
    fn what_the_raw_bytes_cannot_decide_passes() {
        assert!(passes("date=ge2015", LAB_HEIGHT));
        assert!(passes("code:not=8302-2", LAB_HEIGHT));
        assert!(passes("code=http://loinc.org|", LAB_HEIGHT));
        let escaped = LAB_HEIGHT.replace("8302-2", "\\u0038302-2");
        assert!(passes("code=8302-2", &escaped));
    }
}
