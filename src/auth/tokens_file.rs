//! `--tokens FILE` for `--auth token`: one `TOKEN [expires=INSTANT] SCOPE…` per line, `#`
//! comments and blank lines allowed. Tokens are held only as digests.

use std::collections::HashMap;
use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::scopes::{ScopeError, ScopeSet};

/// Shortest accepted static token: shorter ones are too easy to guess.
pub const MIN_TOKEN_CHARS: usize = 16;
const EXPIRES_PREFIX: &str = "expires=";

/// One static token's grant.
#[derive(Debug, Clone)]
pub struct StaticGrant {
    /// Who owns the exports this token starts: `token:` and the start of the token's
    /// digest, so logs and the store never hold the token itself.
    pub client_id: String,
    pub scopes: ScopeSet,
    pub expires: Option<SystemTime>,
}

/// The tokens of a tokens file, by digest.
#[derive(Debug, Default)]
pub struct StaticTokens {
    by_digest: HashMap<[u8; 32], StaticGrant>,
}

/// Why a tokens file was refused; names the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokensFileError {
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("line {line}: {source}")]
    Scope { line: usize, source: ScopeError },
    #[error("no tokens in the file")]
    Empty,
}

/// The digest tokens are looked up by.
pub fn token_digest(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// RFC 6750 `b64token` characters.
pub fn is_bearer_token_text(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|byte| {
            byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

impl StaticTokens {
    pub fn parse(text: &str) -> Result<StaticTokens, TokensFileError> {
        let mut tokens = StaticTokens::default();
        for (index, raw_line) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw_line.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let refuse = |message: String| TokensFileError::Line { line, message };
            let mut fields = content.split_ascii_whitespace();
            let token = fields.next().unwrap_or_default();
            if token.chars().count() < MIN_TOKEN_CHARS || !is_bearer_token_text(token) {
                return Err(refuse(format!(
                    "a token must be at least {MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 - . _ ~ + /"
                )));
            }
            let mut expires = None;
            let mut scope_texts = Vec::new();
            for field in fields {
                match field.strip_prefix(EXPIRES_PREFIX) {
                    Some(instant) if expires.is_none() => {
                        let parsed = OffsetDateTime::parse(instant, &Rfc3339).map_err(|_| {
                            refuse(format!(
                                "'{instant}' is not an instant like 2030-01-31T00:00:00Z"
                            ))
                        })?;
                        expires = Some(SystemTime::from(parsed));
                    }
                    Some(_) => return Err(refuse("expires= is given twice".to_owned())),
                    None => scope_texts.push(field),
                }
            }
            let scopes = ScopeSet::parse_all(&scope_texts.join(" "))
                .map_err(|source| TokensFileError::Scope { line, source })?;
            if scopes.is_empty() {
                return Err(refuse("the token has no scope".to_owned()));
            }
            let digest = token_digest(token);
            let grant = StaticGrant {
                client_id: format!("token:{}", &blake3::Hash::from(digest).to_hex()[..16]),
                scopes,
                expires,
            };
            if tokens.by_digest.insert(digest, grant).is_some() {
                return Err(refuse("the same token is listed twice".to_owned()));
            }
        }
        if tokens.by_digest.is_empty() {
            return Err(TokensFileError::Empty);
        }
        Ok(tokens)
    }

    pub fn get(&self, token: &str) -> Option<&StaticGrant> {
        self.by_digest.get(&token_digest(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scopes::Access;
    use crate::fhir::ResourceType;

    #[test]
    fn lines_carry_a_token_an_optional_expiry_and_scopes() {
        let tokens = StaticTokens::parse(
            "# operators\n\nreader-0123456789abcdef system/*.read  # all reads\n\
             short-lived-0123456789 expires=2001-01-01T00:00:00Z system/Patient.rs system/Patient.cud\n",
        )
        .unwrap();
        let reader = tokens.get("reader-0123456789abcdef").unwrap();
        assert!(reader.scopes.permits(ResourceType::PATIENT, Access::Read));
        assert_eq!(reader.expires, None);
        assert!(reader.client_id.starts_with("token:"));
        assert!(!reader.client_id.contains("reader"));
        let short_lived = tokens.get("short-lived-0123456789").unwrap();
        assert!(short_lived.expires.unwrap() < SystemTime::now());
        assert!(
            short_lived
                .scopes
                .permits(ResourceType::PATIENT, Access::Delete)
        );
        assert!(tokens.get("reader-0123456789abcdeX").is_none());
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let line_of = |text: &str| match StaticTokens::parse(text) {
            Err(TokensFileError::Line { line, .. } | TokensFileError::Scope { line, .. }) => line,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(line_of("\nshort system/*.read"), 2);
        assert_eq!(line_of("a-long-enough-token-1"), 1);
        assert_eq!(line_of("a-long-enough-token-1 patient/*.read"), 1);
        assert_eq!(
            line_of("a-long-enough-token-1 system/Observation.rs?code=x"),
            1
        );
        assert_eq!(
            line_of("a-long-enough-token-1 expires=tomorrow system/*.read"),
            1
        );
        assert_eq!(
            line_of("a-long-enough-token-1 system/*.read\na-long-enough-token-1 system/*.rs"),
            2
        );
        assert_eq!(line_of("bad\"token-0123456789 system/*.read"), 1);
        assert_eq!(
            StaticTokens::parse("# nothing\n").unwrap_err(),
            TokensFileError::Empty
        );
    }
}
