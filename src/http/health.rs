//! `GET /healthz` for operators: whether the store takes durable writes and the export
//! destination answers, each checked afresh on a blocking thread.

use std::sync::Arc;

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::AppState;
use super::response;
use crate::store::StoreError;

/// One check's verdict as reported.
fn verdict(outcome: Result<(), String>) -> Value {
    match outcome {
        Ok(()) => json!({"status": "pass"}),
        Err(message) => json!({"status": "fail", "output": message}),
    }
}

/// 200 when every check passes, 503 otherwise; the body names each check's verdict.
pub async fn health(state: Arc<AppState>) -> WarpResponse {
    let probed = tokio::task::spawn_blocking(move || {
        let store = state.store.probe_writable().map_err(|error| {
            tracing::error!(%error, "health check: the store does not take writes");
            match error {
                StoreError::Closed | StoreError::OutOfSpace | StoreError::Recovering => {
                    error.to_string()
                }
                _ => "the store does not take durable writes; the server log has the details"
                    .to_owned(),
            }
        });
        let destination = state.exports.probe_destination().map_err(|error| {
            tracing::warn!(error = %error.detail(), "health check: the export destination failed");
            error.to_string()
        });
        (store, destination)
    })
    .await;
    let (store, destination) = probed.unwrap_or_else(|error| {
        tracing::error!(%error, "the health check stopped");
        let message = "the health check stopped; the server log has the details".to_owned();
        (Err(message.clone()), Err(message))
    });
    let healthy = store.is_ok() && destination.is_ok();
    let body = json!({
        "status": if healthy { "pass" } else { "fail" },
        "checks": {"store": verdict(store), "destination": verdict(destination)},
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut reply = response::fhir_json(status, &body);
    reply.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::header::HeaderValue::from_static("application/health+json"),
    );
    reply
}
