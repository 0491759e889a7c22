//! Building FHIR responses.

use serde_json::Value;
use warp::http::header::{CONTENT_TYPE, ETAG, HeaderValue, LAST_MODIFIED, LOCATION};
use warp::http::{Response, StatusCode};
use warp::reply::Response as WarpResponse;

use super::ApiError;
use crate::config::BaseUrl;
use crate::fhir::outcome::OperationOutcome;
use crate::store::StoredVersion;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

pub fn fhir_json_text(status: StatusCode, body: String) -> WarpResponse {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

pub fn fhir_json(status: StatusCode, body: &Value) -> WarpResponse {
    fhir_json_text(status, body.to_string())
}

pub fn outcome(status: StatusCode, outcome: &OperationOutcome) -> WarpResponse {
    fhir_json(status, &outcome.to_json())
}

/// Seconds a throttled client is told to wait.
pub const THROTTLED_RETRY_AFTER_SECONDS: u64 = 10;
/// Seconds a client is told to wait before trying an unavailable service again.
pub const UNAVAILABLE_RETRY_AFTER_SECONDS: u64 = 5;

pub fn error(error: &ApiError) -> WarpResponse {
    if let ApiError::TokenRequest(refused) = error {
        return oauth_json(error.status(), &refused.to_json());
    }
    let mut reply = outcome(error.status(), &error.to_outcome());
    if let ApiError::Access(refused) = error {
        reply.headers_mut().insert(
            warp::http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(refused.challenge()),
        );
    }
    if let ApiError::MethodNotAllowed { allow, .. } = error {
        reply
            .headers_mut()
            .insert(warp::http::header::ALLOW, HeaderValue::from_static(allow));
    }
    let retry_after = match error.status() {
        StatusCode::TOO_MANY_REQUESTS => Some(THROTTLED_RETRY_AFTER_SECONDS),
        StatusCode::SERVICE_UNAVAILABLE => Some(UNAVAILABLE_RETRY_AFTER_SECONDS),
        _ => None,
    };
    if let Some(seconds) = retry_after {
        reply
            .headers_mut()
            .insert(warp::http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    reply
}

/// A token endpoint answer (RFC 6749 §5.1): JSON that no cache may keep.
pub fn oauth_json(status: StatusCode, body: &Value) -> WarpResponse {
    let mut response = Response::new(body.to_string().into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        warp::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    headers.insert(
        warp::http::header::PRAGMA,
        HeaderValue::from_static("no-cache"),
    );
    response
}

/// `W/"n"`, the weak ETag FHIR uses for versions.
pub fn version_etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

/// Adds ETag and Last-Modified for `version` (and Location when `location` is set).
pub fn with_version_headers(
    mut response: WarpResponse,
    version: &StoredVersion,
    location: Option<&BaseUrl>,
) -> WarpResponse {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&version_etag(version.version)) {
        headers.insert(ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&version.last_updated.to_http_date()) {
        headers.insert(LAST_MODIFIED, value);
    }
    if let Some(base_url) = location
        && let Ok(value) = HeaderValue::from_str(&version_url(base_url, version))
    {
        headers.insert(LOCATION, value);
    }
    response
}

/// `{base}/{type}/{id}/_history/{version}`.
pub fn version_url(base_url: &BaseUrl, version: &StoredVersion) -> String {
    format!(
        "{}/{}/{}/_history/{}",
        base_url.as_str(),
        version.resource_type,
        version.id,
        version.version
    )
}
