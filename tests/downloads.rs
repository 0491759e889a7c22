//! Resumable downloads of export files from the in-process server over a real socket:
//! byte ranges (206, 416), a strong ETag, `If-Range`, and gzip only for whole files.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::{FhirClient, spawn_app};

const PATIENT_COUNT: usize = 300;
const EXPORT_DEADLINE: Duration = Duration::from_secs(120);
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(50);
const IDENTITY: (&str, &str) = ("Accept-Encoding", "identity");

/// A server (`_app`, kept running) holding one exported Patient file: its download path
/// (relative to the base URL) and its whole bytes as a plain download returns them.
struct ExportedFile<App> {
    _app: App,
    client: FhirClient,
    path: String,
    whole: Vec<u8>,
    entity_tag: String,
}

fn export_patients() -> ExportedFile<impl Sized> {
    let app = spawn_app();
    for index in 0..PATIENT_COUNT {
        let reply = app.client.put_json(
            &format!("/Patient/download-{index}"),
            &json!({
                "resourceType": "Patient",
                "id": format!("download-{index}"),
                "name": [{"family": format!("Family-{index}"), "given": ["Resumable", "Download"]}],
            }),
        );
        assert!(reply.status.is_success(), "PUT failed: {}", reply.text);
    }
    let kick_off = app.client.send(
        reqwest::Method::GET,
        "/$export",
        &[
            ("Accept", "application/fhir+json"),
            ("Prefer", "respond-async"),
        ],
        None,
    );
    assert_eq!(kick_off.status, StatusCode::ACCEPTED, "{}", kick_off.text);
    let status_path = relative(&app.client, kick_off.required_header("content-location"));
    let deadline = Instant::now() + EXPORT_DEADLINE;
    let manifest = loop {
        let status = app.client.get(&status_path);
        match status.status {
            StatusCode::ACCEPTED if Instant::now() < deadline => {
                std::thread::sleep(STATUS_POLL_INTERVAL)
            }
            StatusCode::OK => break status.json(),
            other => panic!("export status {other}: {}", status.text),
        }
    };
    let outputs = manifest["output"]
        .as_array()
        .expect("a manifest output list");
    assert_eq!(outputs.len(), 1, "one Patient file: {manifest}");
    let path = relative(&app.client, outputs[0]["url"].as_str().expect("a file URL"));
    let plain = app.client.get_raw(&path, &[IDENTITY]);
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.header("accept-ranges"), Some("bytes"));
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(
        plain.header("content-length"),
        Some(plain.body.len().to_string().as_str())
    );
    assert_eq!(
        plain.body.iter().filter(|byte| **byte == b'\n').count(),
        PATIENT_COUNT
    );
    let entity_tag = plain.header("etag").expect("an ETag").to_owned();
    assert!(
        entity_tag.starts_with('"') && entity_tag.ends_with('"') && entity_tag.len() > 2,
        "'{entity_tag}' is not a strong ETag"
    );
    ExportedFile {
        client: app.client.clone(),
        _app: app,
        path,
        whole: plain.body,
        entity_tag,
    }
}

fn relative(client: &FhirClient, url: &str) -> String {
    url.strip_prefix(&client.base_url)
        .unwrap_or_else(|| panic!("{url} is not under {}", client.base_url))
        .to_owned()
}

impl<App> ExportedFile<App> {
    fn size(&self) -> usize {
        self.whole.len()
    }

    /// A 206 for `range` carrying exactly `expected` bytes of the file.
    fn assert_partial(&self, range: &str, expected: std::ops::Range<usize>) {
        let reply = self
            .client
            .get_raw(&self.path, &[("Range", range), IDENTITY]);
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "Range: {range}");
        assert_eq!(
            reply.header("content-range"),
            Some(
                format!(
                    "bytes {}-{}/{}",
                    expected.start,
                    expected.end - 1,
                    self.size()
                )
                .as_str()
            ),
            "Range: {range}"
        );
        assert_eq!(reply.header("accept-ranges"), Some("bytes"));
        assert_eq!(reply.header("etag"), Some(self.entity_tag.as_str()));
        assert_eq!(reply.header("content-encoding"), None);
        assert_eq!(reply.body, &self.whole[expected], "Range: {range}");
    }
}

#[test]
fn byte_ranges_answer_206_with_exactly_the_requested_bytes() {
    let file = export_patients();
    let size = file.size();
    assert!(size > 20_000, "the file is too small to range over: {size}");
    file.assert_partial("bytes=0-99", 0..100);
    file.assert_partial("bytes=100-", 100..size);
    file.assert_partial("bytes=-50", size - 50..size);
    file.assert_partial(&format!("bytes=1000-{}", size * 2), 1000..size);
    file.assert_partial(&format!("bytes={}-{}", size - 1, size - 1), size - 1..size);
    file.assert_partial("bytes=-100000000", 0..size);

    let gzip_accepted = file.client.get_raw(
        &file.path,
        &[("Range", "bytes=10-19"), ("Accept-Encoding", "gzip")],
    );
    assert_eq!(gzip_accepted.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        gzip_accepted.header("content-encoding"),
        None,
        "a 206 is served from the uncompressed bytes"
    );
    assert_eq!(gzip_accepted.body, &file.whole[10..20]);
}

#[test]
fn unsatisfiable_ranges_answer_416_with_the_size() {
    let file = export_patients();
    let size = file.size();
    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
        "bytes=-0".to_owned(),
    ] {
        let reply = file
            .client
            .get_raw(&file.path, &[("Range", range.as_str())]);
        assert_eq!(
            reply.status,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "Range: {range}"
        );
        assert_eq!(
            reply.header("content-range"),
            Some(format!("bytes */{size}").as_str())
        );
        assert_eq!(reply.header("accept-ranges"), Some("bytes"));
    }
    for ignored in ["bytes=50-10", "bytes=0-1,5-9", "lines=0-10", "bytes=x-"] {
        let reply = file
            .client
            .get_raw(&file.path, &[("Range", ignored), IDENTITY]);
        assert_eq!(reply.status, StatusCode::OK, "Range: {ignored}");
        assert_eq!(reply.body, file.whole, "Range: {ignored}");
    }
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped_while_the_etag_matches() {
    let file = export_patients();
    let size = file.size();
    let again = file.client.get_raw(&file.path, &[IDENTITY]);
    assert_eq!(
        again.header("etag"),
        Some(file.entity_tag.as_str()),
        "the ETag is stable across requests"
    );

    let chunk = 7_919;
    let mut resumed = Vec::new();
    while resumed.len() < size {
        let range = format!("bytes={}-{}", resumed.len(), resumed.len() + chunk - 1);
        let reply = file.client.get_raw(
            &file.path,
            &[
                ("Range", range.as_str()),
                ("If-Range", file.entity_tag.as_str()),
            ],
        );
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "Range: {range}");
        assert!(!reply.body.is_empty());
        resumed.extend_from_slice(&reply.body);
    }
    assert_eq!(resumed, file.whole);

    for stale in [
        "\"another-version\"",
        "W/\"weak\"",
        "Tue, 01 Dec 2026 06:00:00 GMT",
    ] {
        let reply = file.client.get_raw(
            &file.path,
            &[("Range", "bytes=100-199"), ("If-Range", stale), IDENTITY],
        );
        assert_eq!(reply.status, StatusCode::OK, "If-Range: {stale}");
        assert_eq!(reply.header("content-range"), None);
        assert_eq!(reply.body, file.whole, "If-Range: {stale}");
    }
}

#[test]
fn a_whole_gzip_download_has_its_own_strong_etag_and_decodes_to_the_file() {
    let file = export_patients();
    let compressed = file
        .client
        .get_raw(&file.path, &[("Accept-Encoding", "gzip")]);
    assert_eq!(compressed.status, StatusCode::OK);
    assert_eq!(compressed.header("content-encoding"), Some("gzip"));
    assert_eq!(compressed.header("accept-ranges"), Some("bytes"));
    let gzip_tag = compressed.header("etag").expect("an ETag").to_owned();
    assert!(gzip_tag.starts_with('"') && gzip_tag.ends_with('"'));
    assert_ne!(gzip_tag, file.entity_tag);
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(compressed.body.as_slice())
        .read_to_end(&mut plain)
        .expect("decoding gzip");
    assert_eq!(plain, file.whole);
    assert!(compressed.body.len() < file.size());
    let compressed_again = file
        .client
        .get_raw(&file.path, &[("Accept-Encoding", "gzip")]);
    assert_eq!(compressed_again.header("etag"), Some(gzip_tag.as_str()));
    assert_eq!(
        compressed_again.body, compressed.body,
        "the same file compresses to the same bytes, as its strong ETag promises"
    );
}
