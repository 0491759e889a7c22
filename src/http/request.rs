//! Capturing a raw HTTP request with a bounded body.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use warp::Filter;
use warp::http::{HeaderMap, Method};

use super::ApiError;

/// A request as it arrived: what the router parses into an interaction.
pub struct CapturedRequest {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Result<Bytes, ApiError>,
}

/// Captures every request; a body over `max_body_bytes` is not read past the limit and
/// becomes `ApiError::PayloadTooLarge`, one not read whole within `body_timeout` becomes
/// `ApiError::RequestTimeout`.
pub fn capture(
    max_body_bytes: usize,
    body_timeout: Duration,
) -> impl Filter<Extract = (CapturedRequest,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query, headers: HeaderMap, body| async move {
                let deadline = BodyDeadline::after(body_timeout);
                let declared_too_large = headers
                    .get(warp::http::header::CONTENT_LENGTH)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<u64>().ok())
                    .is_some_and(|length| length > max_body_bytes as u64);
                let body = if declared_too_large {
                    drain(body, deadline).await;
                    Err(ApiError::PayloadTooLarge {
                        limit: max_body_bytes,
                    })
                } else {
                    read_bounded(body, max_body_bytes, deadline).await
                };
                CapturedRequest {
                    method,
                    path: path.as_str().to_owned(),
                    query,
                    headers,
                    body,
                }
            },
        )
}

/// A body that sends nothing for this long is abandoned with 408.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a refused body is read and discarded so the client gets to see the 413
/// instead of a broken connection; past this the connection is simply closed.
const DRAIN_LIMIT_BYTES: usize = 64 * 1024 * 1024;

/// When the whole body must have arrived.
#[derive(Clone, Copy)]
struct BodyDeadline {
    at: tokio::time::Instant,
    whole_body: Duration,
}

impl BodyDeadline {
    fn after(whole_body: Duration) -> BodyDeadline {
        BodyDeadline {
            at: tokio::time::Instant::now() + whole_body,
            whole_body,
        }
    }
}

async fn next_chunk<S, B>(
    body: &mut std::pin::Pin<&mut S>,
    deadline: BodyDeadline,
) -> Result<Option<B>, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
{
    let idle_deadline = tokio::time::Instant::now() + BODY_IDLE_TIMEOUT;
    match tokio::time::timeout_at(idle_deadline.min(deadline.at), body.next()).await {
        Err(_) if idle_deadline < deadline.at => Err(ApiError::RequestTimeout(format!(
            "the request body stalled for {}s",
            BODY_IDLE_TIMEOUT.as_secs()
        ))),
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the request body did not arrive within {}s",
            deadline.whole_body.as_secs_f64()
        ))),
        Ok(None) => Ok(None),
        Ok(Some(Err(error))) => Err(ApiError::BadRequest(format!(
            "could not read request body: {error}"
        ))),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
    }
}

async fn read_bounded<S, B>(
    body: S,
    max_body_bytes: usize,
    deadline: BodyDeadline,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut collected = BytesMut::new();
    while let Some(mut chunk) = next_chunk(&mut body, deadline).await? {
        if collected.len() + chunk.remaining() > max_body_bytes {
            drain_rest(&mut body, collected.len() + chunk.remaining(), deadline).await;
            return Err(ApiError::PayloadTooLarge {
                limit: max_body_bytes,
            });
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            collected.extend_from_slice(piece);
            let length = piece.len();
            chunk.advance(length);
        }
    }
    Ok(collected.freeze())
}

async fn drain<S, B>(body: S, deadline: BodyDeadline)
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    drain_rest(&mut body, 0, deadline).await;
}

async fn drain_rest<S, B>(
    body: &mut std::pin::Pin<&mut S>,
    mut drained: usize,
    deadline: BodyDeadline,
) where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    while drained < DRAIN_LIMIT_BYTES {
        match next_chunk(body, deadline).await {
            Ok(Some(chunk)) => drained += chunk.remaining(),
            Ok(None) | Err(_) => return,
        }
    }
}
