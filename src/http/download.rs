//! Downloads of a completed export's files: resumable with `Range` (one byte range per
//! request, RFC 9110 §14), validated by a strong `ETag` and `If-Range`, and gzip-encoded
//! when the client accepts gzip and asks for the whole file.

use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use warp::Reply;
use warp::http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, HeaderValue, IF_RANGE, LAST_MODIFIED, RANGE, VARY,
};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response as WarpResponse;

use super::{ApiError, AppState};
use crate::sink::{ObjectByteStream, StoredObject};

const NDJSON: &str = "application/fhir+ndjson";
/// Compressed bytes gathered before they are handed to the connection.
const GZIP_CHUNK_BYTES: usize = 64 * 1024;
/// Compressed chunks waiting for a slow client, at most.
const GZIP_CHUNKS_IN_FLIGHT: usize = 4;

/// What a request asks of a file of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ByteRangeRequest {
    /// No usable `Range` (absent, malformed, several ranges, or an `If-Range` that does
    /// not match): the whole file, 200.
    Whole,
    /// These bytes, 206.
    Part(Range<u64>),
    /// A range that starts past the end, 416.
    Unsatisfiable,
}

/// Streams a file: the requested byte range, or the whole file (gzip-compressed on a
/// blocking thread when the client accepts gzip).
pub async fn file(
    state: Arc<AppState>,
    job_id: &str,
    file_name: &str,
    headers: &HeaderMap,
) -> Result<WarpResponse, ApiError> {
    let (files, object) = state.exports.file(job_id, file_name)?;
    let stored = files.describe_object(&object).await?;
    let range_request = match headers.get(IF_RANGE) {
        Some(validator) if validator.as_bytes() != stored.entity_tag.as_bytes() => {
            ByteRangeRequest::Whole
        }
        _ => byte_range_request(headers, stored.size),
    };
    let mut reply = match range_request {
        ByteRangeRequest::Unsatisfiable => {
            let mut reply = WarpResponse::new(Bytes::new().into());
            *reply.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            reply.headers_mut().insert(
                CONTENT_RANGE,
                header_value(&format!("bytes */{}", stored.size)),
            );
            reply
        }
        ByteRangeRequest::Part(range) => {
            let content_range = format!("bytes {}-{}/{}", range.start, range.end - 1, stored.size);
            let length = range.end - range.start;
            let body = files.stream_object(&object, Some(range)).await?;
            let mut reply = streamed(body);
            *reply.status_mut() = StatusCode::PARTIAL_CONTENT;
            let reply_headers = reply.headers_mut();
            reply_headers.insert(CONTENT_RANGE, header_value(&content_range));
            reply_headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
            reply_headers.insert(ETAG, header_value(&stored.entity_tag));
            reply
        }
        ByteRangeRequest::Whole if accepts_gzip(headers) => {
            let body = files.stream_object(&object, None).await?;
            let mut reply = warp::reply::stream(sync_wrapper::SyncStream::new(
                gzip_on_a_blocking_thread(body),
            ))
            .into_response();
            let reply_headers = reply.headers_mut();
            reply_headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            reply_headers.insert(ETAG, header_value(&gzip_entity_tag(&stored)));
            reply
        }
        ByteRangeRequest::Whole => {
            let body = files.stream_object(&object, None).await?;
            let mut reply = streamed(body);
            let reply_headers = reply.headers_mut();
            reply_headers.insert(CONTENT_LENGTH, HeaderValue::from(stored.size));
            reply_headers.insert(ETAG, header_value(&stored.entity_tag));
            reply
        }
    };
    let reply_headers = reply.headers_mut();
    reply_headers.insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    reply_headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    reply_headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    reply_headers.insert(
        LAST_MODIFIED,
        header_value(&stored.last_modified.to_http_date()),
    );
    Ok(reply)
}

/// The one `Range: bytes=…` of `headers` resolved against a file of `size` bytes.
fn byte_range_request(headers: &HeaderMap, size: u64) -> ByteRangeRequest {
    let mut ranges = headers.get_all(RANGE).iter();
    match (ranges.next(), ranges.next()) {
        (Some(range), None) => range
            .to_str()
            .map_or(ByteRangeRequest::Whole, |text| parse_byte_range(text, size)),
        _ => ByteRangeRequest::Whole,
    }
}

/// Parses `bytes=first-last`, `bytes=first-` or `bytes=-suffix_length`; anything else
/// (other units, several ranges, malformed text) asks for the whole file.
fn parse_byte_range(header: &str, size: u64) -> ByteRangeRequest {
    let Some((unit, ranges)) = header.split_once('=') else {
        return ByteRangeRequest::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || ranges.contains(',') {
        return ByteRangeRequest::Whole;
    }
    let Some((first, last)) = ranges.trim().split_once('-') else {
        return ByteRangeRequest::Whole;
    };
    match (decimal(first.trim()), last.trim()) {
        (None, suffix) if first.trim().is_empty() => match decimal(suffix) {
            Some(0) => ByteRangeRequest::Unsatisfiable,
            Some(_) if size == 0 => ByteRangeRequest::Unsatisfiable,
            Some(length) => ByteRangeRequest::Part(size.saturating_sub(length)..size),
            None => ByteRangeRequest::Whole,
        },
        (Some(first), "") if first < size => ByteRangeRequest::Part(first..size),
        (Some(_), "") => ByteRangeRequest::Unsatisfiable,
        (Some(first), last) => match decimal(last) {
            Some(last) if last < first => ByteRangeRequest::Whole,
            Some(_) if first >= size => ByteRangeRequest::Unsatisfiable,
            Some(last) => ByteRangeRequest::Part(first..last.saturating_add(1).min(size)),
            None => ByteRangeRequest::Whole,
        },
        (None, _) => ByteRangeRequest::Whole,
    }
}

/// A non-empty run of ASCII digits as a number.
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Whether `Accept-Encoding` lists gzip without `q=0`.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|parameter| {
                matches!(parameter.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000")
            });
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

/// The gzip representation is a different sequence of bytes, so it has its own tag (the
/// same input always compresses to the same bytes).
fn gzip_entity_tag(stored: &StoredObject) -> String {
    format!("{}-gzip\"", stored.entity_tag.trim_end_matches('"'))
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn streamed(body: ObjectByteStream) -> WarpResponse {
    let body = body.map(|chunk| chunk.map_err(std::io::Error::other));
    warp::reply::stream(sync_wrapper::SyncStream::new(body)).into_response()
}

/// Compresses `source` on a blocking thread, handing chunks over a bounded channel so a
/// slow client holds back the compressor rather than filling memory.
fn gzip_on_a_blocking_thread(
    source: ObjectByteStream,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let (sender, mut receiver) = tokio::sync::mpsc::channel(GZIP_CHUNKS_IN_FLIGHT);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || compress_into(source, &runtime, &sender));
    futures_util::stream::poll_fn(move |context| receiver.poll_recv(context))
}

fn compress_into(
    mut source: ObjectByteStream,
    runtime: &tokio::runtime::Handle,
    sender: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(GZIP_CHUNK_BYTES),
        flate2::Compression::default(),
    );
    while let Some(chunk) = runtime.block_on(source.next()) {
        let written = chunk
            .map_err(std::io::Error::other)
            .and_then(|bytes| encoder.write_all(&bytes));
        if let Err(error) = written {
            let _ = sender.blocking_send(Err(error));
            return;
        }
        if encoder.get_ref().len() >= GZIP_CHUNK_BYTES {
            let compressed = std::mem::take(encoder.get_mut());
            if sender.blocking_send(Ok(Bytes::from(compressed))).is_err() {
                return;
            }
        }
    }
    let last = encoder.finish().map(Bytes::from);
    if last.as_ref().is_ok_and(Bytes::is_empty) {
        return;
    }
    let _ = sender.blocking_send(last);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(header: &str, size: u64) -> ByteRangeRequest {
        parse_byte_range(header, size)
    }

    #[test]
    fn byte_ranges_resolve_against_the_file_size() {
        use ByteRangeRequest::{Part, Unsatisfiable, Whole};
        assert_eq!(parsed("bytes=0-9", 100), Part(0..10));
        assert_eq!(parsed("bytes=90-200", 100), Part(90..100));
        assert_eq!(parsed("bytes=10-", 100), Part(10..100));
        assert_eq!(parsed("bytes=-10", 100), Part(90..100));
        assert_eq!(parsed("bytes=-1000", 100), Part(0..100));
        assert_eq!(parsed("BYTES = 5-5", 100), Part(5..6));
        assert_eq!(parsed("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parsed("bytes=100-120", 100), Unsatisfiable);
        assert_eq!(parsed("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parsed("bytes=-5", 0), Unsatisfiable);
        assert_eq!(parsed("bytes=0-", 0), Unsatisfiable);
        for ignored in [
            "bytes=5-1",
            "bytes=0-1,5-9",
            "items=0-9",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes 0-9",
        ] {
            assert_eq!(parsed(ignored, 100), Whole, "{ignored}");
        }
    }
}
