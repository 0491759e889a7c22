//! The completion manifest.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::job::{FileKind, JobRecord};

/// Where each file of a manifest is downloaded from.
pub enum FileUrls<'a> {
    /// `{prefix}/{file name}`: the server's download endpoint or a local folder.
    UnderPrefix(&'a str),
    /// Pre-signed URLs by file name.
    Signed(&'a HashMap<String, String>),
}

/// The manifest of a completed job.
pub fn manifest(record: &JobRecord, urls: FileUrls<'_>, requires_access_token: bool) -> Value {
    let url_of = |name: &str| match &urls {
        FileUrls::UnderPrefix(prefix) => format!("{prefix}/{name}"),
        FileUrls::Signed(signed) => signed.get(name).cloned().unwrap_or_default(),
    };
    let items = |kind: FileKind| -> Vec<Value> {
        record
            .files
            .iter()
            .filter(|file| file.kind == kind)
            .map(|file| {
                json!({
                    "type": file.type_name,
                    "url": url_of(&file.name),
                    "count": file.count,
                })
            })
            .collect()
    };
    json!({
        "transactionTime": record.transaction_time.to_fhir_string(),
        "request": record.request_url,
        "requiresAccessToken": requires_access_token,
        "output": items(FileKind::Output),
        "deleted": items(FileKind::Deleted),
        "error": items(FileKind::Error),
    })
}
