//! Access control end to end: SMART Backend Services clients signing RS384 and ES384
//! assertions, every refused assertion, scope enforcement and narrowing, job ownership,
//! container allow-lists, per-client limits, static tokens, and `--auth none` exposure.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhirlog::auth::AuthSettings;
use fhirlog::auth::clients::ClientRegistry;
use fhirlog::auth::tokens_file::StaticTokens;
use fhirlog::config::AppSettings;
use fhirlog::export::ExportSettings;
use fhirlog::sink::ContainerName;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::blocking::Client;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Reply, TestApp, spawn_app_with_settings};
use tempfile::TempDir;

const FORM: &str = "application/x-www-form-urlencoded";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const EXPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// A backend client holding a private key, signing assertions as SMART requires.
struct SigningClient {
    client_id: String,
    kid: String,
    algorithm: Algorithm,
    private_key: EncodingKey,
    public_jwk: Value,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The RSAPrivateKey (PKCS#1) inside a PKCS#8 PrivateKeyInfo, which is what
/// `EncodingKey::from_rsa_der` takes.
fn pkcs1_inside_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    fn element(bytes: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = bytes[0];
        let (length, header) = if bytes[1] < 0x80 {
            (bytes[1] as usize, 2)
        } else {
            let count = (bytes[1] & 0x7f) as usize;
            let length = bytes[2..2 + count]
                .iter()
                .fold(0usize, |length, byte| (length << 8) | *byte as usize);
            (length, 2 + count)
        };
        (
            tag,
            &bytes[header..header + length],
            &bytes[header + length..],
        )
    }
    let (_, private_key_info, _) = element(pkcs8);
    let (_, _, after_version) = element(private_key_info);
    let (_, _, after_algorithm) = element(after_version);
    let (tag, rsa_private_key, _) = element(after_algorithm);
    assert_eq!(tag, 0x04, "PKCS#8 holds its key in an OCTET STRING");
    rsa_private_key.to_vec()
}

impl SigningClient {
    fn rsa(client_id: &str, kid: &str) -> SigningClient {
        let key_pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = key_pair.as_der().unwrap();
        let public = key_pair.public_key();
        SigningClient {
            client_id: client_id.to_owned(),
            kid: kid.to_owned(),
            algorithm: Algorithm::RS384,
            private_key: EncodingKey::from_rsa_der(&pkcs1_inside_pkcs8(pkcs8.as_ref())),
            public_jwk: json!({
                "kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig",
                "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
            }),
        }
    }

    fn p384(client_id: &str, kid: &str) -> SigningClient {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let key_pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = key_pair.public_key().as_ref();
        assert_eq!(point.len(), 97, "an uncompressed P-384 point");
        SigningClient {
            client_id: client_id.to_owned(),
            kid: kid.to_owned(),
            algorithm: Algorithm::ES384,
            private_key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            public_jwk: json!({
                "kty": "EC", "crv": "P-384", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..49]),
                "y": URL_SAFE_NO_PAD.encode(&point[49..]),
            }),
        }
    }

    /// The same client id and kid with a different private key.
    fn impostor(&self) -> SigningClient {
        match self.algorithm {
            Algorithm::RS384 => SigningClient::rsa(&self.client_id, &self.kid),
            _ => SigningClient::p384(&self.client_id, &self.kid),
        }
    }

    fn registration(&self, scope: &str) -> Value {
        json!({"client_id": self.client_id, "scope": scope, "jwks": {"keys": [self.public_jwk]}})
    }

    /// Valid claims for `token_endpoint`: four minutes of life and a fresh jti.
    fn claims(&self, token_endpoint: &str) -> Value {
        json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_endpoint,
            "exp": unix_now() + 240,
            "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".to_owned());
        jsonwebtoken::encode(&header, claims, &self.private_key).unwrap()
    }

    fn assertion(&self, token_endpoint: &str) -> String {
        self.sign(&self.claims(token_endpoint))
    }
}

/// An `alg` other than the key's: `none` unsigned, or HS256 keyed with the public key
/// (the classic confusion attack).
fn forged_assertion(client: &SigningClient, algorithm: &str, claims: &Value) -> String {
    let header = json!({"alg": algorithm, "typ": "JWT", "kid": client.kid});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = match algorithm {
        "none" => String::new(),
        _ => {
            let secret = client.public_jwk.to_string();
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
            URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&key, signing_input.as_bytes()))
        }
    };
    format!("{signing_input}.{signature}")
}

/// Blocking HTTP with optional bearer tokens, on absolute URLs.
struct Http {
    client: Client,
}

impl Http {
    fn new() -> Http {
        Http {
            client: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Reply {
        let mut request = self.client.request(method, url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().unwrap();
        Reply {
            status: response.status(),
            headers: response.headers().clone(),
            text: response.text().unwrap(),
        }
    }

    fn get(&self, url: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, url, token, &[], None)
    }

    fn put_resource(&self, url: &str, token: &str, resource: &Value) -> Reply {
        self.send(
            Method::PUT,
            url,
            Some(token),
            &[("Content-Type", "application/fhir+json")],
            Some(resource.to_string()),
        )
    }

    fn kick_off(&self, url: &str, token: Option<&str>) -> Reply {
        self.send(
            Method::GET,
            url,
            token,
            &[
                ("Accept", "application/fhir+json"),
                ("Prefer", "respond-async"),
            ],
            None,
        )
    }

    fn post_form(&self, url: &str, fields: &[(&str, &str)]) -> Reply {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send(
            Method::POST,
            url,
            None,
            &[("Content-Type", FORM)],
            Some(body),
        )
    }

    /// Polls until the export is no longer in progress; returns the final reply.
    fn poll(&self, status_url: &str, token: &str) -> Reply {
        let deadline = Instant::now() + EXPORT_TIMEOUT;
        loop {
            let reply = self.get(status_url, Some(token));
            if reply.status != StatusCode::ACCEPTED {
                return reply;
            }
            assert!(Instant::now() < deadline, "the export did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct SmartServer {
    app: TestApp,
    http: Http,
    token_endpoint: String,
}

fn smart_settings(
    data_dir: &TempDir,
    registrations: Vec<Value>,
    exports: ExportSettings,
    containers: Option<&[&str]>,
) -> AppSettings {
    let mut settings = AppSettings::local(data_dir.path());
    settings.exports = exports;
    let clients = ClientRegistry::parse(&Value::Array(registrations).to_string()).unwrap();
    settings.auth = AuthSettings::Smart {
        clients: Arc::new(clients),
        containers: containers.map(|names| {
            names
                .iter()
                .map(|name| ContainerName::parse(name).unwrap())
                .collect()
        }),
    };
    settings
}

fn spawn_smart(
    registrations: Vec<Value>,
    exports: ExportSettings,
    containers: Option<&[&str]>,
) -> SmartServer {
    let data_dir = TempDir::new().unwrap();
    let settings = smart_settings(&data_dir, registrations, exports, containers);
    let app = spawn_app_with_settings(data_dir, settings);
    let token_endpoint = format!("{}/auth/token", app.base_url.strip_suffix("/fhir").unwrap());
    SmartServer {
        app,
        http: Http::new(),
        token_endpoint,
    }
}

impl SmartServer {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.app.base_url)
    }

    fn request_token(&self, assertion: &str, scope: &str) -> Reply {
        self.http.post_form(
            &self.token_endpoint,
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion),
                ("scope", scope),
            ],
        )
    }

    /// A token for `scope`, asserting that it was granted exactly `granted`.
    fn token(&self, client: &SigningClient, scope: &str, granted: &str) -> String {
        let reply = self.request_token(&client.assertion(&self.token_endpoint), scope);
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        let body = reply.json();
        assert_eq!(body["token_type"], "bearer", "{body}");
        assert_eq!(body["scope"], granted, "{body}");
        let expires_in = body["expires_in"].as_u64().unwrap();
        assert!((1..=300).contains(&expires_in), "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Kicks off `path_and_query` and returns the status URL.
    fn kick_off(&self, path_and_query: &str, token: &str) -> String {
        let reply = self.http.kick_off(&self.url(path_and_query), Some(token));
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
        reply.required_header("content-location").to_owned()
    }

    /// Exports `path_and_query` to completion and returns the manifest.
    fn export(&self, path_and_query: &str, token: &str) -> Value {
        let status_url = self.kick_off(path_and_query, token);
        let reply = self.http.poll(&status_url, token);
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()
    }

    /// Two patients and an observation, written through the API by `writer`.
    fn seed(&self, writer_token: &str) {
        for (path, resource) in [
            (
                "/Patient/p1",
                json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "One"}]}),
            ),
            (
                "/Patient/p2",
                json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Two"}]}),
            ),
            (
                "/Observation/o1",
                json!({"resourceType": "Observation", "id": "o1", "status": "final",
                       "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
            ),
        ] {
            let reply = self
                .http
                .put_resource(&self.url(path), writer_token, &resource);
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        }
    }
}

fn output_types(manifest: &Value) -> Vec<String> {
    let mut types: Vec<String> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["type"].as_str().unwrap().to_owned())
        .collect();
    types.sort();
    types.dedup();
    types
}

fn assert_oauth_error(reply: &Reply, status: StatusCode, error: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert_eq!(reply.json()["error"], error, "{}", reply.text);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
}

fn assert_unauthorized(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text);
    assert!(
        reply
            .required_header("www-authenticate")
            .starts_with("Bearer"),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
}

#[test]
fn rs384_and_es384_clients_export_download_and_cancel_with_their_tokens() {
    let writer = SigningClient::p384("writer", "w1");
    let rsa_reader = SigningClient::rsa("rsa-reader", "r1");
    let ec_reader = SigningClient::p384("ec-reader", "e1");
    let server = spawn_smart(
        vec![
            writer.registration("system/*.*"),
            rsa_reader.registration("system/*.read"),
            ec_reader.registration("system/*.rs"),
        ],
        ExportSettings::default(),
        None,
    );
    let writer_token = server.token(&writer, "system/*.*", "system/*.*");
    server.seed(&writer_token);

    for (reader, scope) in [(&rsa_reader, "system/*.read"), (&ec_reader, "system/*.rs")] {
        let token = server.token(reader, scope, scope);
        let status_url = server.kick_off("/$export", &token);
        let manifest = server.http.poll(&status_url, &token);
        assert_eq!(manifest.status, StatusCode::OK, "{}", manifest.text);
        let manifest = manifest.json();
        assert_eq!(manifest["requiresAccessToken"], true, "{manifest}");
        assert_eq!(output_types(&manifest), ["Observation", "Patient"]);
        let mut lines = 0;
        for item in manifest["output"].as_array().unwrap() {
            let file_url = item["url"].as_str().unwrap();
            let download = server.http.get(file_url, Some(&token));
            assert_eq!(download.status, StatusCode::OK, "{}", download.text);
            lines += download.text.lines().count();
            assert_unauthorized(&server.http.get(file_url, None));
        }
        assert_eq!(lines, 3);
        let cancelled = server
            .http
            .send(Method::DELETE, &status_url, Some(&token), &[], None);
        assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{}", cancelled.text);
        assert_eq!(
            server.http.get(&status_url, Some(&token)).status,
            StatusCode::NOT_FOUND
        );
    }
}

#[test]
fn discovery_and_metadata_are_public_and_everything_else_needs_a_token() {
    let client = SigningClient::p384("c1", "k1");
    let server = spawn_smart(
        vec![client.registration("system/*.read")],
        ExportSettings::default(),
        None,
    );
    let configuration = server
        .http
        .get(&server.url("/.well-known/smart-configuration"), None);
    assert_eq!(configuration.status, StatusCode::OK);
    let configuration = configuration.json();
    assert_eq!(
        configuration["token_endpoint"],
        server.token_endpoint.as_str()
    );
    assert_eq!(
        configuration["token_endpoint_auth_signing_alg_values_supported"],
        json!(["RS384", "ES384"])
    );
    assert_eq!(
        configuration["grant_types_supported"],
        json!(["client_credentials"])
    );
    assert_eq!(
        configuration["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert!(configuration["scopes_supported"].is_array());
    assert!(configuration["capabilities"].is_array());
    let metadata = server.http.get(&server.url("/metadata"), None);
    assert_eq!(metadata.status, StatusCode::OK);
    let security = &metadata.json()["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    assert_eq!(
        security["extension"][0]["extension"][0]["valueUri"],
        server.token_endpoint.as_str()
    );

    let healthz = server.app.base_url.replace("/fhir", "/healthz");
    let missing_job = server.url("/$export-status/0123456789abcdef0123456789abcdef");
    for url in [
        server.url("/$export"),
        server.url("/Patient/p1"),
        missing_job.clone(),
        healthz.clone(),
    ] {
        assert_unauthorized(&server.http.get(&url, None));
        let unknown = server
            .http
            .get(&url, Some("not-a-token-this-server-issued"));
        assert_unauthorized(&unknown);
        assert!(
            unknown
                .required_header("www-authenticate")
                .contains("invalid_token")
        );
    }
    let token = server.token(&client, "system/*.read", "system/*.read");
    assert_eq!(
        server.http.get(&healthz, Some(&token)).status,
        StatusCode::OK
    );
    assert_eq!(
        server.http.get(&missing_job, Some(&token)).status,
        StatusCode::NOT_FOUND
    );
}

/// A token request's name, its form fields, and the status and error it must get.
type FormCase<'a> = (&'a str, Vec<(&'a str, String)>, StatusCode, &'a str);

#[test]
fn every_bad_token_request_gets_its_rfc_6749_error() {
    let rsa = SigningClient::rsa("rsa-client", "r1");
    let ec = SigningClient::p384("ec-client", "e1");
    let server = spawn_smart(
        vec![
            rsa.registration("system/*.read"),
            ec.registration("system/Patient.read"),
        ],
        ExportSettings::default(),
        None,
    );
    let endpoint = server.token_endpoint.clone();
    for client in [&rsa, &ec] {
        let with_claims = |change: &dyn Fn(&mut Value)| {
            let mut claims = client.claims(&endpoint);
            change(&mut claims);
            client.sign(&claims)
        };
        let mut unknown_kid_header = Header::new(client.algorithm);
        unknown_kid_header.kid = Some("someone-elses-key".to_owned());
        let unknown_kid = jsonwebtoken::encode(
            &unknown_kid_header,
            &client.claims(&endpoint),
            &client.private_key,
        )
        .unwrap();
        let refused_assertions = [
            ("bad signature", client.impostor().assertion(&endpoint)),
            ("unknown kid", unknown_kid),
            (
                "wrong aud",
                with_claims(&|claims| claims["aud"] = json!("https://elsewhere.example/token")),
            ),
            (
                "expired",
                with_claims(&|claims| claims["exp"] = json!(unix_now() - 60)),
            ),
            (
                "exp too far ahead",
                with_claims(&|claims| claims["exp"] = json!(unix_now() + 600)),
            ),
            (
                "unknown client",
                with_claims(&|claims| {
                    claims["iss"] = json!("nobody");
                    claims["sub"] = json!("nobody");
                }),
            ),
            (
                "sub is not the client",
                with_claims(&|claims| claims["sub"] = json!("someone-else")),
            ),
            ("no jti", with_claims(&|claims| claims["jti"] = Value::Null)),
            (
                "alg swapped to HS256",
                forged_assertion(client, "HS256", &client.claims(&endpoint)),
            ),
            (
                "alg none",
                forged_assertion(client, "none", &client.claims(&endpoint)),
            ),
            ("not a JWT", "abc.def".to_owned()),
        ];
        for (case, assertion) in refused_assertions {
            let reply = server.request_token(&assertion, "system/Patient.read");
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{case}: {}",
                reply.text
            );
            assert_oauth_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
        }

        let replayed = client.assertion(&endpoint);
        let first = server.request_token(&replayed, "system/Patient.read");
        assert_eq!(first.status, StatusCode::OK, "{}", first.text);
        assert_oauth_error(
            &server.request_token(&replayed, "system/Patient.read"),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );

        let fresh = || client.assertion(&endpoint);
        let form_cases: [FormCase; 6] = [
            (
                "bad grant_type",
                vec![
                    ("grant_type", "password".to_owned()),
                    ("client_assertion_type", JWT_BEARER.to_owned()),
                    ("client_assertion", fresh()),
                    ("scope", "system/Patient.read".to_owned()),
                ],
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
            ),
            (
                "bad client_assertion_type",
                vec![
                    ("grant_type", "client_credentials".to_owned()),
                    ("client_assertion_type", "urn:example:saml".to_owned()),
                    ("client_assertion", fresh()),
                    ("scope", "system/Patient.read".to_owned()),
                ],
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "missing assertion",
                vec![
                    ("grant_type", "client_credentials".to_owned()),
                    ("client_assertion_type", JWT_BEARER.to_owned()),
                    ("scope", "system/Patient.read".to_owned()),
                ],
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "missing scope",
                vec![
                    ("grant_type", "client_credentials".to_owned()),
                    ("client_assertion_type", JWT_BEARER.to_owned()),
                    ("client_assertion", fresh()),
                ],
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "no requested scope allowed",
                vec![
                    ("grant_type", "client_credentials".to_owned()),
                    ("client_assertion_type", JWT_BEARER.to_owned()),
                    ("client_assertion", fresh()),
                    ("scope", "system/Patient.write patient/*.read".to_owned()),
                ],
                StatusCode::BAD_REQUEST,
                "invalid_scope",
            ),
            (
                "a v2 scope with a query",
                vec![
                    ("grant_type", "client_credentials".to_owned()),
                    ("client_assertion_type", JWT_BEARER.to_owned()),
                    ("client_assertion", fresh()),
                    (
                        "scope",
                        "system/Patient.read system/Observation.rs?category=laboratory".to_owned(),
                    ),
                ],
                StatusCode::BAD_REQUEST,
                "invalid_scope",
            ),
        ];
        for (case, fields, status, error) in form_cases {
            let fields: Vec<(&str, &str)> = fields
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            let reply = server.http.post_form(&endpoint, &fields);
            assert_eq!(reply.status, status, "{case}: {}", reply.text);
            assert_oauth_error(&reply, status, error);
        }
    }
}

#[test]
fn granted_scopes_narrow_reads_writes_and_exports() {
    let admin = SigningClient::p384("admin", "a1");
    let client = SigningClient::rsa("narrowed", "n1");
    let server = spawn_smart(
        vec![
            admin.registration("system/*.*"),
            client.registration("system/*.read system/Observation.cud"),
        ],
        ExportSettings::default(),
        None,
    );
    server.seed(&server.token(&admin, "system/*.*", "system/*.*"));

    let patients_only = server.token(
        &client,
        "launch system/Patient.read system/Patient.write system/*.write",
        "system/Patient.read",
    );
    assert_eq!(
        server
            .http
            .get(&server.url("/Patient/p1"), Some(&patients_only))
            .status,
        StatusCode::OK
    );
    server
        .http
        .get(&server.url("/Observation/o1"), Some(&patients_only))
        .expect_operation_outcome(StatusCode::FORBIDDEN, &["scope"]);
    server
        .http
        .put_resource(
            &server.url("/Patient/p1"),
            &patients_only,
            &json!({"resourceType": "Patient", "id": "p1"}),
        )
        .expect_operation_outcome(StatusCode::FORBIDDEN, &["scope"]);
    server
        .http
        .kick_off(
            &server.url("/$export?_type=Patient,Observation"),
            Some(&patients_only),
        )
        .expect_operation_outcome(StatusCode::FORBIDDEN, &["Observation"]);
    let manifest = server.export("/$export", &patients_only);
    assert_eq!(output_types(&manifest), ["Patient"]);
    let manifest = server.export("/Patient/$export", &patients_only);
    assert_eq!(output_types(&manifest), ["Patient"]);

    let observations = server.token(
        &client,
        "system/Observation.rs system/Observation.u",
        "system/Observation.rs system/Observation.u",
    );
    let updated = server.http.put_resource(
        &server.url("/Observation/o1"),
        &observations,
        &json!({"resourceType": "Observation", "id": "o1", "status": "amended", "code": {"text": "x"}}),
    );
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
    server
        .http
        .send(
            Method::DELETE,
            &server.url("/Observation/o1"),
            Some(&observations),
            &[],
            None,
        )
        .expect_operation_outcome(StatusCode::FORBIDDEN, &["scope"]);
    let manifest = server.export("/$export?_type=Observation", &observations);
    assert_eq!(output_types(&manifest), ["Observation"]);
    server
        .http
        .send(
            Method::POST,
            &server.app.base_url,
            Some(&observations),
            &[("Content-Type", "application/fhir+json")],
            Some(json!({"resourceType": "Bundle", "type": "batch", "entry": []}).to_string()),
        )
        .expect_operation_outcome(StatusCode::FORBIDDEN, &["batch"]);
}

#[test]
fn a_clients_exports_are_invisible_to_every_other_client() {
    let owner = SigningClient::p384("owner", "o1");
    let other = SigningClient::rsa("other", "x1");
    let server = spawn_smart(
        vec![
            owner.registration("system/*.*"),
            other.registration("system/*.read"),
        ],
        ExportSettings::default(),
        None,
    );
    let owner_token = server.token(&owner, "system/*.*", "system/*.*");
    server.seed(&owner_token);
    let other_token = server.token(&other, "system/*.read", "system/*.read");
    let status_url = server.kick_off("/$export", &owner_token);
    let manifest = server.http.poll(&status_url, &owner_token).json();
    let file_url = manifest["output"][0]["url"].as_str().unwrap();

    server
        .http
        .get(&status_url, Some(&other_token))
        .expect_operation_outcome(StatusCode::NOT_FOUND, &["no export job"]);
    assert_eq!(
        server.http.get(file_url, Some(&other_token)).status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server
            .http
            .send(Method::DELETE, &status_url, Some(&other_token), &[], None)
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server.http.get(&status_url, Some(&owner_token)).status,
        StatusCode::OK
    );
    assert_eq!(
        server.http.get(file_url, Some(&owner_token)).status,
        StatusCode::OK
    );
}

#[test]
fn containers_come_from_the_allow_lists() {
    let listed = SigningClient::p384("listed", "l1");
    let unlisted = SigningClient::p384("unlisted", "u1");
    let mut listed_registration = listed.registration("system/*.read");
    listed_registration["containers"] = json!(["client-bucket"]);
    let server = spawn_smart(
        vec![listed_registration, unlisted.registration("system/*.read")],
        ExportSettings::default(),
        Some(&["server-bucket"]),
    );
    let listed_token = server.token(&listed, "system/*.read", "system/*.read");
    let unlisted_token = server.token(&unlisted, "system/*.read", "system/*.read");
    server.export("/$export?_container=client-bucket", &listed_token);
    server.export("/$export?_container=server-bucket", &unlisted_token);
    server.export("/$export", &unlisted_token);
    for (token, container) in [
        (&listed_token, "server-bucket"),
        (&unlisted_token, "client-bucket"),
        (&unlisted_token, "someone-elses-bucket"),
    ] {
        server
            .http
            .kick_off(
                &server.url(&format!("/$export?_container={container}")),
                Some(token),
            )
            .expect_operation_outcome(StatusCode::FORBIDDEN, &[container]);
    }
    let exports = server.app.data_dir().join("exports");
    assert!(exports.join("client-bucket").is_dir());
    assert!(exports.join("server-bucket").is_dir());
    assert!(!exports.join("someone-elses-bucket").exists());
}

#[test]
fn one_client_cannot_use_up_the_servers_retained_exports() {
    let greedy = SigningClient::p384("greedy", "g1");
    let modest = SigningClient::p384("modest", "m1");
    let server = spawn_smart(
        vec![
            greedy.registration("system/*.read"),
            modest.registration("system/*.read"),
        ],
        ExportSettings {
            max_retained_exports_per_client: 2,
            ..ExportSettings::default()
        },
        None,
    );
    let greedy_token = server.token(&greedy, "system/*.read", "system/*.read");
    let modest_token = server.token(&modest, "system/*.read", "system/*.read");
    let first = server.kick_off("/$export", &greedy_token);
    server.http.poll(&first, &greedy_token);
    let second = server.kick_off("/$export", &greedy_token);
    server.http.poll(&second, &greedy_token);
    let refused = server
        .http
        .kick_off(&server.url("/$export"), Some(&greedy_token));
    refused.expect_operation_outcome(StatusCode::TOO_MANY_REQUESTS, &["this client"]);
    assert!(refused.header("retry-after").is_some());
    server.export("/$export", &modest_token);
    let deleted = server
        .http
        .send(Method::DELETE, &first, Some(&greedy_token), &[], None);
    assert_eq!(deleted.status, StatusCode::ACCEPTED);
    server.export("/$export", &greedy_token);
}

fn spawn_with_tokens(tokens_file: &str) -> (TestApp, Http) {
    let data_dir = TempDir::new().unwrap();
    let mut settings = AppSettings::local(data_dir.path());
    settings.auth = AuthSettings::Token {
        tokens: Arc::new(StaticTokens::parse(tokens_file).unwrap()),
        containers: None,
    };
    (spawn_app_with_settings(data_dir, settings), Http::new())
}

#[test]
fn static_tokens_grant_their_scopes_until_they_expire() {
    let (app, http) = spawn_with_tokens(
        "# static tokens\n\
         writer-token-0123456789 system/*.cruds\n\
         reader-token-0123456789 system/Patient.rs\n\
         expired-token-0123456789 expires=2020-01-01T00:00:00Z system/*.*\n\
         later-token-0123456789 expires=2999-01-01T00:00:00Z system/*.read\n",
    );
    let url = |path: &str| format!("{}{path}", app.base_url);
    let created = http.put_resource(
        &url("/Patient/p1"),
        "writer-token-0123456789",
        &json!({"resourceType": "Patient", "id": "p1"}),
    );
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    for token in ["reader-token-0123456789", "later-token-0123456789"] {
        assert_eq!(
            http.get(&url("/Patient/p1"), Some(token)).status,
            StatusCode::OK
        );
    }
    let expired = http.get(&url("/Patient/p1"), Some("expired-token-0123456789"));
    assert_unauthorized(&expired);
    assert!(
        expired
            .required_header("www-authenticate")
            .contains("invalid_token")
    );
    assert_unauthorized(&http.get(&url("/Patient/p1"), None));
    http.put_resource(
        &url("/Patient/p2"),
        "reader-token-0123456789",
        &json!({"resourceType": "Patient", "id": "p2"}),
    )
    .expect_operation_outcome(StatusCode::FORBIDDEN, &["scope"]);
    assert_eq!(
        http.get(&url("/.well-known/smart-configuration"), None)
            .status,
        StatusCode::NOT_FOUND
    );

    let reply = http.kick_off(&url("/$export"), Some("reader-token-0123456789"));
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    let status_url = reply.required_header("content-location");
    let manifest = http.poll(status_url, "reader-token-0123456789").json();
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(output_types(&manifest), ["Patient"]);
    assert_eq!(
        http.get(status_url, Some("later-token-0123456789")).status,
        StatusCode::NOT_FOUND,
        "another token is another client"
    );
}

#[test]
fn auth_none_is_refused_off_loopback_unless_insecure_which_warns() {
    let data_dir = TempDir::new().unwrap();
    let refused = support::run_fhirlog(&[
        "serve".as_ref(),
        "--data-dir".as_ref(),
        data_dir.path().as_os_str(),
        "--listen".as_ref(),
        "0.0.0.0:0".as_ref(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--auth none") && stderr.contains("--insecure"),
        "{stderr}"
    );

    let port = support::free_local_port();
    let log_path = data_dir.path().join("serve.log");
    let mut child = support::fhirlog_command()
        .args(["serve", "--auth", "none", "--insecure", "--listen"])
        .arg(format!("0.0.0.0:{port}"))
        .arg("--data-dir")
        .arg(data_dir.path().join("store"))
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let probe = support::FhirClient::with_timeout(
        &format!("http://127.0.0.1:{port}/fhir"),
        Duration::from_secs(2),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !probe.is_serving() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains("--insecure")),
        "{log}"
    );
}

/// The Inferno bulk-data test kit's server checks, re-implemented in
/// `inferno_like_checks.py`, against a `--auth token` server over the sample data.
#[test]
#[cfg_attr(
    not(fhirlog_test_inferno),
    ignore = "set FHIRLOG_TEST_INFERNO_CHECKS to inferno_like_checks.py (.ci/run does when ../shared/tools has it)"
)]
fn the_inferno_like_checks_pass_with_a_static_token() {
    let script = std::env::var("FHIRLOG_TEST_INFERNO_CHECKS").unwrap();
    let directory = TempDir::new().unwrap();
    let tokens_path = directory.path().join("tokens");
    let token = "inferno-checks-token-0123456789";
    std::fs::write(&tokens_path, format!("{token} system/*.read\n")).unwrap();
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample");
    let tokens_argument = tokens_path.to_str().unwrap();
    let server = support::ServerProcess::start_with_arguments(
        &directory.path().join("store"),
        &[
            "--auth",
            "token",
            "--tokens",
            tokens_argument,
            "--load",
            sample,
        ],
    );
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg(&server.base_url)
        .args(["--token", token])
        .output()
        .expect("running python3");
    let report = String::from_utf8_lossy(&output.stdout);
    let summary = report.lines().last().unwrap_or_default();
    assert!(
        output.status.success() && summary.ends_with(" 0 failed, 0 skipped"),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Sends every form from `threads` threads at once; returns the replies' statuses and
/// the seconds the whole run took.
fn post_forms_concurrently(
    url: &str,
    forms: Vec<Vec<(String, String)>>,
    threads: usize,
) -> (Vec<StatusCode>, f64) {
    let chunk_size = forms.len().div_ceil(threads);
    let chunks: Vec<Vec<Vec<(String, String)>>> =
        forms.chunks(chunk_size).map(<[_]>::to_vec).collect();
    let started = Instant::now();
    let statuses = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    let http = Http::new();
                    chunk
                        .iter()
                        .map(|form| {
                            let fields: Vec<(&str, &str)> = form
                                .iter()
                                .map(|(name, value)| (name.as_str(), value.as_str()))
                                .collect();
                            http.post_form(url, &fields).status
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap())
            .collect()
    });
    (statuses, started.elapsed().as_secs_f64())
}

/// Tokens issued per second over HTTP, assertions signed beforehand:
/// `cargo test --release --test auth -- --ignored --nocapture token_issue_rate`.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn token_issue_rate() {
    const ASSERTIONS: usize = 3000;
    const THREADS: usize = 4;
    let rsa = SigningClient::rsa("rsa-client", "r1");
    let ec = SigningClient::p384("ec-client", "e1");
    let server = spawn_smart(
        vec![
            rsa.registration("system/*.read"),
            ec.registration("system/*.read"),
        ],
        ExportSettings::default(),
        None,
    );
    for client in [&ec, &rsa] {
        let forms: Vec<Vec<(String, String)>> = (0..ASSERTIONS)
            .map(|_| {
                vec![
                    ("grant_type".to_owned(), "client_credentials".to_owned()),
                    ("client_assertion_type".to_owned(), JWT_BEARER.to_owned()),
                    (
                        "client_assertion".to_owned(),
                        client.assertion(&server.token_endpoint),
                    ),
                    ("scope".to_owned(), "system/*.read".to_owned()),
                ]
            })
            .collect();
        let (statuses, seconds) = post_forms_concurrently(&server.token_endpoint, forms, THREADS);
        assert!(statuses.iter().all(|status| *status == StatusCode::OK));
        println!(
            "{:?}: {ASSERTIONS} tokens in {seconds:.2} s over {THREADS} connections = {:.0} tokens/s",
            client.algorithm,
            ASSERTIONS as f64 / seconds
        );
    }
}

/// Downloads every file of the manifest on `threads` threads; returns the seconds taken
/// and the bytes read.
fn download_all(urls: &[String], token: Option<&str>, threads: usize) -> (f64, usize) {
    let chunk_size = urls.len().div_ceil(threads);
    let started = Instant::now();
    let bytes = std::thread::scope(|scope| {
        let handles: Vec<_> = urls
            .chunks(chunk_size)
            .map(|chunk| {
                scope.spawn(move || {
                    let http = Http::new();
                    chunk
                        .iter()
                        .map(|url| {
                            let reply = http.get(url, token);
                            assert_eq!(reply.status, StatusCode::OK);
                            reply.text.len()
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .sum()
    });
    (started.elapsed().as_secs_f64(), bytes)
}

/// The cost of the token check on downloads: the same 1,000 files from a `--auth none`
/// and a `--auth token` server over the sample, alternating, in one run:
/// `cargo test --release --test auth -- --ignored --nocapture download_overhead`.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn download_overhead_of_the_token_check() {
    const FILES: usize = 1000;
    const ROUNDS: usize = 5;
    const THREADS: usize = 4;
    let directory = TempDir::new().unwrap();
    let token = "download-measure-token-0123456789";
    let tokens_path = directory.path().join("tokens");
    std::fs::write(&tokens_path, format!("{token} system/*.read\n")).unwrap();
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample");
    let files_arguments = ["--max-resources-per-file", "40", "--load", sample];
    let open = support::ServerProcess::start_with_arguments(
        &directory.path().join("open"),
        &files_arguments,
    );
    let mut token_arguments = files_arguments.to_vec();
    token_arguments.extend(["--auth", "token", "--tokens", tokens_path.to_str().unwrap()]);
    let guarded = support::ServerProcess::start_with_arguments(
        &directory.path().join("guarded"),
        &token_arguments,
    );
    let http = Http::new();
    let file_urls = |base_url: &str, token: Option<&str>| -> Vec<String> {
        let kicked_off = http.kick_off(&format!("{base_url}/$export"), token);
        assert_eq!(
            kicked_off.status,
            StatusCode::ACCEPTED,
            "{}",
            kicked_off.text
        );
        let status_url = kicked_off.required_header("content-location");
        let deadline = Instant::now() + EXPORT_TIMEOUT;
        let manifest = loop {
            let reply = http.get(status_url, token);
            if reply.status != StatusCode::ACCEPTED {
                break reply.json();
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(100));
        };
        let urls: Vec<String> = manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["url"].as_str().unwrap().to_owned())
            .take(FILES)
            .collect();
        assert_eq!(
            urls.len(),
            FILES,
            "the export has fewer files than measured"
        );
        urls
    };
    let open_urls = file_urls(&open.base_url, None);
    let guarded_urls = file_urls(&guarded.base_url, Some(token));
    let (mut open_seconds, mut guarded_seconds) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (seconds, open_bytes) = download_all(&open_urls, None, THREADS);
        open_seconds.push(seconds);
        let (seconds, guarded_bytes) = download_all(&guarded_urls, Some(token), THREADS);
        guarded_seconds.push(seconds);
        assert_eq!(open_bytes, guarded_bytes);
    }
    let median = |seconds: &mut Vec<f64>| {
        seconds.sort_by(f64::total_cmp);
        seconds[seconds.len() / 2]
    };
    let (open_median, guarded_median) = (median(&mut open_seconds), median(&mut guarded_seconds));
    println!(
        "{FILES} files x {ROUNDS} rounds on {THREADS} connections: --auth none median {:.3} s ({:.0} files/s), --auth token median {:.3} s ({:.0} files/s), overhead {:+.1}%",
        open_median,
        FILES as f64 / open_median,
        guarded_median,
        FILES as f64 / guarded_median,
        (guarded_median / open_median - 1.0) * 100.0
    );
}
