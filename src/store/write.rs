//! What callers hand to the store: prepared resources and write operations, and what the
//! store answers for each.

use serde_json::{Map, Value};

use crate::fhir::canonical::{PreparedBody, ResourceFields};
use crate::fhir::compartment::PatientCompartment;
use crate::fhir::{Instant, LocalBase, ResourceId, ResourceType};

/// A resource in canonical form with everything the commit needs computed up front, so the
/// single committer thread does no JSON work.
#[derive(Debug, Clone)]
pub struct PreparedResource {
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub body: PreparedBody,
    pub digest: [u8; 32],
    pub compartment_patients: Vec<String>,
}

impl PreparedResource {
    /// Prepares `json` as resource `id`; its compartment patients come from the references
    /// `local_base` deems local.
    pub fn new(
        resource_type: ResourceType,
        id: ResourceId,
        mut json: Map<String, Value>,
        local_base: &LocalBase,
    ) -> PreparedResource {
        json.insert("id".to_owned(), Value::String(id.as_str().to_owned()));
        json.insert(
            "resourceType".to_owned(),
            Value::String(resource_type.as_str().to_owned()),
        );
        let json_value = Value::Object(json);
        let compartment_patients =
            PatientCompartment::r4().patient_ids(resource_type, &json_value, local_base);
        let Value::Object(json) = json_value else {
            unreachable!("built as an object above")
        };
        let body = PreparedBody::new(resource_type, &id, json);
        PreparedResource::with_digest(resource_type, id, body, compartment_patients)
    }

    /// Prepares a body read by [`ResourceFields::read`] as resource `id`; the same as
    /// [`PreparedResource::new`] gives for the body's tree, without building one.
    pub fn from_fields(fields: ResourceFields, id: ResourceId) -> PreparedResource {
        let resource_type = fields.resource_type;
        let (body, compartment_patients) = fields.into_prepared(&id);
        PreparedResource::with_digest(resource_type, id, body, compartment_patients)
    }

    fn with_digest(
        resource_type: ResourceType,
        id: ResourceId,
        body: PreparedBody,
        compartment_patients: Vec<String>,
    ) -> PreparedResource {
        PreparedResource {
            digest: body.content_digest(),
            resource_type,
            id,
            body,
            compartment_patients,
        }
    }
}

/// What to do when an update carries exactly the content of the current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnchangedContent {
    /// Append a new version anyway (FHIR `update` semantics).
    NewVersion,
    /// Append nothing (idempotent loading).
    Skip,
}

#[derive(Debug, Clone)]
pub enum WriteOperation {
    /// Create a resource whose id must not be in use yet.
    Create(PreparedResource),
    /// Update, or create with the caller's id; `expected_version` is `If-Match`.
    Update {
        resource: PreparedResource,
        expected_version: Option<u64>,
        unchanged: UnchangedContent,
    },
    Delete {
        resource_type: ResourceType,
        id: ResourceId,
        expected_version: Option<u64>,
    },
}

impl WriteOperation {
    /// The resource the operation writes.
    pub fn target(&self) -> (ResourceType, &ResourceId) {
        match self {
            WriteOperation::Create(resource) | WriteOperation::Update { resource, .. } => {
                (resource.resource_type, &resource.id)
            }
            WriteOperation::Delete {
                resource_type, id, ..
            } => (*resource_type, id),
        }
    }
}

/// Where a committed version sits in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub version: u64,
    pub last_updated: Instant,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Created {
        version: VersionInfo,
    },
    Updated {
        version: VersionInfo,
    },
    /// Content equal to the current version, which is `version`; nothing was appended.
    Unchanged {
        resource_type: ResourceType,
        id: ResourceId,
        version: u64,
    },
    Deleted {
        version: VersionInfo,
    },
    /// The resource did not exist or was already deleted; nothing was appended.
    NothingToDelete,
}

/// Why a commit request was refused as a whole; the store is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteRejection {
    #[error(
        "{resource_type}/{id} is {}, not at the expected version {expected_version}",
        describe_current_version(*current_version)
    )]
    VersionConflict {
        resource_type: ResourceType,
        id: ResourceId,
        expected_version: u64,
        current_version: Option<u64>,
    },
    #[error("{resource_type}/{id} already exists")]
    AlreadyExists {
        resource_type: ResourceType,
        id: ResourceId,
    },
}

fn describe_current_version(current_version: Option<u64>) -> String {
    match current_version {
        Some(version) => format!("at version {version}"),
        None => "absent or deleted".to_owned(),
    }
}
