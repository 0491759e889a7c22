//! Bulk Data `$export`: kick-off, status and cancel (file downloads are in `download`).

use std::sync::Arc;

use bytes::Bytes;
use warp::http::header::{
    CONTENT_LOCATION, CONTENT_TYPE, EXPIRES, HeaderName, HeaderValue, RETRY_AFTER,
};
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response as WarpResponse;

use super::resource::run_blocking;
use super::response;
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::export::manifest::{FileUrls, manifest};
use crate::export::{ExportLevel, ExportRequest, JobStatus, KickOff};
use crate::fhir::Instant;
use crate::fhir::outcome::{IssueKind, IssueSeverity, OperationOutcome};

/// Seconds a client should wait between status polls.
const STATUS_RETRY_AFTER_SECONDS: u64 = 1;
const X_PROGRESS: HeaderName = HeaderName::from_static("x-progress");

pub struct KickOffRequest<'a> {
    pub level: ExportLevel,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

pub async fn kick_off(
    state: Arc<AppState>,
    kick_off: KickOffRequest<'_>,
    caller: Option<Caller>,
) -> Result<WarpResponse, ApiError> {
    let header_text = |name| {
        kick_off
            .headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    let prefer: Vec<&str> = kick_off
        .headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let mut request = ExportRequest::parse(&KickOff {
        level: kick_off.level,
        is_post: kick_off.method == Method::POST,
        query: kick_off.query,
        accept: header_text(warp::http::header::ACCEPT),
        prefer,
        body: &kick_off.body,
        now: Instant::now(),
        local_base: &state.local_base,
    })
    .map_err(|error| ApiError::BadRequest(error.0))?;
    if let Some(caller) = &caller {
        caller.authorize_export(&mut request)?;
    }
    let owner = caller.as_ref().and_then(Caller::owner).map(str::to_owned);
    let relative = kick_off.path.strip_prefix("/fhir").unwrap_or(kick_off.path);
    let request_url = if kick_off.query.is_empty() {
        format!("{}{relative}", state.base_url.as_str())
    } else {
        format!("{}{relative}?{}", state.base_url.as_str(), kick_off.query)
    };
    let engine = Arc::clone(&state.exports);
    let job_id = run_blocking(move || Ok(engine.submit_for(request, request_url, owner)?)).await?;
    let status_url = format!("{}/$export-status/{job_id}", state.base_url.as_str());
    let mut reply = response::outcome(
        StatusCode::ACCEPTED,
        &OperationOutcome::single(
            IssueSeverity::Information,
            IssueKind::Informational,
            format!("export accepted; poll {status_url}"),
        ),
    );
    if let Ok(location) = HeaderValue::from_str(&status_url) {
        reply.headers_mut().insert(CONTENT_LOCATION, location);
    }
    Ok(reply)
}

pub async fn status(state: &AppState, job_id: &str) -> Result<WarpResponse, ApiError> {
    match state.exports.status(job_id)? {
        JobStatus::InProgress { progress } => {
            let mut reply = WarpResponse::new(Bytes::new().into());
            *reply.status_mut() = StatusCode::ACCEPTED;
            let headers = reply.headers_mut();
            headers.insert(RETRY_AFTER, HeaderValue::from(STATUS_RETRY_AFTER_SECONDS));
            if let Ok(progress) =
                HeaderValue::from_str(&progress.to_string().chars().take(99).collect::<String>())
            {
                headers.insert(X_PROGRESS, progress);
            }
            Ok(reply)
        }
        JobStatus::Completed { record, expires } => {
            let file_url_prefix = format!("{}/$export-file/{}", state.base_url.as_str(), record.id);
            let signed = match state.signed_url_ttl {
                Some(ttl) => signed_urls(state, &record, ttl).await?,
                None => None,
            };
            let urls = match &signed {
                Some(signed) => FileUrls::Signed(signed),
                None => FileUrls::UnderPrefix(&file_url_prefix),
            };
            let requires_access_token = state.auth.requires_token() && signed.is_none();
            let body = manifest(&record, urls, requires_access_token).to_string();
            let mut reply = WarpResponse::new(body.into());
            let headers = reply.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Ok(expires) = HeaderValue::from_str(&expires.to_http_date()) {
                headers.insert(EXPIRES, expires);
            }
            Ok(reply)
        }
        JobStatus::Failed { kind, message } => Err(ApiError::ExportFailed { kind, message }),
    }
}

/// Pre-signed URLs for every file, or `None` when the destination cannot sign.
async fn signed_urls(
    state: &AppState,
    record: &crate::export::job::JobRecord,
    ttl: std::time::Duration,
) -> Result<Option<std::collections::HashMap<String, String>>, ApiError> {
    let mut urls = std::collections::HashMap::new();
    for file in &record.files {
        let (files, object) = state.exports.file(&record.id, &file.name)?;
        let signed = files.signed_url(&object, ttl).await.map_err(|error| {
            ApiError::Internal(format!("signing a download URL failed: {error}"))
        })?;
        match signed {
            Some(url) => urls.insert(file.name.clone(), url),
            None => return Ok(None),
        };
    }
    Ok(Some(urls))
}

pub async fn cancel(state: &AppState, job_id: String) -> Result<WarpResponse, ApiError> {
    let engine = Arc::clone(&state.exports);
    let cancelled_job = job_id.clone();
    run_blocking(move || Ok(engine.cancel(&cancelled_job)?)).await?;
    Ok(response::outcome(
        StatusCode::ACCEPTED,
        &OperationOutcome::single(
            IssueSeverity::Information,
            IssueKind::Informational,
            format!("export job '{job_id}' was cancelled and its files are being deleted"),
        ),
    ))
}
