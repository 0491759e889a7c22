//! The token endpoint of `--auth smart`: `client_credentials` grants authenticated by a
//! `private_key_jwt` assertion, answered with an opaque random access token that lives
//! only in this server's memory. Errors follow RFC 6749 §5.2.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::assertion::{AssertionError, AssertionVerifier};
use super::clients::{ClientRegistry, RegisteredClient};
use super::expiring::ExpiringMap;
use super::scopes::{Scope, ScopeError, ScopeSet};
use super::tokens_file::token_digest;
use crate::export::registry::lock;

/// How long an issued access token is valid.
pub const ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
const CLIENT_CREDENTIALS: &str = "client_credentials";
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Random bytes in an access token.
const ACCESS_TOKEN_BYTES: usize = 32;
const REQUIRED_FIELDS: [&str; 4] = [
    "grant_type",
    "client_assertion_type",
    "client_assertion",
    "scope",
];

/// The RFC 6749 §5.2 error codes the endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    InvalidClient,
    UnsupportedGrantType,
    InvalidScope,
}

impl OAuthErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthErrorCode::InvalidRequest => "invalid_request",
            OAuthErrorCode::InvalidClient => "invalid_client",
            OAuthErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthErrorCode::InvalidScope => "invalid_scope",
        }
    }
}

/// A refused token request: the code and a description safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{description}")]
pub struct TokenRequestError {
    pub code: OAuthErrorCode,
    pub description: String,
}

impl TokenRequestError {
    fn new(code: OAuthErrorCode, description: impl Into<String>) -> TokenRequestError {
        TokenRequestError {
            code,
            description: description.into(),
        }
    }

    /// The JSON body of the error response.
    pub fn to_json(&self) -> serde_json::Value {
        json!({"error": self.code.as_str(), "error_description": self.description})
    }
}

impl From<AssertionError> for TokenRequestError {
    fn from(error: AssertionError) -> Self {
        TokenRequestError::new(OAuthErrorCode::InvalidClient, error.to_string())
    }
}

/// What an access token lets its holder do.
#[derive(Debug, Clone)]
pub struct AccessGrant {
    pub client_id: String,
    pub scopes: ScopeSet,
}

/// A granted token request.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: String,
}

impl IssuedToken {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        })
    }
}

/// The registered clients, the assertion checks and the tokens issued so far.
pub struct TokenIssuer {
    registry: Arc<ClientRegistry>,
    verifier: AssertionVerifier,
    /// Issued tokens by digest, until they expire.
    issued: Mutex<ExpiringMap<[u8; 32], AccessGrant>>,
}

impl TokenIssuer {
    pub fn new(registry: Arc<ClientRegistry>, token_endpoint: String) -> TokenIssuer {
        TokenIssuer {
            registry,
            verifier: AssertionVerifier::new(token_endpoint),
            issued: Mutex::new(ExpiringMap::default()),
        }
    }

    pub fn token_endpoint(&self) -> &str {
        self.verifier.token_endpoint()
    }

    pub fn client(&self, client_id: &str) -> Option<&RegisteredClient> {
        self.registry.get(client_id)
    }

    /// Answers a form-encoded token request. CPU-bound (one signature check): call from
    /// a blocking thread.
    pub fn issue(&self, form: &[u8], now: SystemTime) -> Result<IssuedToken, TokenRequestError> {
        let mut fields: [Option<String>; 4] = Default::default();
        for (name, value) in form_urlencoded::parse(form) {
            if let Some(index) = REQUIRED_FIELDS.iter().position(|field| *field == name)
                && fields[index].replace(value.into_owned()).is_some()
            {
                return Err(TokenRequestError::new(
                    OAuthErrorCode::InvalidRequest,
                    format!("{name} is given more than once"),
                ));
            }
        }
        let [grant_type, assertion_type, assertion, scope] = fields;
        let missing = |name: &str| {
            TokenRequestError::new(OAuthErrorCode::InvalidRequest, format!("{name} is missing"))
        };
        let grant_type = grant_type.ok_or_else(|| missing("grant_type"))?;
        if grant_type != CLIENT_CREDENTIALS {
            return Err(TokenRequestError::new(
                OAuthErrorCode::UnsupportedGrantType,
                "only grant_type=client_credentials is supported",
            ));
        }
        let assertion_type = assertion_type.ok_or_else(|| missing("client_assertion_type"))?;
        if assertion_type != JWT_BEARER_ASSERTION {
            return Err(TokenRequestError::new(
                OAuthErrorCode::InvalidRequest,
                format!("client_assertion_type must be {JWT_BEARER_ASSERTION}"),
            ));
        }
        let assertion = assertion.ok_or_else(|| missing("client_assertion"))?;
        let scope = scope.ok_or_else(|| missing("scope"))?;
        let client = self.verifier.verify(&self.registry, &assertion, now)?;
        let granted = granted_scopes(client, &scope)?;
        let mut token_bytes = [0u8; ACCESS_TOKEN_BYTES];
        aws_lc_rs::rand::fill(&mut token_bytes).map_err(|_| {
            TokenRequestError::new(OAuthErrorCode::InvalidRequest, "no randomness available")
        })?;
        let access_token = blake3::Hash::from(token_bytes).to_hex().to_string();
        let now_seconds = unix_seconds(now);
        let grant = AccessGrant {
            client_id: client.client_id.clone(),
            scopes: granted.clone(),
        };
        lock(&self.issued).insert(
            token_digest(&access_token),
            grant,
            now_seconds + ACCESS_TOKEN_LIFETIME.as_secs(),
            now_seconds,
        );
        tracing::info!(client = %client.client_id, scope = %granted, "issued an access token");
        Ok(IssuedToken {
            access_token,
            expires_in: ACCESS_TOKEN_LIFETIME.as_secs(),
            scope: granted.to_string(),
        })
    }

    /// The grant of an unexpired token this server issued.
    pub fn grant(&self, access_token: &str, now: SystemTime) -> Option<AccessGrant> {
        lock(&self.issued)
            .get(&token_digest(access_token), unix_seconds(now))
            .cloned()
    }
}

/// The requested scopes the registration covers; a scope with a query, or none covered,
/// is `invalid_scope`. Scopes this server does not know are dropped.
fn granted_scopes(
    client: &RegisteredClient,
    requested: &str,
) -> Result<ScopeSet, TokenRequestError> {
    let mut granted = Vec::new();
    for text in requested.split_ascii_whitespace() {
        match Scope::parse(text) {
            Ok(scope) if client.scopes.covers(&scope) => {
                if !granted.contains(&scope) {
                    granted.push(scope);
                }
            }
            Ok(_) | Err(ScopeError::Unsupported(_)) => {}
            Err(error @ ScopeError::WithQuery(_)) => {
                return Err(TokenRequestError::new(
                    OAuthErrorCode::InvalidScope,
                    error.to_string(),
                ));
            }
        }
    }
    if granted.is_empty() {
        return Err(TokenRequestError::new(
            OAuthErrorCode::InvalidScope,
            "none of the requested scopes is allowed for this client",
        ));
    }
    Ok(ScopeSet::from_scopes(granted))
}

fn unix_seconds(instant: SystemTime) -> u64 {
    instant
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
