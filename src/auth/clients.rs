//! `--clients FILE` for `--auth smart`: the registered backend clients, each with its
//! allowed scopes, public keys (a JWKS) and optionally the containers it may export to.
//! A key's algorithm is fixed here, by the key: RSA → RS384, P-384 → ES384.

use std::collections::HashMap;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::scopes::{ScopeError, ScopeSet};
use crate::sink::ContainerName;

/// Smallest accepted RSA modulus.
const MIN_RSA_MODULUS_BITS: usize = 2048;
const P384_COORDINATE_BYTES: usize = 48;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    client_id: String,
    scope: String,
    jwks: JwkSet,
    #[serde(default)]
    containers: Option<Vec<String>>,
}

/// A public key a client signs its assertions with.
pub struct VerificationKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

pub struct RegisteredClient {
    pub client_id: String,
    pub scopes: ScopeSet,
    keys: HashMap<String, VerificationKey>,
    /// `None`: the server-wide `--containers`.
    pub containers: Option<Vec<ContainerName>>,
}

impl RegisteredClient {
    /// The key named by an assertion's `kid`.
    pub fn key(&self, kid: &str) -> Option<&VerificationKey> {
        self.keys.get(kid)
    }
}

/// Every registered client by `client_id`.
#[derive(Default)]
pub struct ClientRegistry {
    clients: HashMap<String, RegisteredClient>,
}

/// Why a clients file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientsFileError {
    #[error("not a JSON array of clients: {0}")]
    Json(String),
    #[error("client '{client}': {message}")]
    Client { client: String, message: String },
    #[error("client '{client}': {source}")]
    Scope { client: String, source: ScopeError },
    #[error("no clients in the file")]
    Empty,
}

impl ClientRegistry {
    pub fn parse(text: &str) -> Result<ClientRegistry, ClientsFileError> {
        let entries: Vec<ClientEntry> = serde_json::from_str(text)
            .map_err(|error| ClientsFileError::Json(error.to_string()))?;
        if entries.is_empty() {
            return Err(ClientsFileError::Empty);
        }
        let mut registry = ClientRegistry::default();
        for entry in entries {
            let client = entry.client_id.clone();
            let refuse = |message: String| ClientsFileError::Client {
                client: client.clone(),
                message,
            };
            if client.is_empty() || client.len() > 255 || client.chars().any(char::is_control) {
                return Err(refuse(
                    "client_id must be 1 to 255 printable characters".to_owned(),
                ));
            }
            let scopes =
                ScopeSet::parse_all(&entry.scope).map_err(|source| ClientsFileError::Scope {
                    client: client.clone(),
                    source,
                })?;
            if scopes.is_empty() {
                return Err(refuse("scope lists no scope".to_owned()));
            }
            let mut keys = HashMap::new();
            for jwk in &entry.jwks.keys {
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .ok_or_else(|| refuse("every key needs a kid".to_owned()))?;
                let key = verification_key(jwk)
                    .map_err(|message| refuse(format!("key '{kid}': {message}")))?;
                if keys.insert(kid.clone(), key).is_some() {
                    return Err(refuse(format!("two keys have the kid '{kid}'")));
                }
            }
            if keys.is_empty() {
                return Err(refuse("jwks has no keys".to_owned()));
            }
            let containers = entry
                .containers
                .map(|names| {
                    names
                        .iter()
                        .map(|name| ContainerName::parse(name))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
                .map_err(|error| refuse(format!("containers: {error}")))?;
            let registered = RegisteredClient {
                client_id: client.clone(),
                scopes,
                keys,
                containers,
            };
            if registry
                .clients
                .insert(client.clone(), registered)
                .is_some()
            {
                return Err(refuse("registered twice".to_owned()));
            }
        }
        Ok(registry)
    }

    pub fn get(&self, client_id: &str) -> Option<&RegisteredClient> {
        self.clients.get(client_id)
    }
}

/// The verification key and its one algorithm; HMAC, `none` and curves other than P-384
/// are refused.
fn verification_key(jwk: &Jwk) -> Result<VerificationKey, String> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|usage| *usage != PublicKeyUse::Signature)
    {
        return Err("\"use\" must be \"sig\"".to_owned());
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(parameters) => {
            let modulus = base64_url_decoded(&parameters.n)?;
            let leading_zeros = modulus.iter().take_while(|byte| **byte == 0).count();
            let modulus_bits = (modulus.len() - leading_zeros) * 8;
            if modulus_bits < MIN_RSA_MODULUS_BITS {
                return Err(format!(
                    "RSA keys need at least {MIN_RSA_MODULUS_BITS} bits"
                ));
            }
            Algorithm::RS384
        }
        AlgorithmParameters::EllipticCurve(parameters)
            if parameters.curve == EllipticCurve::P384 =>
        {
            for coordinate in [&parameters.x, &parameters.y] {
                if base64_url_decoded(coordinate)?.len() != P384_COORDINATE_BYTES {
                    return Err("a P-384 coordinate must be 48 bytes".to_owned());
                }
            }
            Algorithm::ES384
        }
        _ => return Err("only RSA (RS384) and P-384 (ES384) public keys are accepted".to_owned()),
    };
    let declared_matches = match &jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS384) => algorithm == Algorithm::RS384,
        Some(KeyAlgorithm::ES384) => algorithm == Algorithm::ES384,
        Some(_) => false,
    };
    if !declared_matches {
        return Err(format!("\"alg\" must be {algorithm:?} for this key"));
    }
    let key =
        DecodingKey::from_jwk(jwk).map_err(|error| format!("unusable public key: {error}"))?;
    Ok(VerificationKey { algorithm, key })
}

fn base64_url_decoded(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| "a key parameter is not base64url".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P384_X: &str = "iA7lWQLzVrKGEFjfGMfMHfTEZ2KnLiKU7JuNT3E7ygsfE7ygsfE7ygsfE7ygsfE7";
    const P384_Y: &str = "KlNR9yuCxbWoU5zBEb8oICUvRkGj3jFhDp0cwZDKJ5MZxBz-WB3pb7fy5CA6AAAA";

    fn registry_of(clients: serde_json::Value) -> Result<ClientRegistry, ClientsFileError> {
        ClientRegistry::parse(&clients.to_string())
    }

    fn client_with_key(key: serde_json::Value) -> serde_json::Value {
        serde_json::json!([{"client_id": "c1", "scope": "system/*.read", "jwks": {"keys": [key]}}])
    }

    #[test]
    fn a_p384_key_verifies_es384_only() {
        let registry = registry_of(client_with_key(serde_json::json!(
            {"kty": "EC", "crv": "P-384", "kid": "k1", "x": P384_X, "y": P384_Y}
        )))
        .unwrap();
        let client = registry.get("c1").unwrap();
        assert_eq!(client.key("k1").unwrap().algorithm, Algorithm::ES384);
        assert!(client.key("k2").is_none());
        assert!(registry.get("c2").is_none());
    }

    #[test]
    fn hmac_small_rsa_other_curves_and_mislabelled_keys_are_refused() {
        for key in [
            serde_json::json!({"kty": "oct", "kid": "k1", "k": "c2VjcmV0"}),
            serde_json::json!({"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB"}),
            serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k1", "x": P384_X, "y": P384_Y}),
            serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "k1", "alg": "RS384", "x": P384_X, "y": P384_Y}),
            serde_json::json!({"kty": "EC", "crv": "P-384", "x": P384_X, "y": P384_Y}),
        ] {
            assert!(
                matches!(
                    registry_of(client_with_key(key.clone())),
                    Err(ClientsFileError::Client { .. })
                ),
                "{key}"
            );
        }
    }

    #[test]
    fn scopes_with_queries_and_unknown_fields_are_refused() {
        let key =
            serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "k1", "x": P384_X, "y": P384_Y});
        let with_query = serde_json::json!([{"client_id": "c1", "scope": "system/Observation.rs?category=laboratory", "jwks": {"keys": [key]}}]);
        assert!(matches!(
            registry_of(with_query),
            Err(ClientsFileError::Scope { .. })
        ));
        let unknown_field = serde_json::json!([{"client_id": "c1", "scope": "system/*.read", "jwks": {"keys": [key]}, "scopes": "x"}]);
        assert!(matches!(
            registry_of(unknown_field),
            Err(ClientsFileError::Json(_))
        ));
        assert_eq!(
            registry_of(serde_json::json!([])).err(),
            Some(ClientsFileError::Empty)
        );
    }
}
