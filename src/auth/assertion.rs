//! Verifying a `private_key_jwt` client assertion (SMART Backend Services, RFC 7523):
//! the registered key named by `kid` with the algorithm that key fixes, `iss` = `sub` = a
//! registered client, `aud` = the token endpoint, `exp` in the future and at most five
//! minutes ahead, and a `jti` not seen before within its lifetime.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::dangerous::insecure_decode_claims;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Validation, decode, decode_header};
use serde::Deserialize;

use super::clients::{ClientRegistry, RegisteredClient};
use super::expiring::ExpiringMap;
use crate::export::registry::lock;

/// Clock difference tolerated between a client and this server.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);
/// Longest an assertion may be valid for (SMART: "no more than five minutes in the future").
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
const MAX_JTI_CHARS: usize = 255;

/// Why an assertion was refused; every one is `invalid_client`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the client assertion is not a signed JWT")]
    Malformed,
    #[error("the client assertion has no kid")]
    MissingKeyId,
    #[error("the client assertion names no registered client")]
    UnknownClient,
    #[error("the client has no key with the assertion's kid")]
    UnknownKey,
    #[error("the client assertion's alg is not the one its key is registered for")]
    WrongAlgorithm,
    #[error("the client assertion's signature does not verify")]
    BadSignature,
    #[error("the client assertion's aud is not this token endpoint")]
    WrongAudience,
    #[error("the client assertion's iss and sub must both be the client_id")]
    WrongIssuerOrSubject,
    #[error("the client assertion has expired")]
    Expired,
    #[error("the client assertion's exp is more than 5 minutes ahead")]
    TooLongLived,
    #[error("the client assertion lacks the claim {0}")]
    MissingClaim(String),
    #[error("the client assertion's jti was used before")]
    Replayed,
}

#[derive(Deserialize)]
struct IssuerOnly {
    iss: String,
}

#[derive(Deserialize)]
struct AssertionClaims {
    exp: u64,
    #[serde(default)]
    jti: Option<String>,
}

/// Checks assertions against the registry and remembers the `jti`s it accepted.
pub struct AssertionVerifier {
    token_endpoint: String,
    /// Spent `(client_id, jti)`s, kept until their assertion expires.
    spent: Mutex<ExpiringMap<(String, String), ()>>,
}

impl AssertionVerifier {
    pub fn new(token_endpoint: String) -> AssertionVerifier {
        AssertionVerifier {
            token_endpoint,
            spent: Mutex::new(ExpiringMap::default()),
        }
    }

    pub fn token_endpoint(&self) -> &str {
        &self.token_endpoint
    }

    /// The client the assertion authenticates, once every check passed; its `jti` is
    /// then spent.
    pub fn verify<'a>(
        &self,
        registry: &'a ClientRegistry,
        assertion: &str,
        now: SystemTime,
    ) -> Result<&'a RegisteredClient, AssertionError> {
        let header = decode_header(assertion).map_err(|_| AssertionError::Malformed)?;
        let kid = header.kid.ok_or(AssertionError::MissingKeyId)?;
        let issuer = insecure_decode_claims::<IssuerOnly>(assertion)
            .map_err(|_| AssertionError::UnknownClient)?
            .iss;
        let client = registry.get(&issuer).ok_or(AssertionError::UnknownClient)?;
        let key = client.key(&kid).ok_or(AssertionError::UnknownKey)?;
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.set_audience(&[&self.token_endpoint]);
        validation.set_issuer(&[&client.client_id]);
        validation.sub = Some(client.client_id.clone());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let claims = decode::<AssertionClaims>(assertion, &key.key, &validation)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidAlgorithm => AssertionError::WrongAlgorithm,
                ErrorKind::InvalidSignature => AssertionError::BadSignature,
                ErrorKind::InvalidAudience => AssertionError::WrongAudience,
                ErrorKind::InvalidIssuer | ErrorKind::InvalidSubject => {
                    AssertionError::WrongIssuerOrSubject
                }
                ErrorKind::ExpiredSignature => AssertionError::Expired,
                ErrorKind::MissingRequiredClaim(claim) => {
                    AssertionError::MissingClaim(claim.clone())
                }
                _ => AssertionError::Malformed,
            })?
            .claims;
        let now_seconds = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let latest_exp = now_seconds + (MAX_ASSERTION_LIFETIME + CLOCK_SKEW).as_secs();
        if claims.exp > latest_exp {
            return Err(AssertionError::TooLongLived);
        }
        let jti = claims
            .jti
            .filter(|jti| !jti.is_empty() && jti.chars().count() <= MAX_JTI_CHARS)
            .ok_or_else(|| AssertionError::MissingClaim("jti".to_owned()))?;
        self.spend_jti(&client.client_id, jti, claims.exp, now_seconds)?;
        Ok(client)
    }

    /// Remembers `jti` until `exp` (plus the skew); refuses one still remembered.
    fn spend_jti(
        &self,
        client_id: &str,
        jti: String,
        exp: u64,
        now_seconds: u64,
    ) -> Result<(), AssertionError> {
        let mut spent = lock(&self.spent);
        let key = (client_id.to_owned(), jti);
        if spent.get(&key, now_seconds).is_some() {
            return Err(AssertionError::Replayed);
        }
        spent.insert(key, (), exp + CLOCK_SKEW.as_secs(), now_seconds);
        Ok(())
    }
}
