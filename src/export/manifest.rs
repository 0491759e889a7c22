//! The completion manifest.

use serde_json::{Value, json};

use super::job::{FileKind, JobRecord};

/// The manifest of a completed job; file URLs are `{file_url_prefix}/{name}`.
pub fn manifest(record: &JobRecord, file_url_prefix: &str, requires_access_token: bool) -> Value {
    let items = |kind: FileKind| -> Vec<Value> {
        record
            .files
            .iter()
            .filter(|file| file.kind == kind)
            .map(|file| {
                json!({
                    "type": file.type_name,
                    "url": format!("{file_url_prefix}/{}", file.name),
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
