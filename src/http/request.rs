//! Capturing a raw HTTP request with a bounded body.

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
/// becomes `ApiError::PayloadTooLarge`.
pub fn capture(
    max_body_bytes: usize,
) -> impl Filter<Extract = (CapturedRequest,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query, headers: HeaderMap, body| async move {
                let declared_too_large = headers
                    .get(warp::http::header::CONTENT_LENGTH)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<u64>().ok())
                    .is_some_and(|length| length > max_body_bytes as u64);
                let body = if declared_too_large {
                    Err(ApiError::PayloadTooLarge {
                        limit: max_body_bytes,
                    })
                } else {
                    read_bounded(body, max_body_bytes).await
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

async fn read_bounded<S, B>(body: S, max_body_bytes: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|error| {
            ApiError::BadRequest(format!("could not read request body: {error}"))
        })?;
        if collected.len() + chunk.remaining() > max_body_bytes {
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
