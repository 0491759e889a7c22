//! Instance and type interactions: create, read, update, delete, vread.

use std::sync::Arc;

use bytes::Bytes;
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::response::{self, version_etag, with_version_headers};
use super::{ApiError, AppState};
use crate::config::RequestLimits;
use crate::fhir::canonical::{BodyId, ParsedResource, ResourceBodyError, ResourceFields};
use crate::fhir::outcome::{IssueKind, IssueSeverity, OperationOutcome};
use crate::fhir::{LocalBase, ResourceId, ResourceType};
use crate::store::{
    PreparedResource, StoredVersion, UnchangedContent, WriteOperation, WriteOutcome,
};

/// Runs store or CPU-heavy work on the blocking pool.
pub async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError::Internal(format!("worker task failed: {error}")))?
}

/// Whose id a prepared body gets.
pub enum IdRule<'a> {
    /// A new server-assigned id; any id in the body is ignored (FHIR create).
    ServerAssigned,
    /// The body must carry exactly this id (FHIR update).
    MustEqual(&'a ResourceId),
}

/// Reads a body as a resource of `resource_type` and prepares it for the store, in one
/// pass over the body without a JSON tree.
pub fn prepare_resource(
    body: &[u8],
    limits: &RequestLimits,
    resource_type: ResourceType,
    id_rule: IdRule<'_>,
    local_base: &LocalBase,
) -> Result<PreparedResource, ApiError> {
    let body_id = match id_rule {
        IdRule::ServerAssigned => BodyId::Ignore,
        IdRule::MustEqual(_) => BodyId::Validate,
    };
    let fields = ResourceFields::read(
        body,
        resource_type,
        body_id,
        limits.max_json_depth,
        local_base,
    )
    .map_err(|error| match error {
        ResourceBodyError::UnexpectedResourceType { .. } => ApiError::BadRequest(error.to_string()),
        other => other.into(),
    })?;
    let id = resolve_id(fields.id.as_ref(), id_rule)?;
    Ok(PreparedResource::from_fields(fields, id))
}

pub fn prepare_parsed(
    parsed: ParsedResource,
    resource_type: ResourceType,
    id_rule: IdRule<'_>,
    local_base: &LocalBase,
) -> Result<PreparedResource, ApiError> {
    if parsed.resource_type != resource_type {
        return Err(ApiError::BadRequest(
            ResourceBodyError::UnexpectedResourceType {
                expected: resource_type,
                found: parsed.resource_type,
            }
            .to_string(),
        ));
    }
    let id = resolve_id(parsed.id.as_ref(), id_rule)?;
    Ok(PreparedResource::new(
        resource_type,
        id,
        parsed.json,
        local_base,
    ))
}

/// The id a prepared resource gets, given the id in its body.
fn resolve_id(body_id: Option<&ResourceId>, id_rule: IdRule<'_>) -> Result<ResourceId, ApiError> {
    match id_rule {
        IdRule::ServerAssigned => Ok(ResourceId::new_server_assigned()),
        IdRule::MustEqual(url_id) => match body_id {
            Some(body_id) if body_id == url_id => Ok(url_id.clone()),
            Some(body_id) => Err(ApiError::BadRequest(format!(
                "body id '{body_id}' does not match the URL id '{url_id}'"
            ))),
            None => Err(ApiError::BadRequest(format!(
                "an update needs the resource id in the body; expected id '{url_id}'"
            ))),
        },
    }
}

pub async fn create(
    state: Arc<AppState>,
    resource_type: ResourceType,
    body: Bytes,
) -> Result<WarpResponse, ApiError> {
    let limits = state.limits;
    let local_base = state.local_base.clone();
    let prepared = run_blocking(move || {
        prepare_resource(
            &body,
            &limits,
            resource_type,
            IdRule::ServerAssigned,
            &local_base,
        )
    })
    .await?;
    let outcomes = state
        .store
        .submit(vec![WriteOperation::Create(prepared)])
        .wait_async()
        .await?;
    respond_with_written(state, outcomes).await
}

pub async fn update(
    state: Arc<AppState>,
    resource_type: ResourceType,
    id: ResourceId,
    expected_version: Option<u64>,
    body: Bytes,
) -> Result<WarpResponse, ApiError> {
    let limits = state.limits;
    let local_base = state.local_base.clone();
    let prepared = run_blocking(move || {
        prepare_resource(
            &body,
            &limits,
            resource_type,
            IdRule::MustEqual(&id),
            &local_base,
        )
    })
    .await?;
    let operation = WriteOperation::Update {
        resource: prepared,
        expected_version,
        unchanged: UnchangedContent::NewVersion,
    };
    let outcomes = state.store.submit(vec![operation]).wait_async().await?;
    respond_with_written(state, outcomes).await
}

async fn respond_with_written(
    state: Arc<AppState>,
    outcomes: Vec<WriteOutcome>,
) -> Result<WarpResponse, ApiError> {
    let (status, info) = match outcomes.into_iter().next() {
        Some(WriteOutcome::Created { version }) => (StatusCode::CREATED, version),
        Some(WriteOutcome::Updated { version }) => (StatusCode::OK, version),
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected write outcome {other:?}"
            )));
        }
    };
    let store = state.store.clone();
    let written =
        run_blocking(move || Ok(store.read_version(info.resource_type, &info.id, info.version)?))
            .await?
            .ok_or_else(|| {
                ApiError::Internal("a committed version could not be read back".to_owned())
            })?;
    let body = written.body.clone().unwrap_or_default();
    Ok(with_version_headers(
        response::fhir_json_text(status, body),
        &written,
        Some(&state.base_url),
    ))
}

pub async fn read(
    state: Arc<AppState>,
    resource_type: ResourceType,
    id: ResourceId,
) -> Result<WarpResponse, ApiError> {
    let store = state.store.clone();
    let lookup_id = id.clone();
    let current = run_blocking(move || Ok(store.read_current(resource_type, &lookup_id)?)).await?;
    match current {
        None => Err(ApiError::NotFound(format!(
            "{resource_type}/{id} is not known"
        ))),
        Some(version) => respond_with_version(version),
    }
}

pub async fn version_read(
    state: Arc<AppState>,
    resource_type: ResourceType,
    id: ResourceId,
    version_number: u64,
) -> Result<WarpResponse, ApiError> {
    let store = state.store.clone();
    let lookup_id = id.clone();
    let version =
        run_blocking(move || Ok(store.read_version(resource_type, &lookup_id, version_number)?))
            .await?;
    match version {
        None => Err(ApiError::NotFound(format!(
            "{resource_type}/{id} has no version {version_number}"
        ))),
        Some(version) => respond_with_version(version),
    }
}

fn respond_with_version(version: StoredVersion) -> Result<WarpResponse, ApiError> {
    match &version.body {
        Some(body) => Ok(with_version_headers(
            response::fhir_json_text(StatusCode::OK, body.clone()),
            &version,
            None,
        )),
        None => {
            let gone = ApiError::Gone(format!(
                "{}/{} was deleted (version {})",
                version.resource_type, version.id, version.version
            ));
            Ok(with_version_headers(response::error(&gone), &version, None))
        }
    }
}

pub async fn delete(
    state: Arc<AppState>,
    resource_type: ResourceType,
    id: ResourceId,
    expected_version: Option<u64>,
) -> Result<WarpResponse, ApiError> {
    let operation = WriteOperation::Delete {
        resource_type,
        id: id.clone(),
        expected_version,
    };
    let outcomes = state.store.submit(vec![operation]).wait_async().await?;
    let (message, etag) = match outcomes.into_iter().next() {
        Some(WriteOutcome::Deleted { version }) => (
            format!(
                "deleted {resource_type}/{id}; the delete is version {}",
                version.version
            ),
            Some(version_etag(version.version)),
        ),
        Some(WriteOutcome::NothingToDelete) => (
            format!("{resource_type}/{id} did not exist; nothing was deleted"),
            None,
        ),
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected delete outcome {other:?}"
            )));
        }
    };
    let mut reply = response::outcome(
        StatusCode::OK,
        &OperationOutcome::single(
            IssueSeverity::Information,
            IssueKind::Informational,
            message,
        ),
    );
    if let Some(etag) = etag.and_then(|etag| etag.parse().ok()) {
        reply.headers_mut().insert(warp::http::header::ETAG, etag);
    }
    Ok(reply)
}
