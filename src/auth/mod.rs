//! Access control: who is calling ([`Authorizer::authenticate`]) and what they may do
//! ([`Caller`]). Three modes: none (loopback), static bearer tokens, and SMART Backend
//! Services with a token endpoint of our own.
//!
//! - [`settings`] holds the `--auth` flags and loads the files they name.
//! - [`scopes`] parses SMART v1 and v2 `system/` scopes.
//! - [`tokens_file`] reads `--tokens`.
//! - [`clients`] reads `--clients`: the registered clients and their keys.
//! - [`assertion`] checks a client's signed assertion.
//! - [`issuer`] is the token endpoint and remembers the tokens it issued.
//! - [`expiring`] is the map of things remembered until they lapse.

pub mod assertion;
pub mod clients;
mod expiring;
pub mod issuer;
pub mod scopes;
pub mod settings;
pub mod tokens_file;

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde_json::json;

use crate::export::ExportRequest;
use crate::fhir::ResourceType;
use crate::sink::ContainerName;
pub use issuer::{IssuedToken, OAuthErrorCode, TokenIssuer, TokenRequestError};
use scopes::{Access, ScopeSet};
pub use settings::{AuthArgs, AuthMode, AuthSettings, AuthSettingsError};
use tokens_file::StaticTokens;

/// The access-control state of a running server.
pub struct Authorizer {
    mode: ModeState,
    /// `--containers`.
    containers: Option<Vec<ContainerName>>,
}

enum ModeState {
    Open,
    StaticTokens(std::sync::Arc<StaticTokens>),
    Smart(TokenIssuer),
}

/// Why a request is refused before it is handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("this endpoint needs a bearer token: Authorization: Bearer TOKEN")]
    MissingToken,
    #[error("the bearer token is unknown or has expired")]
    InvalidToken,
    #[error("the token's scopes do not allow this: {0}")]
    InsufficientScope(String),
    #[error("exports to the container '{0}' are not allowed for this client")]
    ContainerNotAllowed(String),
}

impl AccessError {
    /// The `WWW-Authenticate` challenge (RFC 6750 §3) for this refusal.
    pub fn challenge(&self) -> &'static str {
        match self {
            AccessError::MissingToken => "Bearer realm=\"fhirlog\"",
            AccessError::InvalidToken => "Bearer realm=\"fhirlog\", error=\"invalid_token\"",
            AccessError::InsufficientScope(_) | AccessError::ContainerNotAllowed(_) => {
                "Bearer realm=\"fhirlog\", error=\"insufficient_scope\""
            }
        }
    }
}

/// Who made a request and what they may do.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `--auth none`: everything is allowed and every job is visible.
    Anyone {
        containers: Option<Vec<ContainerName>>,
    },
    Client {
        client_id: String,
        scopes: ScopeSet,
        /// Containers `_container` may name; `None` allows none but the default.
        containers: Option<Vec<ContainerName>>,
    },
}

impl Caller {
    /// The owner recorded on exports this caller starts, and the one whose exports it
    /// may see; `None` sees every export.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Caller::Anyone { .. } => None,
            Caller::Client { client_id, .. } => Some(client_id),
        }
    }

    pub fn require(&self, resource_type: ResourceType, access: Access) -> Result<(), AccessError> {
        match self {
            Caller::Anyone { .. } => Ok(()),
            Caller::Client { scopes, .. } if scopes.permits(resource_type, access) => Ok(()),
            Caller::Client { .. } => Err(AccessError::InsufficientScope(format!(
                "{access:?} on {resource_type}"
            ))),
        }
    }

    /// Requires `access` on every resource type (a batch may touch any of them).
    pub fn require_on_every_type(&self, accesses: &[Access]) -> Result<(), AccessError> {
        match self {
            Caller::Anyone { .. } => Ok(()),
            Caller::Client { scopes, .. } => {
                for access in accesses {
                    if scopes.types_permitting(*access).is_some() {
                        return Err(AccessError::InsufficientScope(format!(
                            "a batch or transaction needs {access:?} on every type (system/*.*)"
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    /// Checks an export against the caller's scopes and containers: a `_type` outside
    /// the scopes is refused; without `_type` the export is narrowed to the readable types.
    pub fn authorize_export(&self, request: &mut ExportRequest) -> Result<(), AccessError> {
        let (scopes, containers) = match self {
            Caller::Anyone { containers: None } => return Ok(()),
            Caller::Anyone {
                containers: Some(containers),
            } => (None, Some(containers)),
            Caller::Client {
                scopes, containers, ..
            } => (Some(scopes), containers.as_ref()),
        };
        if let Some(container) = &request.container
            && !containers.is_some_and(|allowed| allowed.contains(container))
        {
            return Err(AccessError::ContainerNotAllowed(container.to_string()));
        }
        let Some(scopes) = scopes else {
            return Ok(());
        };
        let Some(readable) = scopes.types_permitting(Access::Read) else {
            return Ok(());
        };
        if readable.is_empty() {
            return Err(AccessError::InsufficientScope(
                "an export needs a read scope".to_owned(),
            ));
        }
        match &request.types {
            Some(requested) => {
                let refused: Vec<&str> = requested
                    .iter()
                    .filter(|resource_type| !readable.contains(resource_type))
                    .map(|resource_type| resource_type.as_str())
                    .collect();
                if !refused.is_empty() {
                    return Err(AccessError::InsufficientScope(format!(
                        "_type names {} outside the granted scopes",
                        refused.join(",")
                    )));
                }
            }
            None => request.types = Some(readable.into_iter().collect::<BTreeSet<_>>()),
        }
        Ok(())
    }
}

impl Authorizer {
    /// `token_endpoint` is the absolute URL of `/auth/token` as clients reach it.
    pub fn new(settings: AuthSettings, token_endpoint: String) -> Authorizer {
        match settings {
            AuthSettings::None { containers, .. } => Authorizer {
                mode: ModeState::Open,
                containers,
            },
            AuthSettings::Token { tokens, containers } => Authorizer {
                mode: ModeState::StaticTokens(tokens),
                containers,
            },
            AuthSettings::Smart {
                clients,
                containers,
            } => Authorizer {
                mode: ModeState::Smart(TokenIssuer::new(clients, token_endpoint)),
                containers,
            },
        }
    }

    /// Whether requests need a token (and so downloads do).
    pub fn requires_token(&self) -> bool {
        !matches!(self.mode, ModeState::Open)
    }

    /// The token endpoint, in `--auth smart` only.
    pub fn issuer(&self) -> Option<&TokenIssuer> {
        match &self.mode {
            ModeState::Smart(issuer) => Some(issuer),
            _ => None,
        }
    }

    /// The caller named by the `Authorization: Bearer` value `authorization`.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Caller, AccessError> {
        let token = || {
            authorization
                .and_then(|value| std::str::from_utf8(value).ok())
                .and_then(bearer_token)
                .ok_or(AccessError::MissingToken)
        };
        match &self.mode {
            ModeState::Open => Ok(Caller::Anyone {
                containers: self.containers.clone(),
            }),
            ModeState::StaticTokens(tokens) => {
                let grant = tokens
                    .get(token()?)
                    .filter(|grant| grant.expires.is_none_or(|expires| now < expires))
                    .ok_or(AccessError::InvalidToken)?;
                Ok(Caller::Client {
                    client_id: grant.client_id.clone(),
                    scopes: grant.scopes.clone(),
                    containers: self.containers.clone(),
                })
            }
            ModeState::Smart(issuer) => {
                let grant = issuer
                    .grant(token()?, now)
                    .ok_or(AccessError::InvalidToken)?;
                let containers = issuer
                    .client(&grant.client_id)
                    .and_then(|client| client.containers.clone())
                    .or_else(|| self.containers.clone());
                Ok(Caller::Client {
                    client_id: grant.client_id,
                    scopes: grant.scopes,
                    containers,
                })
            }
        }
    }

    /// `/.well-known/smart-configuration` (SMART App Launch §2.1), in `--auth smart` only.
    pub fn smart_configuration(&self) -> Option<serde_json::Value> {
        let issuer = self.issuer()?;
        Some(json!({
            "token_endpoint": issuer.token_endpoint(),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": [
                "system/*.read", "system/*.write", "system/*.*",
                "system/*.rs", "system/*.cud", "system/*.cruds"
            ],
            "capabilities": [
                "client-confidential-asymmetric", "permission-v1", "permission-v2"
            ]
        }))
    }
}

/// The token of `Bearer TOKEN` (scheme case-insensitive).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && tokens_file::is_bearer_token_text(token))
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportLevel;

    fn export_to(container: Option<&str>) -> ExportRequest {
        let mut request = ExportRequest::everything_at(ExportLevel::System);
        request.container = container.map(|name| ContainerName::parse(name).unwrap());
        request
    }

    fn client(scopes: &str, containers: Option<&[&str]>) -> Caller {
        Caller::Client {
            client_id: "c".to_owned(),
            scopes: ScopeSet::parse_all(scopes).unwrap(),
            containers: containers.map(|names| {
                names
                    .iter()
                    .map(|name| ContainerName::parse(name).unwrap())
                    .collect()
            }),
        }
    }

    #[test]
    fn containers_outside_the_allow_list_are_refused() {
        let anyone = Caller::Anyone { containers: None };
        assert!(
            anyone
                .authorize_export(&mut export_to(Some("any-bucket")))
                .is_ok()
        );
        let listed = Caller::Anyone {
            containers: Some(vec![ContainerName::parse("listed").unwrap()]),
        };
        assert!(
            listed
                .authorize_export(&mut export_to(Some("listed")))
                .is_ok()
        );
        assert_eq!(
            listed.authorize_export(&mut export_to(Some("other"))),
            Err(AccessError::ContainerNotAllowed("other".to_owned()))
        );
        let unlisted_client = client("system/*.read", None);
        assert!(
            unlisted_client
                .authorize_export(&mut export_to(None))
                .is_ok()
        );
        assert!(
            unlisted_client
                .authorize_export(&mut export_to(Some("any-bucket")))
                .is_err()
        );
    }

    #[test]
    fn exports_are_narrowed_to_readable_types_and_need_one() {
        let mut request = export_to(None);
        client("system/Patient.rs system/*.cud", None)
            .authorize_export(&mut request)
            .unwrap();
        assert_eq!(request.types, Some(BTreeSet::from([ResourceType::PATIENT])));
        let mut everything = export_to(None);
        client("system/*.read", None)
            .authorize_export(&mut everything)
            .unwrap();
        assert_eq!(everything.types, None);
        assert!(matches!(
            client("system/*.cud", None).authorize_export(&mut export_to(None)),
            Err(AccessError::InsufficientScope(_))
        ));
    }

    #[test]
    fn bearer_values_need_the_scheme_and_token_characters() {
        assert_eq!(bearer_token("Bearer abc-123"), Some("abc-123"));
        assert_eq!(bearer_token("bearer  abc=="), Some("abc=="));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer a b"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
