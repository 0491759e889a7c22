//! The one bulk-data client of the end-to-end tests: kick-off, status polling to
//! completion, manifest checks and file downloads, as a Bulk Data client drives a server.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{FHIR_JSON, FhirClient, Reply};

pub const NDJSON: &str = "application/fhir+ndjson";
pub const EXPORT_DEADLINE: Duration = Duration::from_secs(120);
pub const EAGER_POLL_INTERVAL: Duration = Duration::from_millis(10);
pub const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(50);

pub type ResourceKey = (String, String);

pub fn key(resource_type: &str, id: &str) -> ResourceKey {
    (resource_type.to_owned(), id.to_owned())
}

pub fn parse_instant(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|error| panic!("'{text}' is not a FHIR instant: {error}"))
}

pub fn parse_http_date(text: &str) -> OffsetDateTime {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(text, &format)
        .unwrap_or_else(|error| panic!("'{text}' is not an HTTP date: {error}"))
        .assume_utc()
}

pub fn gunzip(compressed: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(compressed)
        .read_to_end(&mut plain)
        .expect("decoding gzip");
    plain
}

/// The parts of an exported resource line the checks need.
#[derive(Debug, Clone)]
pub struct ResourceHeader {
    pub resource_type: String,
    pub id: String,
    pub version_id: String,
    pub last_updated: String,
}

/// A whole line parsed, borrowing the few fields kept (fast even in debug builds).
#[derive(Deserialize)]
pub struct ResourceHeaderText<'a> {
    #[serde(rename = "resourceType", borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub meta: ResourceMetaText<'a>,
}

#[derive(Deserialize)]
pub struct ResourceMetaText<'a> {
    #[serde(rename = "versionId", borrow)]
    pub version_id: Cow<'a, str>,
    #[serde(rename = "lastUpdated", borrow)]
    pub last_updated: Cow<'a, str>,
}

pub fn resource_header(line: &str) -> ResourceHeader {
    let text: ResourceHeaderText<'_> = serde_json::from_str(line).unwrap_or_else(|error| {
        panic!(
            "exported line is not a resource with id and meta: {error}: {}",
            line.chars().take(300).collect::<String>()
        )
    });
    ResourceHeader {
        resource_type: text.resource_type.into_owned(),
        id: text.id.into_owned(),
        version_id: text.meta.version_id.into_owned(),
        last_updated: text.meta.last_updated.into_owned(),
    }
}

/// A kick-off as a bulk client sends it.
#[derive(Debug, Clone)]
pub struct KickOffRequest {
    pub method: Method,
    pub path: String,
    pub accept: Option<&'static str>,
    pub prefer: Vec<&'static str>,
    pub parameters: Option<Value>,
}

impl KickOffRequest {
    pub fn get(path_and_query: &str) -> KickOffRequest {
        KickOffRequest {
            method: Method::GET,
            path: path_and_query.to_owned(),
            accept: Some(FHIR_JSON),
            prefer: vec!["respond-async"],
            parameters: None,
        }
    }

    pub fn post(path: &str, parameters: Value) -> KickOffRequest {
        KickOffRequest {
            method: Method::POST,
            parameters: Some(parameters),
            ..KickOffRequest::get(path)
        }
    }

    pub fn with_accept(mut self, accept: Option<&'static str>) -> KickOffRequest {
        self.accept = accept;
        self
    }

    pub fn with_prefer(mut self, prefer: &[&'static str]) -> KickOffRequest {
        self.prefer = prefer.to_vec();
        self
    }

    /// The manifest's `request`: the kick-off URL (a POST's parameters are in its body).
    pub fn request_url(&self, base_url: &str) -> String {
        format!("{base_url}{}", self.path)
    }
}

/// A `Parameters` body; `patient` values become `valueReference`s.
pub fn parameters(pairs: &[(&str, &str)]) -> Value {
    let parameter: Vec<Value> = pairs
        .iter()
        .map(|(name, value)| {
            if *name == "patient" {
                json!({"name": name, "valueReference": {"reference": value}})
            } else {
                json!({"name": name, "valueString": value})
            }
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polling {
    HonoringRetryAfter,
    Eagerly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downloads {
    ComparingGzip,
    PlainOnly,
}

pub struct Completion {
    pub status_url: String,
    pub manifest: Value,
    pub progress_seen: Vec<String>,
}

impl Completion {
    /// A completion known only by its status URL and manifest.
    pub fn of_manifest(status_url: &str, manifest: Value) -> Completion {
        Completion {
            status_url: status_url.to_owned(),
            manifest,
            progress_seen: Vec::new(),
        }
    }

    pub fn transaction_time(&self) -> String {
        self.manifest["transactionTime"]
            .as_str()
            .expect("transactionTime is a string")
            .to_owned()
    }
}

#[derive(Debug)]
pub struct ExportFile {
    pub type_name: String,
    pub url: String,
    pub count: u64,
    pub lines: Vec<String>,
    /// One per line in resource files; empty in `deleted` and `error` files.
    pub headers: Vec<ResourceHeader>,
}

pub struct Export {
    pub completion: Completion,
    pub output: Vec<ExportFile>,
    pub deleted: Vec<ExportFile>,
    pub error: Vec<ExportFile>,
}

impl Export {
    pub fn transaction_time(&self) -> String {
        self.completion.transaction_time()
    }

    /// Each type's lines, its files concatenated in manifest order.
    pub fn lines_by_type(&self) -> BTreeMap<String, Vec<String>> {
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for file in &self.output {
            lines
                .entry(file.type_name.clone())
                .or_default()
                .extend(file.lines.iter().cloned());
        }
        lines
    }

    pub fn counts_by_type(&self) -> BTreeMap<String, u64> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for file in &self.output {
            *counts.entry(file.type_name.clone()).or_default() += file.count;
        }
        counts
    }

    /// Every exported resource by (type, id); panics on a resource exported twice.
    pub fn output_by_key(&self) -> BTreeMap<ResourceKey, String> {
        let mut resources = BTreeMap::new();
        for file in &self.output {
            for (line, header) in file.lines.iter().zip(&file.headers) {
                let resource_key = key(&header.resource_type, &header.id);
                assert!(
                    resources
                        .insert(resource_key.clone(), line.clone())
                        .is_none(),
                    "{resource_key:?} is exported twice"
                );
            }
        }
        resources
    }

    pub fn output_keys(&self) -> BTreeSet<ResourceKey> {
        self.output_by_key().into_keys().collect()
    }

    /// `Type/id` of every DELETE entry in the `deleted` files.
    pub fn deleted_references(&self) -> BTreeSet<String> {
        let mut references = BTreeSet::new();
        for file in &self.deleted {
            for line in &file.lines {
                let bundle: Value = serde_json::from_str(line).expect("a deleted line is JSON");
                assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
                assert_eq!(bundle["type"], "transaction", "{bundle}");
                let entries = bundle["entry"].as_array().expect("Bundle.entry");
                assert!(!entries.is_empty(), "{bundle}");
                for entry in entries {
                    assert_eq!(entry["request"]["method"], "DELETE", "{bundle}");
                    let url = entry["request"]["url"].as_str().expect("request.url");
                    assert!(
                        references.insert(url.to_owned()),
                        "{url} is listed as deleted twice"
                    );
                }
            }
        }
        references
    }
}

pub fn assert_manifest_shape(manifest: &Value, base_url: &str, expected_request_url: &str) {
    parse_instant(
        manifest["transactionTime"]
            .as_str()
            .unwrap_or_else(|| panic!("manifest has no transactionTime: {manifest}")),
    );
    assert_eq!(manifest["request"], expected_request_url, "{manifest}");
    assert!(
        manifest["requiresAccessToken"].is_boolean(),
        "requiresAccessToken is not a boolean: {manifest}"
    );
    for (field, fixed_type) in [
        ("output", None),
        ("deleted", Some("Bundle")),
        ("error", Some("OperationOutcome")),
    ] {
        let items = manifest[field]
            .as_array()
            .unwrap_or_else(|| panic!("manifest.{field} is not an array: {manifest}"));
        for item in items {
            let type_name = item["type"]
                .as_str()
                .unwrap_or_else(|| panic!("{field} item has no type: {item}"));
            if let Some(fixed_type) = fixed_type {
                assert_eq!(type_name, fixed_type, "{item}");
            }
            let url = item["url"]
                .as_str()
                .unwrap_or_else(|| panic!("{field} item has no url: {item}"));
            assert!(
                url.starts_with(&format!("{base_url}/")),
                "{url} is not an absolute URL under {base_url}"
            );
            assert!(item["count"].is_u64(), "{field} item has no count: {item}");
        }
    }
}

/// Output files of one type are `{Type}-1.ndjson`, `{Type}-2.ndjson`, … in manifest
/// order, none empty and none over `max_per_file` lines.
pub fn assert_output_files_are_numbered_per_type(export: &Export, max_per_file: u64) {
    let mut next_number: BTreeMap<&str, u64> = BTreeMap::new();
    for file in &export.output {
        let number = next_number.entry(&file.type_name).or_insert(0);
        *number += 1;
        let expected_name = format!("/{}-{number}.ndjson", file.type_name);
        assert!(
            file.url.ends_with(&expected_name),
            "{} should end with {expected_name}",
            file.url
        );
        assert!(
            (1..=max_per_file).contains(&file.count),
            "{} has {} lines; the limit is {max_per_file}",
            file.url,
            file.count
        );
    }
}

/// A bulk data client bound to one server.
pub struct BulkClient {
    pub base_url: String,
    pub relative: FhirClient,
    pub absolute: FhirClient,
}

impl BulkClient {
    pub fn new(base_url: &str) -> BulkClient {
        BulkClient {
            base_url: base_url.to_owned(),
            relative: FhirClient::new(base_url),
            absolute: FhirClient::new(""),
        }
    }

    pub fn send_kick_off(&self, request: &KickOffRequest) -> Reply {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(accept) = request.accept {
            headers.push(("Accept", accept));
        }
        for prefer in &request.prefer {
            headers.push(("Prefer", prefer));
        }
        match &request.parameters {
            Some(parameters) => {
                self.relative
                    .send_json(request.method.clone(), &request.path, &headers, parameters)
            }
            None => self
                .relative
                .send(request.method.clone(), &request.path, &headers, None),
        }
    }

    /// Kicks off and returns the absolute status URL from `Content-Location`.
    pub fn kick_off(&self, request: &KickOffRequest) -> String {
        let reply = self.send_kick_off(request);
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "kick-off {} {} was refused: {}",
            request.method,
            request.path,
            reply.text
        );
        let status_url = reply.required_header("content-location").to_owned();
        assert!(
            status_url.starts_with(&format!("{}/", self.base_url)),
            "Content-Location '{status_url}' is not an absolute URL under {}",
            self.base_url
        );
        if !reply.text.is_empty() {
            assert_eq!(reply.json()["resourceType"], "OperationOutcome");
        }
        status_url
    }

    pub fn status(&self, status_url: &str) -> Reply {
        self.absolute.send(
            Method::GET,
            status_url,
            &[("Accept", "application/json")],
            None,
        )
    }

    pub fn cancel(&self, status_url: &str) -> Reply {
        self.absolute.send(
            Method::DELETE,
            status_url,
            &[("Accept", "application/json")],
            None,
        )
    }

    /// Polls the status URL every [`STATUS_POLL_INTERVAL`] until the job is no longer in
    /// progress; returns the final reply (a manifest or a failure) and how long that took.
    pub fn poll_until_finished(&self, status_url: &str, limit: Duration) -> (Reply, Duration) {
        let started = Instant::now();
        loop {
            let reply = self.status(status_url);
            if reply.status != StatusCode::ACCEPTED {
                return (reply, started.elapsed());
            }
            assert_in_progress_reply(&reply);
            assert!(
                started.elapsed() < limit,
                "{status_url} was still in progress after {limit:?} (X-Progress: {:?})",
                reply.header("x-progress")
            );
            std::thread::sleep(STATUS_POLL_INTERVAL);
        }
    }

    pub fn poll_until_complete(&self, status_url: &str, polling: Polling) -> Completion {
        let deadline = Instant::now() + EXPORT_DEADLINE;
        let mut progress_seen = Vec::new();
        loop {
            let reply = self.status(status_url);
            match reply.status {
                StatusCode::ACCEPTED => {
                    let retry_after = assert_in_progress_reply(&reply);
                    progress_seen.push(reply.required_header("x-progress").to_owned());
                    let pause = match polling {
                        Polling::HonoringRetryAfter => retry_after,
                        Polling::Eagerly => EAGER_POLL_INTERVAL,
                    };
                    assert!(
                        Instant::now() + pause < deadline,
                        "{status_url} still in progress after {EXPORT_DEADLINE:?}: {progress_seen:?}"
                    );
                    std::thread::sleep(pause);
                }
                StatusCode::OK => {
                    let content_type = reply.required_header("content-type");
                    assert!(
                        content_type.starts_with("application/json"),
                        "a completed status has Content-Type {content_type}"
                    );
                    let expires = parse_http_date(reply.required_header("expires"));
                    assert!(
                        expires > OffsetDateTime::now_utc() - time::Duration::seconds(1),
                        "Expires {expires} is in the past"
                    );
                    return Completion {
                        status_url: status_url.to_owned(),
                        manifest: reply.json(),
                        progress_seen,
                    };
                }
                other => panic!("status of {status_url} is {other}: {}", reply.text),
            }
        }
    }

    /// GETs an export file by its absolute URL (the server's or a signed storage URL),
    /// asserting 200, the ndjson Content-Type and no Content-Encoding; returns its bytes.
    pub fn fetch_ndjson(&self, url: &str) -> Vec<u8> {
        let plain = self.absolute.get_raw(url, &[("Accept", NDJSON)]);
        assert_eq!(plain.status, StatusCode::OK, "GET {url}");
        assert_eq!(
            plain.header("content-type"),
            Some(NDJSON),
            "Content-Type of {url}"
        );
        assert_eq!(plain.header("content-encoding"), None, "{url}");
        plain.body
    }

    pub fn download_file(&self, item: &Value, downloads: Downloads) -> ExportFile {
        let url = item["url"].as_str().expect("a file url");
        let type_name = item["type"].as_str().expect("a file type").to_owned();
        let plain_body = self.fetch_ndjson(url);
        if downloads == Downloads::ComparingGzip {
            let compressed = self
                .absolute
                .get_raw(url, &[("Accept", NDJSON), ("Accept-Encoding", "gzip")]);
            assert_eq!(compressed.status, StatusCode::OK, "gzip GET {url}");
            assert_eq!(compressed.header("content-encoding"), Some("gzip"), "{url}");
            assert!(
                compressed
                    .header("content-type")
                    .unwrap_or_default()
                    .starts_with(NDJSON)
            );
            assert!(
                gunzip(&compressed.body) == plain_body,
                "the gzip download of {url} decodes to different bytes"
            );
            let refused = self.absolute.get_raw(
                url,
                &[
                    ("Accept", NDJSON),
                    ("Accept-Encoding", "gzip;q=0, identity"),
                ],
            );
            assert_eq!(refused.header("content-encoding"), None, "{url}");
            assert!(
                refused.body == plain_body,
                "{url} with gzip refused differs"
            );
        }
        let text = String::from_utf8(plain_body).expect("an export file is UTF-8");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{url} does not end with a newline"
        );
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        assert!(
            lines.iter().all(|line| !line.trim().is_empty()),
            "{url} has an empty line"
        );
        let count = item["count"].as_u64().expect("a file count");
        assert_eq!(lines.len() as u64, count, "{url}: manifest count");
        let mut headers = Vec::new();
        for line in &lines {
            let resource_type = match type_name.as_str() {
                "Bundle" | "OperationOutcome" => serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|error| panic!("{url}: a line is not JSON: {error}"))
                    ["resourceType"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                _ => {
                    let header = resource_header(line);
                    let resource_type = header.resource_type.clone();
                    headers.push(header);
                    resource_type
                }
            };
            assert_eq!(resource_type, type_name, "{url} mixes types");
        }
        ExportFile {
            type_name,
            url: url.to_owned(),
            count,
            lines,
            headers,
        }
    }

    pub fn download(&self, completion: Completion, downloads: Downloads) -> Export {
        let files = |field: &str| -> Vec<ExportFile> {
            completion.manifest[field]
                .as_array()
                .unwrap_or_else(|| panic!("manifest.{field} is not an array"))
                .iter()
                .map(|item| self.download_file(item, downloads))
                .collect()
        };
        let (output, deleted, error) = (files("output"), files("deleted"), files("error"));
        Export {
            completion,
            output,
            deleted,
            error,
        }
    }

    /// The whole flow: kick-off, polling, manifest checks, every file downloaded.
    /// One export kicked off by GET (polling as Retry-After says) and one by POST (polling
    /// eagerly), both downloaded and compared with their gzip forms.
    pub fn export_by_get_and_post(
        &self,
        by_get: &KickOffRequest,
        by_post: &KickOffRequest,
        max_per_file: u64,
    ) -> (Export, Export) {
        (
            self.export(
                by_get,
                Polling::HonoringRetryAfter,
                Downloads::ComparingGzip,
                max_per_file,
            ),
            self.export(
                by_post,
                Polling::Eagerly,
                Downloads::ComparingGzip,
                max_per_file,
            ),
        )
    }

    pub fn export(
        &self,
        request: &KickOffRequest,
        polling: Polling,
        downloads: Downloads,
        max_per_file: u64,
    ) -> Export {
        let status_url = self.kick_off(request);
        let completion = self.poll_until_complete(&status_url, polling);
        assert_manifest_shape(
            &completion.manifest,
            &self.base_url,
            &request.request_url(&self.base_url),
        );
        let export = self.download(completion, downloads);
        assert_output_files_are_numbered_per_type(&export, max_per_file);
        export
    }
}

/// A 202 status reply has `X-Progress` (under 100 characters) and `Retry-After` in
/// seconds; returns the delay.
pub fn assert_in_progress_reply(reply: &Reply) -> Duration {
    let progress = reply.required_header("x-progress");
    assert!(
        !progress.is_empty() && progress.chars().count() < 100,
        "X-Progress '{progress}' is empty or 100 characters or more"
    );
    let retry_after = reply.required_header("retry-after");
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After '{retry_after}' is not delay-seconds"));
    assert!(
        (1..=120).contains(&seconds),
        "Retry-After {seconds}s is unreasonable"
    );
    Duration::from_secs(seconds)
}
