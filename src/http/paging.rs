//! Paging of search and history Bundles over one fixed snapshot: the first page fixes the
//! store's newest seq, and every `self`/`next` link carries it (`_snapshot`) with a
//! position (`_cursor`), so later writes neither show up in nor shift later pages.

use super::ApiError;
use crate::fhir::Instant;
use crate::store::Store;

/// `_count` when none is given.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page served; a larger `_count` is clamped to it (the server may return
/// fewer than asked, FHIR R4 search §3.1.1.5.5).
pub const MAX_PAGE_SIZE: usize = 1000;
pub const SNAPSHOT_PARAMETER: &str = "_snapshot";
pub const CURSOR_PARAMETER: &str = "_cursor";

/// Why a search or history request is refused (400); each names the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PagingError {
    #[error("_count '{0}' is not a non-negative integer")]
    InvalidCount(String),
    #[error("{parameter} '{value}' is not a paging position this server wrote")]
    InvalidPosition {
        parameter: &'static str,
        value: String,
    },
    #[error("_snapshot {0} lies beyond the store's newest change; use the links of a Bundle")]
    SnapshotAhead(u64),
    #[error("{0} is given more than once")]
    Repeated(String),
    #[error("_summary '{0}' is not supported; use count or false")]
    UnsupportedSummary(String),
    #[error("_since '{0}' is not a FHIR instant")]
    InvalidSince(String),
    #[error("'{0}' is not a parameter of history; use _count or _since")]
    UnknownHistoryParameter(String),
}

/// The paging parameters of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub count: usize,
    /// The snapshot a link carries; `None` on a first page.
    pub snapshot_seq: Option<u64>,
    /// Where the previous page ended (its meaning belongs to the endpoint).
    pub cursor: Option<u64>,
}

impl Paging {
    /// Takes `_count`, `_snapshot` and `_cursor` out of `pairs`.
    pub fn take_from(pairs: &mut Vec<(String, String)>) -> Result<Paging, PagingError> {
        let count = take_single(pairs, "_count")?
            .map(|value| {
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| PagingError::InvalidCount(value.clone()))
            })
            .transpose()?
            .map_or(DEFAULT_PAGE_SIZE, |count| count.min(MAX_PAGE_SIZE));
        let position = |parameter: &'static str, value: String| {
            value
                .parse::<u64>()
                .map_err(|_| PagingError::InvalidPosition { parameter, value })
        };
        let snapshot_seq = take_single(pairs, SNAPSHOT_PARAMETER)?
            .map(|value| position(SNAPSHOT_PARAMETER, value))
            .transpose()?;
        let cursor = take_single(pairs, CURSOR_PARAMETER)?
            .map(|value| position(CURSOR_PARAMETER, value))
            .transpose()?;
        if cursor.is_some() && snapshot_seq.is_none() {
            return Err(PagingError::InvalidPosition {
                parameter: CURSOR_PARAMETER,
                value: "(without _snapshot)".to_owned(),
            });
        }
        Ok(Paging {
            count,
            snapshot_seq,
            cursor,
        })
    }
}

/// Removes every `name` from `pairs`, refusing it twice.
pub fn take_single(
    pairs: &mut Vec<(String, String)>,
    name: &str,
) -> Result<Option<String>, PagingError> {
    let mut found = None;
    let mut repeated = false;
    pairs.retain(|(pair_name, value)| {
        if pair_name != name {
            return true;
        }
        repeated |= found.replace(value.clone()).is_some();
        false
    });
    if repeated {
        return Err(PagingError::Repeated(name.to_owned()));
    }
    Ok(found)
}

/// The snapshot a page reads: the one its link carries (refused beyond the store's newest
/// seq, which no link of ours carries), or the store's newest seq on a first page.
pub fn resolve_snapshot(store: &Store, paging: &Paging) -> Result<u64, ApiError> {
    let newest = store.high_water_seq()?;
    match paging.snapshot_seq {
        Some(carried) if carried > newest => Err(PagingError::SnapshotAhead(carried).into()),
        Some(carried) => Ok(carried),
        None => Ok(newest),
    }
}

/// Parses `_since` for history.
pub fn parse_since(value: &str) -> Result<Instant, PagingError> {
    Instant::parse(value).map_err(|_| PagingError::InvalidSince(value.to_owned()))
}

/// `url?name=value&…` with paging parameters appended; names and values are
/// percent-encoded so that splitting on `&` and `=` and decoding gives them back.
pub fn page_url(
    url: &str,
    pairs: &[(String, String)],
    count: usize,
    snapshot_seq: u64,
    cursor: Option<u64>,
) -> String {
    let mut query: Vec<String> = pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode_component(name), encode_component(value)))
        .collect();
    query.push(format!("_count={count}"));
    query.push(format!("{SNAPSHOT_PARAMETER}={snapshot_seq}"));
    if let Some(cursor) = cursor {
        query.push(format!("{CURSOR_PARAMETER}={cursor}"));
    }
    format!("{url}?{}", query.join("&"))
}

/// Percent-encodes all but unreserved characters and the readable `,:|/`.
fn encode_component(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~,:|/".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn count_defaults_clamps_and_refuses_garbage() {
        assert_eq!(
            Paging::take_from(&mut pairs("")).unwrap().count,
            DEFAULT_PAGE_SIZE
        );
        assert_eq!(
            Paging::take_from(&mut pairs("_count=5000")).unwrap().count,
            MAX_PAGE_SIZE
        );
        let mut with_others = pairs("family=x&_count=7&_snapshot=9&_cursor=3");
        let paging = Paging::take_from(&mut with_others).unwrap();
        assert_eq!(
            (paging.count, paging.snapshot_seq, paging.cursor),
            (7, Some(9), Some(3))
        );
        assert_eq!(with_others, pairs("family=x"));
        for bad in [
            "_count=-1",
            "_count=ten",
            "_count=1&_count=2",
            "_snapshot=x",
            "_cursor=4",
        ] {
            let error = Paging::take_from(&mut pairs(bad)).unwrap_err().to_string();
            let name = bad.split('=').next().unwrap();
            assert!(error.contains(name), "{bad}: {error}");
        }
    }

    #[test]
    fn links_encode_what_splitting_decodes() {
        let url = page_url(
            "http://h/fhir/Patient",
            &[("family".to_owned(), "van Dyke&Co=1%".to_owned())],
            10,
            42,
            Some(7),
        );
        assert_eq!(
            url,
            "http://h/fhir/Patient?family=van%20Dyke%26Co%3D1%25&_count=10&_snapshot=42&_cursor=7"
        );
    }
}
