//! Persisted export jobs: the job record, its work units and their checkpoints, kept in
//! the store's `jobs` keyspace so a restarted server resumes where it stopped.

use serde::{Deserialize, Serialize};

use super::error::ExportErrorKind;
use super::request::ExportRequest;
use crate::fhir::{Instant, ResourceType};
use crate::sink::ContainerName;
use crate::store::{SeqWindow, Store, StoreError, decode_record, encode_record};

/// Where a work unit finds its candidate events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnitSource {
    /// Every event of the type (system export).
    AllEvents,
    /// Events of resources in some patient's compartment (all-patients export).
    CompartmentEvents,
    /// The job's scratch set of (type, seq), collected from member patients' compartments
    /// and from the resources they reference.
    CollectedEvents,
}

/// A type and a seq range whose output is written as its own run of parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkUnit {
    pub resource_type: ResourceType,
    pub seqs: SeqWindow,
    pub source: UnitSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Collecting member patients' compartments into the scratch set; `next_member` is
    /// the first member not yet collected.
    Collecting {
        next_member: usize,
    },
    Exporting,
    Completed {
        completed_at: Instant,
    },
    Failed {
        failed_at: Instant,
        kind: ExportErrorKind,
        message: String,
    },
    // Later stages come last, so the postcard tags of the states above stay as they were.
    /// Adding the resources the compartment resources reference to the scratch set
    /// (`includeAssociatedData=_referenced`), from `cursor` on.
    CollectingReferenced {
        cursor: ReferencedCursor,
    },
    /// Adding the Provenance whose target is an exported resource to the scratch set,
    /// reading Provenance events after `after_seq`.
    CollectingProvenance {
        after_seq: u64,
    },
    /// Exporting the compartment resources of a `_referenced` export while adding the
    /// resources they reference to the scratch set, in the same pass; the Provenance and
    /// the referenced resources are exported by later units.
    ExportingCompartments,
    /// The `_referenced` walk over the compartment resources whose export waits for the
    /// referenced set (Provenance; see [`super::planner::deferred_compartment_types`]),
    /// from `cursor` on.
    CollectingDeferredReferenced {
        cursor: ReferencedCursor,
    },
}

impl JobState {
    /// Whether the job is still being planned or exported.
    pub fn is_in_progress(&self) -> bool {
        !matches!(self, JobState::Completed { .. } | JobState::Failed { .. })
    }
}

/// How far a walk over the compartment resources for `_referenced` got: the index of
/// the type being walked (in the walk's type order) and the seq of the last resource of
/// that type read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferencedCursor {
    pub type_index: usize,
    pub after_seq: u64,
}

/// Which output list a file belongs to in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    Output,
    Deleted,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedFile {
    pub kind: FileKind,
    pub type_name: String,
    pub name: String,
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub request: ExportRequest,
    pub request_url: String,
    pub container: ContainerName,
    /// Events in `(since_seq, snapshot_seq]` are exported.
    pub window: SeqWindow,
    pub transaction_time: Instant,
    pub created_at: Instant,
    pub max_resources_per_file: u64,
    /// How many member patients a Group or `patient=` export covers; their ids are kept
    /// apart ([`save_members`]) so that saving the record stays cheap.
    pub member_count: usize,
    pub units: Vec<WorkUnit>,
    pub state: JobState,
    pub files: Vec<ExportedFile>,
}

/// One finished part of a unit's stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenPart {
    pub resources: u64,
    pub bytes: u64,
}

/// Progress of one output stream of a unit: the parts written so far and the seq of the
/// last event in the last part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    pub parts: Vec<WrittenPart>,
    pub resume_after_seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitCheckpoint {
    pub done: bool,
    pub output: StreamCheckpoint,
    pub deleted: StreamCheckpoint,
}

fn job_key(job_id: &str) -> String {
    format!("job/{job_id}")
}

fn unit_key(job_id: &str, unit_index: usize) -> String {
    format!("unit/{job_id}/{unit_index:08}")
}

fn members_key(job_id: &str) -> String {
    format!("members/{job_id}")
}

fn missing_references_prefix(job_id: &str) -> String {
    format!("missing/{job_id}/")
}

/// Why a referenced resource is not in the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MissingReason {
    /// No version existed at the snapshot.
    Absent,
    /// The version current at the snapshot is a delete.
    Deleted,
}

/// A referenced resource the export cannot hold, reported once in its `error` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingReference {
    /// `Type/id`.
    pub reference: String,
    pub reason: MissingReason,
}

/// Notes referenced resources that are missing (not fsynced: the next record save makes
/// them durable); noting one twice keeps one note.
pub fn save_missing_references(
    store: &Store,
    job_id: &str,
    missing: &[MissingReference],
) -> Result<(), StoreError> {
    for note in missing {
        store.job_put_buffered(
            &format!("{}{}", missing_references_prefix(job_id), note.reference),
            &encode_record(&note.reason),
        )?;
    }
    Ok(())
}

/// Every missing referenced resource noted for the job, in `Type/id` order.
pub fn load_missing_references(
    store: &Store,
    job_id: &str,
) -> Result<Vec<MissingReference>, StoreError> {
    let prefix = missing_references_prefix(job_id);
    store
        .job_scan(&prefix)?
        .into_iter()
        .map(|(key, value)| {
            Ok(MissingReference {
                reference: key[prefix.len()..].to_owned(),
                reason: decode_record(&value)?,
            })
        })
        .collect()
}

/// Kept apart from the record so that records written before owners existed still load.
fn owner_key(job_id: &str) -> String {
    format!("owner/{job_id}")
}

/// Saves the client that started the job (fsynced); save it before the record.
pub fn save_owner(store: &Store, job_id: &str, owner: &str) -> Result<(), StoreError> {
    store.job_put(&owner_key(job_id), owner.as_bytes())
}

/// The client that started the job; `None` for a job started without access control.
pub fn load_owner(store: &Store, job_id: &str) -> Result<Option<String>, StoreError> {
    Ok(store
        .job_get(&owner_key(job_id))?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
}

/// Saves the sorted member patient ids of a Group or `patient=` export (fsynced).
pub fn save_members(store: &Store, job_id: &str, members: &[String]) -> Result<(), StoreError> {
    store.job_put(&members_key(job_id), &encode_record(&members))
}

pub fn load_members(store: &Store, job_id: &str) -> Result<Vec<String>, StoreError> {
    match store.job_get(&members_key(job_id))? {
        Some(bytes) => decode_record(&bytes),
        None => Ok(Vec::new()),
    }
}

impl JobRecord {
    pub fn save(&self, store: &Store) -> Result<(), StoreError> {
        store.job_put(&job_key(&self.id), &encode_record(self))
    }

    /// Every persisted job; a record this version cannot read (written by an older
    /// fhirlog) is reported and left out.
    pub fn load_all(store: &Store) -> Result<Vec<JobRecord>, StoreError> {
        let mut records = Vec::new();
        for (key, bytes) in store.job_scan("job/")? {
            match decode_record(&bytes) {
                Ok(record) => records.push(record),
                Err(error) => {
                    tracing::warn!(%key, %error, "ignoring an export job record this version cannot read")
                }
            }
        }
        Ok(records)
    }

    /// Removes the record, the member list and every checkpoint and note of the job.
    pub fn delete(store: &Store, job_id: &str) -> Result<(), StoreError> {
        delete_checkpoints(store, job_id)?;
        store.job_delete_prefix(&missing_references_prefix(job_id))?;
        store.job_delete_prefix(&members_key(job_id))?;
        store.job_delete_prefix(&job_key(job_id))?;
        store.job_delete_prefix(&owner_key(job_id))
    }

    pub fn is_finished(&self) -> bool {
        !self.state.is_in_progress()
    }
}

/// Removes every unit checkpoint of the job.
pub fn delete_checkpoints(store: &Store, job_id: &str) -> Result<(), StoreError> {
    store.job_delete_prefix(&format!("unit/{job_id}/"))
}

/// Removes the job's notes of missing referenced resources once its files are written.
pub fn delete_missing_references(store: &Store, job_id: &str) -> Result<(), StoreError> {
    store.job_delete_prefix(&missing_references_prefix(job_id))
}

impl UnitCheckpoint {
    pub fn load(
        store: &Store,
        job_id: &str,
        unit_index: usize,
    ) -> Result<UnitCheckpoint, StoreError> {
        match store.job_get(&unit_key(job_id, unit_index))? {
            Some(bytes) => decode_record(&bytes),
            None => Ok(UnitCheckpoint::default()),
        }
    }

    pub fn save(&self, store: &Store, job_id: &str, unit_index: usize) -> Result<(), StoreError> {
        store.job_put_buffered(&unit_key(job_id, unit_index), &encode_record(self))
    }
}
