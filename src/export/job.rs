//! Persisted export jobs: the job record, its work units and their checkpoints, kept in
//! the store's `jobs` keyspace so a restarted server resumes where it stopped.

use serde::{Deserialize, Serialize};

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
    /// The job's scratch set of (type, seq), collected from member patients' compartments.
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
        status: u16,
        message: String,
    },
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
    /// Sorted member patient ids for Group and `patient=` exports.
    pub members: Vec<String>,
    pub units: Vec<WorkUnit>,
    pub state: JobState,
    pub files: Vec<ExportedFile>,
}

/// Progress of one output stream of a unit: the parts written so far and the seq of the
/// last event in the last part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    pub part_counts: Vec<u64>,
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

impl JobRecord {
    pub fn save(&self, store: &Store) -> Result<(), StoreError> {
        store.job_put(&job_key(&self.id), &encode_record(self))
    }

    pub fn load_all(store: &Store) -> Result<Vec<JobRecord>, StoreError> {
        store
            .job_scan("job/")?
            .iter()
            .map(|(_, bytes)| decode_record(bytes))
            .collect()
    }

    /// Removes the record and every checkpoint of the job.
    pub fn delete(store: &Store, job_id: &str) -> Result<(), StoreError> {
        store.job_delete_prefix(&format!("unit/{job_id}/"))?;
        store.job_delete_prefix(&job_key(job_id))
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self.state,
            JobState::Completed { .. } | JobState::Failed { .. }
        )
    }
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

/// The staging object of part `part_number` (from 1) of a unit's stream; finals are named
/// only when the job completes, so numbering is deterministic whatever order units ran in.
/// Staged parts sit in the job's own folder (no subfolder), so deleting a job's objects
/// leaves no empty directories behind on a filesystem.
pub fn staged_part_name(
    job_id: &str,
    kind: FileKind,
    unit_index: usize,
    part_number: usize,
) -> String {
    let stream = match kind {
        FileKind::Output => "output",
        FileKind::Deleted => "deleted",
        FileKind::Error => "error",
    };
    format!("{job_id}/staging-{stream}-{unit_index:08}-{part_number:08}.ndjson")
}

pub fn final_file_name(job_id: &str, file_name: &str) -> String {
    format!("{job_id}/{file_name}")
}
