//! The Provenance of a Patient or Group export (Bulk Data v3): every Provenance whose
//! `target` names an exported compartment resource is exported, also when it is in no
//! patient's compartment itself; under `includeAssociatedData=RelevantProvenanceResources`
//! also those naming a resource `_referenced` added. Reads the Provenance current at the
//! snapshot (changed inside the window), adds the ones not exported yet to the job's
//! scratch set, and checkpoints every `PROVENANCE_PER_CHECKPOINT` Provenance read.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::error::ExportError;
use super::job::JobState;
use super::planner::{CollectionStage, covered_types, finish_stage, version_as_of};
use super::referenced::collects_members;
use super::registry::JobHandle;
use super::request::{ExportRequest, TypeFilter};
use crate::fhir::{LocalBase, ResourceType};
use crate::store::{ScanControl, SeqWindow, Store, StoreError};

/// Provenance read between durable checkpoints.
const PROVENANCE_PER_CHECKPOINT: usize = 2048;

/// Whether a Patient or Group export collects Provenance: when it covers the type.
pub fn collects_provenance(request: &ExportRequest) -> bool {
    request.level != super::request::ExportLevel::System
        && covered_types(request).contains(&ResourceType::PROVENANCE)
}

/// One live Provenance read, not exported by the compartments yet.
struct ProvenanceCandidate {
    seq: u64,
    /// `(type, id)` of each local target.
    targets: Vec<(ResourceType, String)>,
}

/// Reads the Provenance from the job's checkpoint to the end, adding each that targets an
/// exported resource, then moves the job on.
pub fn run_provenance_collection(
    store: &Store,
    job: &JobHandle,
    local_base: &LocalBase,
) -> Result<(), ExportError> {
    let (request, window, mut after_seq) = {
        let record = job.record();
        let JobState::CollectingProvenance { after_seq } = record.state else {
            return Ok(());
        };
        (record.request.clone(), record.window, after_seq)
    };
    let mut judge = ExportedTargets {
        store,
        job_id: job.id(),
        request: &request,
        local_base,
        window,
        compartment_types: covered_types(&request).into_iter().collect(),
        type_filters: HashMap::new(),
    };
    loop {
        if job.should_stop() {
            return Err(ExportError::cancelled());
        }
        let mut candidates = Vec::new();
        let mut last_seq = None;
        let mut read = 0usize;
        let mut failure = None;
        store.scan_newest_in_window(
            ResourceType::PROVENANCE,
            SeqWindow {
                after_seq,
                through_seq: window.through_seq,
            },
            window.through_seq,
            |view| {
                last_seq = Some(view.seq);
                read += 1;
                let exported_already = if collects_members(&request) {
                    store.scratch_contains(job.id(), ResourceType::PROVENANCE, view.seq)
                } else {
                    Ok(!view.compartment_patients.is_empty())
                };
                match exported_already {
                    Ok(false) if !view.deleted => match local_targets(view.body, local_base) {
                        Ok(targets) => candidates.push(ProvenanceCandidate {
                            seq: view.seq,
                            targets,
                        }),
                        Err(error) => failure = Some(error),
                    },
                    Ok(_) => {}
                    Err(error) => failure = Some(error),
                }
                if failure.is_some() || read >= PROVENANCE_PER_CHECKPOINT {
                    return ScanControl::Stop;
                }
                ScanControl::Continue
            },
        )?;
        if let Some(error) = failure {
            return Err(error.into());
        }
        let mut added = Vec::new();
        for candidate in candidates {
            if judge.any_exported(&candidate.targets)? {
                added.push((ResourceType::PROVENANCE, candidate.seq));
            }
        }
        store.scratch_insert(job.id(), &added)?;
        let Some(last_seq) = last_seq.filter(|_| read >= PROVENANCE_PER_CHECKPOINT) else {
            return finish_stage(store, job, CollectionStage::Provenance);
        };
        after_seq = last_seq;
        job.persist(store, |record| {
            record.state = JobState::CollectingProvenance { after_seq };
        })?;
        job.touch();
    }
}

/// The local `Provenance.target` references of a stored Provenance body.
fn local_targets(
    body: &[u8],
    local_base: &LocalBase,
) -> Result<Vec<(ResourceType, String)>, StoreError> {
    let provenance: Value = serde_json::from_slice(body).map_err(|error| {
        StoreError::Corrupt(format!("a stored Provenance is not JSON: {error}"))
    })?;
    let references = provenance
        .get("target")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|target| target.get("reference").and_then(Value::as_str));
    Ok(references
        .filter_map(|reference| {
            let literal = local_base.local_reference(reference)?;
            let resource_type = ResourceType::parse(literal.resource_type_name).ok()?;
            Some((resource_type, literal.id.to_owned()))
        })
        .collect())
}

/// Decides whether a resource named by a Provenance is in the export.
struct ExportedTargets<'a> {
    store: &'a Store,
    job_id: &'a str,
    request: &'a ExportRequest,
    local_base: &'a LocalBase,
    window: SeqWindow,
    compartment_types: HashSet<ResourceType>,
    type_filters: HashMap<ResourceType, Option<TypeFilter>>,
}

impl ExportedTargets<'_> {
    fn any_exported(&mut self, targets: &[(ResourceType, String)]) -> Result<bool, ExportError> {
        for (resource_type, id) in targets {
            if self.is_exported(*resource_type, id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the version of `resource_type/id` current at the snapshot is exported: a
    /// compartment resource the export covers, or (under RelevantProvenanceResources) a
    /// resource `_referenced` added.
    fn is_exported(&mut self, resource_type: ResourceType, id: &str) -> Result<bool, ExportError> {
        let Some(seq) = version_as_of(self.store, resource_type, id, self.window.through_seq)?
        else {
            return Ok(false);
        };
        if !self.compartment_types.contains(&resource_type) {
            return Ok(self.request.wants_relevant_provenance()
                && self
                    .store
                    .scratch_contains(self.job_id, resource_type, seq)?);
        }
        if !self.window.contains(seq) {
            return Ok(false);
        }
        if collects_members(self.request)
            && !self
                .store
                .scratch_contains(self.job_id, resource_type, seq)?
        {
            return Ok(false);
        }
        let type_filter = match self.type_filters.get(&resource_type) {
            Some(type_filter) => type_filter,
            None => {
                let parsed = self
                    .request
                    .type_filters
                    .filter_for(resource_type, self.local_base)
                    .map_err(|problem| {
                        ExportError::invalid_request(format!("_typeFilter: {problem}"))
                    })?;
                self.type_filters.entry(resource_type).or_insert(parsed)
            }
        };
        let verdict = self.store.with_event(resource_type, seq, |view| {
            if view.deleted {
                return Ok(false);
            }
            if resource_type != ResourceType::PATIENT && view.compartment_patients.is_empty() {
                return Ok(false);
            }
            let Some(type_filter) = type_filter else {
                return Ok(true);
            };
            let resource: Value = serde_json::from_slice(view.body).map_err(|error| {
                StoreError::Corrupt(format!("stored event {seq} is not JSON: {error}"))
            })?;
            Ok::<bool, StoreError>(type_filter.matches(&resource))
        })?;
        Ok(verdict.transpose()?.unwrap_or(false))
    }
}
