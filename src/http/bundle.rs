//! `POST /fhir` with a `batch` (entries independent) or `transaction` (all or nothing,
//! `urn:uuid:` references resolved to the assigned ids) Bundle.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::resource::{IdRule, prepare_parsed, run_blocking};
use super::response::{self, version_etag};
use super::{ApiError, AppState};
use crate::config::{BaseUrl, RequestLimits};
use crate::fhir::canonical::ParsedResource;
use crate::fhir::references::rewrite_references;
use crate::fhir::{LocalBase, ResourceId, ResourceType};
use crate::store::{PendingCommit, UnchangedContent, VersionInfo, WriteOperation, WriteOutcome};

/// What one Bundle entry asks for.
enum EntryAction {
    Write(WriteOperation),
    Read {
        resource_type: ResourceType,
        id: ResourceId,
        version: Option<u64>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BundleKind {
    Batch,
    Transaction,
}

struct RawEntry {
    full_url: Option<String>,
    resource: Option<Value>,
    method: String,
    url: String,
    if_match: Option<String>,
}

pub async fn batch_or_transaction(
    state: Arc<AppState>,
    body: Bytes,
) -> Result<WarpResponse, ApiError> {
    let limits = state.limits;
    let base_url = state.base_url.clone();
    let local_base = state.local_base.clone();
    let (kind, entries) = run_blocking(move || parse_bundle(&body, &limits)).await?;
    match kind {
        BundleKind::Transaction => {
            let actions =
                run_blocking(move || transaction_actions(entries, &base_url, &local_base, &limits))
                    .await?;
            transaction(state, actions).await
        }
        BundleKind::Batch => {
            let actions = run_blocking(move || {
                Ok(entries
                    .into_iter()
                    .enumerate()
                    .map(|(index, entry)| {
                        entry_action(index, entry, &base_url, &local_base, &limits, None)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
            batch(state, actions).await
        }
    }
}

fn parse_bundle(
    body: &[u8],
    limits: &RequestLimits,
) -> Result<(BundleKind, Vec<RawEntry>), ApiError> {
    let parsed = ParsedResource::parse_bytes(body, limits.max_json_depth)?;
    if parsed.resource_type.as_str() != "Bundle" {
        return Err(ApiError::BadRequest(format!(
            "POST /fhir expects a Bundle, not a {}",
            parsed.resource_type
        )));
    }
    let kind = match parsed.json.get("type").and_then(Value::as_str) {
        Some("batch") => BundleKind::Batch,
        Some("transaction") => BundleKind::Transaction,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "Bundle type '{other}' cannot be processed; use 'batch' or 'transaction'"
            )));
        }
        None => return Err(ApiError::BadRequest("Bundle has no type".to_owned())),
    };
    let mut json = parsed.json;
    let entries = match json.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "Bundle.entry must be an array".to_owned(),
            ));
        }
    };
    let raw_entries = entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| raw_entry(index, entry))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((kind, raw_entries))
}

fn raw_entry(index: usize, entry: Value) -> Result<RawEntry, ApiError> {
    let Value::Object(mut entry) = entry else {
        return Err(ApiError::BadRequest(format!(
            "Bundle.entry[{index}] is not an object"
        )));
    };
    let request = entry
        .remove("request")
        .and_then(|request| match request {
            Value::Object(request) => Some(request),
            _ => None,
        })
        .ok_or_else(|| ApiError::BadRequest(format!("Bundle.entry[{index}].request is missing")))?;
    let text = |field: &str| {
        request
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(RawEntry {
        full_url: entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_owned),
        resource: entry.remove("resource"),
        method: text("method").ok_or_else(|| {
            ApiError::BadRequest(format!("Bundle.entry[{index}].request.method is missing"))
        })?,
        url: text("url").ok_or_else(|| {
            ApiError::BadRequest(format!("Bundle.entry[{index}].request.url is missing"))
        })?,
        if_match: text("ifMatch"),
    })
}

/// Splits `Type`, `Type/id` or `Type/id/_history/v` (relative, or absolute under our base).
fn parse_entry_url(
    index: usize,
    url: &str,
    base_url: &BaseUrl,
) -> Result<(ResourceType, Option<ResourceId>, Option<u64>), ApiError> {
    let bad = |why: &str| {
        ApiError::BadRequest(format!("Bundle.entry[{index}].request.url '{url}': {why}"))
    };
    if url.contains('?') {
        return Err(bad("conditional and search requests are not supported"));
    }
    let relative = url
        .strip_prefix(base_url.as_str())
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or(url);
    let segments: Vec<&str> = relative.split('/').collect();
    let resource_type =
        ResourceType::parse(segments[0]).map_err(|error| bad(&error.to_string()))?;
    let id = |text: &str| ResourceId::parse(text).map_err(|error| bad(&error.to_string()));
    match segments.as_slice() {
        [_] => Ok((resource_type, None, None)),
        [_, resource_id] => Ok((resource_type, Some(id(resource_id)?), None)),
        [_, resource_id, "_history", version] => {
            let version = version
                .parse()
                .map_err(|_| bad("the version is not a number"))?;
            Ok((resource_type, Some(id(resource_id)?), Some(version)))
        }
        _ => Err(bad("expected Type, Type/id or Type/id/_history/version")),
    }
}

fn entry_action(
    index: usize,
    entry: RawEntry,
    base_url: &BaseUrl,
    local_base: &LocalBase,
    limits: &RequestLimits,
    assigned_id: Option<ResourceId>,
) -> Result<EntryAction, ApiError> {
    let (resource_type, url_id, version) = parse_entry_url(index, &entry.url, base_url)?;
    let in_entry =
        |error: ApiError| ApiError::BadRequest(format!("Bundle.entry[{index}]: {error}"));
    let expected_version = entry
        .if_match
        .as_deref()
        .map(|etag| {
            etag.trim_start_matches("W/")
                .trim_matches('"')
                .parse::<u64>()
                .map_err(|_| {
                    in_entry(ApiError::BadRequest(format!(
                        "ifMatch '{etag}' is not a version ETag"
                    )))
                })
        })
        .transpose()?;
    let resource = |entry_resource: Option<Value>| {
        let value = entry_resource.ok_or_else(|| {
            in_entry(ApiError::BadRequest("the entry has no resource".to_owned()))
        })?;
        ParsedResource::from_value(value, limits.max_json_depth)
            .map_err(|error| in_entry(error.into()))
    };
    match (entry.method.as_str(), url_id, version) {
        ("POST", None, None) => {
            let mut entry_resource = entry.resource;
            if assigned_id.is_none()
                && let Some(Value::Object(fields)) = &mut entry_resource
            {
                fields.remove("id");
            }
            let parsed = resource(entry_resource)?;
            let id_rule = match &assigned_id {
                Some(id) => IdRule::MustEqual(id),
                None => IdRule::ServerAssigned,
            };
            let prepared =
                prepare_parsed(parsed, resource_type, id_rule, local_base).map_err(in_entry)?;
            Ok(EntryAction::Write(WriteOperation::Create(prepared)))
        }
        ("PUT", Some(id), None) => {
            let prepared = prepare_parsed(
                resource(entry.resource)?,
                resource_type,
                IdRule::MustEqual(&id),
                local_base,
            )
            .map_err(in_entry)?;
            Ok(EntryAction::Write(WriteOperation::Update {
                resource: prepared,
                expected_version,
                unchanged: UnchangedContent::NewVersion,
            }))
        }
        ("DELETE", Some(id), None) => Ok(EntryAction::Write(WriteOperation::Delete {
            resource_type,
            id,
            expected_version,
        })),
        ("GET", Some(id), version) => Ok(EntryAction::Read {
            resource_type,
            id,
            version,
        }),
        (method, _, _) => Err(ApiError::BadRequest(format!(
            "Bundle.entry[{index}]: {method} {} is not supported (use POST Type, PUT/DELETE Type/id, GET Type/id)",
            entry.url
        ))),
    }
}

/// Assigns ids to created entries, resolves `urn:uuid:` references, and parses every entry;
/// any bad entry fails the whole transaction.
fn transaction_actions(
    entries: Vec<RawEntry>,
    base_url: &BaseUrl,
    local_base: &LocalBase,
    limits: &RequestLimits,
) -> Result<Vec<WriteOperation>, ApiError> {
    let mut assigned_ids: Vec<Option<ResourceId>> = Vec::with_capacity(entries.len());
    let mut placeholders: HashMap<String, String> = HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        let (resource_type, url_id, _) = parse_entry_url(index, &entry.url, base_url)?;
        let created_id =
            (entry.method == "POST" && url_id.is_none()).then(ResourceId::new_server_assigned);
        if let Some(full_url) = entry
            .full_url
            .as_ref()
            .filter(|full_url| full_url.starts_with("urn:uuid:"))
            && let Some(id) = created_id.as_ref().or(url_id.as_ref())
        {
            placeholders.insert(full_url.clone(), format!("{resource_type}/{id}"));
        }
        assigned_ids.push(created_id);
    }
    let mut targets = std::collections::HashSet::new();
    entries
        .into_iter()
        .zip(assigned_ids)
        .enumerate()
        .map(|(index, (mut entry, assigned_id))| {
            if let Some(resource) = &mut entry.resource {
                rewrite_references(resource, &placeholders);
                if let (Value::Object(fields), Some(id)) = (resource, &assigned_id) {
                    fields.insert("id".to_owned(), Value::String(id.to_string()));
                }
            }
            match entry_action(index, entry, base_url, local_base, limits, assigned_id)? {
                EntryAction::Write(operation) => {
                    let (target_type, target_id) = operation.target();
                    let target = (target_type, target_id.clone());
                    if !targets.insert(target.clone()) {
                        return Err(ApiError::BadRequest(format!(
                            "Bundle.entry[{index}]: {}/{} is already the target of another entry; a transaction may touch each resource once",
                            target.0, target.1
                        )));
                    }
                    Ok(operation)
                }
                EntryAction::Read { .. } => Err(ApiError::BadRequest(format!(
                    "Bundle.entry[{index}]: GET entries are not supported in a transaction; use a batch"
                ))),
            }
        })
        .collect()
}

async fn transaction(
    state: Arc<AppState>,
    operations: Vec<WriteOperation>,
) -> Result<WarpResponse, ApiError> {
    let outcomes = state.store.submit(operations).wait_async().await?;
    let entries: Vec<Value> = outcomes.iter().map(write_response_entry).collect();
    Ok(response::fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": entries}),
    ))
}

async fn batch(
    state: Arc<AppState>,
    actions: Vec<Result<EntryAction, ApiError>>,
) -> Result<WarpResponse, ApiError> {
    enum Pending {
        Write(PendingCommit),
        Read(ResourceType, ResourceId, Option<u64>),
        Failed(ApiError),
    }
    let pending: Vec<Pending> = actions
        .into_iter()
        .map(|action| match action {
            Ok(EntryAction::Write(operation)) => {
                Pending::Write(state.store.submit(vec![operation]))
            }
            Ok(EntryAction::Read {
                resource_type,
                id,
                version,
            }) => Pending::Read(resource_type, id, version),
            Err(error) => Pending::Failed(error),
        })
        .collect();
    let mut entries = Vec::with_capacity(pending.len());
    for item in pending {
        let entry = match item {
            Pending::Write(commit) => match commit.wait_async().await {
                Ok(outcomes) => outcomes
                    .first()
                    .map(write_response_entry)
                    .unwrap_or_else(|| json!({})),
                Err(error) => error_entry(&ApiError::Store(error)),
            },
            Pending::Read(resource_type, id, version) => {
                let store = state.store.clone();
                let lookup_id = id.clone();
                let found = run_blocking(move || {
                    Ok(match version {
                        Some(version) => store.read_version(resource_type, &lookup_id, version)?,
                        None => store.read_current(resource_type, &lookup_id)?,
                    })
                })
                .await;
                match found {
                    Ok(Some(stored)) if stored.body.is_some() => json!({
                        "resource": serde_json::from_str::<Value>(stored.body.as_deref().unwrap_or("{}")).unwrap_or(Value::Null),
                        "response": {"status": "200 OK", "etag": version_etag(stored.version),
                                     "lastModified": stored.last_updated.to_fhir_string()},
                    }),
                    Ok(Some(stored)) => error_entry(&ApiError::Gone(format!(
                        "{resource_type}/{id} was deleted (version {})",
                        stored.version
                    ))),
                    Ok(None) => error_entry(&ApiError::NotFound(format!(
                        "{resource_type}/{id} is not known"
                    ))),
                    Err(error) => error_entry(&error),
                }
            }
            Pending::Failed(error) => error_entry(&error),
        };
        entries.push(entry);
    }
    Ok(response::fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Bundle", "type": "batch-response", "entry": entries}),
    ))
}

fn write_response_entry(outcome: &WriteOutcome) -> Value {
    let versioned = |status: &str, version: &VersionInfo| {
        json!({"response": {
            "status": status,
            "location": format!("{}/{}/_history/{}", version.resource_type, version.id, version.version),
            "etag": version_etag(version.version),
            "lastModified": version.last_updated.to_fhir_string(),
        }})
    };
    match outcome {
        WriteOutcome::Created { version } => versioned("201 Created", version),
        WriteOutcome::Updated { version } => versioned("200 OK", version),
        WriteOutcome::Deleted { version } => versioned("200 OK", version),
        WriteOutcome::Unchanged { version, .. } => {
            json!({"response": {"status": "200 OK", "etag": version_etag(*version)}})
        }
        WriteOutcome::NothingToDelete => json!({"response": {"status": "200 OK"}}),
    }
}

fn error_entry(error: &ApiError) -> Value {
    let status = error.status();
    json!({"response": {
        "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
        "outcome": error.to_outcome().to_json(),
    }})
}
