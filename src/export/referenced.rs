//! `includeAssociatedData=_referenced`: after the compartments are known, walks every
//! exported compartment resource as of the snapshot, follows each local literal reference
//! one hop to a type outside the Patient compartment, and adds the target's version at the
//! snapshot to the job's scratch set, so it is exported once however many records point
//! to it. Targets missing at the snapshot are noted for the `error` file. The walk reads
//! chunks of at most `RESOURCES_PER_REFERENCED_CHUNK` resources or
//! `TARGETS_PER_CHUNK` distinct targets (each chunk is a fresh scan, so chunks are
//! large) and saves its cursor durably after a chunk once `CHECKPOINT_INTERVAL` has
//! passed, so a restart resumes it (each durable save is an fsync).

use std::collections::{BTreeSet, HashSet};

use super::error::ExportError;
use super::job::{
    JobState, MissingReason, MissingReference, ReferencedCursor, save_missing_references,
};
use super::planner::{CollectionStage, covered_types, finish_stage, version_as_of};
use super::registry::JobHandle;
use super::request::{ExportLevel, ExportRequest, TypeFilter};
use crate::fhir::compartment::PatientCompartment;
use crate::fhir::{LocalBase, ResourceType};
use crate::store::{EventView, ScanControl, SeqWindow, Store, StoreError};

/// Most compartment resources read per chunk.
const RESOURCES_PER_REFERENCED_CHUNK: usize = 65_536;
/// Most distinct targets held in memory per chunk.
const TARGETS_PER_CHUNK: usize = 16_384;
/// Least time between durable saves of the walk's cursor.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Resolved targets remembered across chunks, so a Practitioner that thousands of records
/// name is looked up about once; the memory is cleared when full, so it stays bounded.
const RESOLVED_TARGETS_REMEMBERED: usize = 65_536;
/// Compartment resources read between progress reports and cancellation checks.
const RESOURCES_PER_PROGRESS_REPORT: usize = 256;

/// The types `_referenced` may add: those outside the Patient compartment, narrowed by
/// `_type`.
pub fn associated_types(request: &ExportRequest) -> Vec<ResourceType> {
    let compartment = PatientCompartment::r4();
    ResourceType::all()
        .filter(|resource_type| !compartment.contains_type(*resource_type))
        .filter(|resource_type| {
            request
                .types
                .as_ref()
                .is_none_or(|types| types.contains(resource_type))
        })
        .collect()
}

/// Whether the compartment resources of a job are in its scratch set (Group and
/// `patient=` exports) rather than found by scanning the compartment types.
pub fn collects_members(request: &ExportRequest) -> bool {
    matches!(request.level, ExportLevel::Group(_)) || !request.patients.is_empty()
}

/// One local reference to a type `_referenced` may add.
type Target = (ResourceType, String);

/// Walks the compartment resources from the job's cursor to the end, then moves the job
/// on to its next stage. Runs on a worker; stops at once when the job must stop.
pub fn run_referenced_collection(
    store: &Store,
    job: &JobHandle,
    local_base: &LocalBase,
) -> Result<(), ExportError> {
    let (request, window, mut cursor) = {
        let record = job.record();
        let JobState::CollectingReferenced { cursor } = record.state else {
            return Ok(());
        };
        (record.request.clone(), record.window, cursor)
    };
    let walked_types = covered_types(&request);
    let addable: HashSet<ResourceType> = associated_types(&request).into_iter().collect();
    let mut resolved: HashSet<Target> = HashSet::new();
    let mut last_checkpoint = std::time::Instant::now();
    while let Some(&resource_type) = walked_types.get(cursor.type_index) {
        let type_filter = request
            .type_filters
            .filter_for(resource_type, local_base)
            .map_err(|problem| ExportError::invalid_request(format!("_typeFilter: {problem}")))?;
        let walk = ReferenceWalk {
            store,
            job,
            local_base,
            addable: &addable,
            type_filter: type_filter.as_ref(),
        };
        let chunk_window = SeqWindow {
            after_seq: cursor.after_seq.max(window.after_seq),
            through_seq: window.through_seq,
        };
        let chunk = if collects_members(&request) {
            walk.read_collected_chunk(resource_type, chunk_window)?
        } else {
            walk.read_compartment_chunk(resource_type, chunk_window)?
        };
        if resolved.len() + chunk.targets.len() > RESOLVED_TARGETS_REMEMBERED {
            resolved.clear();
        }
        let fresh: Vec<Target> = chunk
            .targets
            .into_iter()
            .filter(|target| !resolved.contains(target))
            .collect();
        let resolved_chunk = resolve_targets(store, &fresh, window.through_seq)?;
        resolved.extend(fresh);
        store.scratch_insert(job.id(), &resolved_chunk.found)?;
        save_missing_references(store, job.id(), &resolved_chunk.missing)?;
        cursor = match chunk.last_seq {
            Some(last_seq) if !chunk.type_finished => ReferencedCursor {
                type_index: cursor.type_index,
                after_seq: last_seq,
            },
            _ => ReferencedCursor {
                type_index: cursor.type_index + 1,
                after_seq: 0,
            },
        };
        job.touch();
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            job.persist(store, |record| {
                record.state = JobState::CollectingReferenced { cursor };
            })?;
            last_checkpoint = std::time::Instant::now();
        }
    }
    finish_stage(store, job, CollectionStage::Referenced)
}

/// The local targets found in one chunk of compartment resources.
struct ReferenceChunk {
    targets: BTreeSet<Target>,
    /// Seq of the last resource read, if any.
    last_seq: Option<u64>,
    /// Whether the type has no resources after this chunk.
    type_finished: bool,
}

impl ReferenceChunk {
    /// A chunk that has read nothing yet; a read that stops early marks the type unfinished.
    fn empty() -> ReferenceChunk {
        ReferenceChunk {
            targets: BTreeSet::new(),
            last_seq: None,
            type_finished: true,
        }
    }

    /// Whether the chunk, `read` resources long, takes no more.
    fn is_full(&self, read: usize) -> bool {
        read >= RESOURCES_PER_REFERENCED_CHUNK || self.targets.len() >= TARGETS_PER_CHUNK
    }
}

struct ReferenceWalk<'a> {
    store: &'a Store,
    job: &'a JobHandle,
    local_base: &'a LocalBase,
    addable: &'a HashSet<ResourceType>,
    type_filter: Option<&'a TypeFilter>,
}

impl ReferenceWalk<'_> {
    /// Reads up to a chunk of the type's compartment resources current at the snapshot
    /// (the all-patients export's selection) after `window.after_seq`.
    fn read_compartment_chunk(
        &self,
        resource_type: ResourceType,
        window: SeqWindow,
    ) -> Result<ReferenceChunk, ExportError> {
        let mut chunk = ReferenceChunk::empty();
        let mut read = 0usize;
        let mut failure = None;
        self.store
            .scan_newest_in_window(resource_type, window, window.through_seq, |view| {
                chunk.last_seq = Some(view.seq);
                let in_compartment =
                    resource_type == ResourceType::PATIENT || !view.compartment_patients.is_empty();
                if !view.deleted && in_compartment {
                    read += 1;
                    if let Err(error) = self.note_targets(view, read, &mut chunk.targets) {
                        failure = Some(error);
                        return ScanControl::Stop;
                    }
                }
                if chunk.is_full(read) {
                    chunk.type_finished = false;
                    return ScanControl::Stop;
                }
                ScanControl::Continue
            })?;
        match failure {
            Some(error) => Err(error),
            None => Ok(chunk),
        }
    }

    /// Reads up to a chunk of the type's resources in the job's scratch set after
    /// `window.after_seq`.
    fn read_collected_chunk(
        &self,
        resource_type: ResourceType,
        window: SeqWindow,
    ) -> Result<ReferenceChunk, ExportError> {
        let mut chunk = ReferenceChunk::empty();
        let mut read = 0usize;
        let mut failure = None;
        self.store
            .scratch_scan(self.job.id(), resource_type, window, |seq| {
                chunk.last_seq = Some(seq);
                read += 1;
                let noted = self
                    .store
                    .with_event(resource_type, seq, |view| {
                        if view.deleted {
                            return Ok(());
                        }
                        self.note_targets(view, read, &mut chunk.targets)
                    })?
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("collected event {seq} is missing"))
                    })?;
                if let Err(error) = noted {
                    failure = Some(error);
                    return Ok(ScanControl::Stop);
                }
                if chunk.is_full(read) {
                    chunk.type_finished = false;
                    return Ok(ScanControl::Stop);
                }
                Ok(ScanControl::Continue)
            })?;
        match failure {
            Some(error) => Err(error),
            None => Ok(chunk),
        }
    }

    /// Adds the addable local targets of one exported resource (the `read`-th of its
    /// chunk); a resource its type's `_typeFilter` leaves out adds none.
    fn note_targets(
        &self,
        view: &EventView<'_>,
        read: usize,
        targets: &mut BTreeSet<Target>,
    ) -> Result<(), ExportError> {
        if read.is_multiple_of(RESOURCES_PER_PROGRESS_REPORT) {
            self.job.touch();
            if self.job.should_stop() {
                return Err(ExportError::cancelled());
            }
        }
        let body = view.body;
        if let Some(type_filter) = self.type_filter {
            let resource: serde_json::Value = serde_json::from_slice(body).map_err(|error| {
                StoreError::Corrupt(format!("stored event {} is not JSON: {error}", view.seq))
            })?;
            if !type_filter.matches(&resource) {
                return Ok(());
            }
        }
        for_each_reference_string(body, |reference| {
            let addable = self
                .local_base
                .local_type_name(reference)
                .and_then(|type_name| ResourceType::parse(type_name).ok())
                .is_some_and(|resource_type| self.addable.contains(&resource_type));
            if !addable {
                return;
            }
            let Some(literal) = self.local_base.local_reference(reference) else {
                return;
            };
            if let Ok(resource_type) = ResourceType::parse(literal.resource_type_name)
                && self.addable.contains(&resource_type)
            {
                targets.insert((resource_type, literal.id.to_owned()));
            }
        });
        Ok(())
    }
}

/// Targets resolved as of the snapshot.
struct ResolvedTargets {
    /// Scratch keys of the versions current at the snapshot.
    found: Vec<(ResourceType, u64)>,
    /// Targets that had no version then, or whose current version was a delete.
    missing: Vec<MissingReference>,
}

/// Resolves each target to its version current at `through_seq`.
fn resolve_targets(
    store: &Store,
    targets: &[Target],
    through_seq: u64,
) -> Result<ResolvedTargets, StoreError> {
    let mut found = Vec::with_capacity(targets.len());
    let mut missing = Vec::new();
    for (resource_type, id) in targets {
        let reason = match version_as_of(store, *resource_type, id, through_seq)? {
            Some(seq) => {
                let deleted = store
                    .with_event(*resource_type, seq, |view| view.deleted)?
                    .unwrap_or(true);
                if !deleted {
                    found.push((*resource_type, seq));
                    continue;
                }
                MissingReason::Deleted
            }
            None => MissingReason::Absent,
        };
        missing.push(MissingReference {
            reference: format!("{resource_type}/{id}"),
            reason,
        });
    }
    Ok(ResolvedTargets { found, missing })
}

/// The member pattern that starts a `reference` string in a stored body, which is
/// canonical minified JSON: inside a JSON string the quotes would be escaped, so every
/// match is a member named `reference` whose value is a string.
const REFERENCE_MEMBER: &[u8] = b"\"reference\":\"";

/// Calls `visit` with the value of every `reference` member holding a string, at any
/// depth; only those values are checked as UTF-8, not the whole body.
fn for_each_reference_string(body: &[u8], mut visit: impl FnMut(&str)) {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(REFERENCE_MEMBER));
    let mut rest = body;
    while let Some(found) = FINDER.find(rest) {
        let value_start = found + REFERENCE_MEMBER.len();
        let Some(value_length) = string_length(&rest[value_start..]) else {
            return;
        };
        let raw = &rest[value_start..value_start + value_length];
        if raw.contains(&b'\\') {
            let quoted = &rest[value_start - 1..value_start + value_length + 1];
            if let Ok(unescaped) = serde_json::from_slice::<String>(quoted) {
                visit(&unescaped);
            }
        } else if let Ok(text) = std::str::from_utf8(raw) {
            visit(text);
        }
        rest = &rest[value_start + value_length..];
    }
}

/// The length of a JSON string's contents up to its closing quote (escapes skipped).
fn string_length(bytes: &[u8]) -> Option<usize> {
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'\\' => index += 2,
            b'"' => return Some(index),
            _ => index += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn references_in(body: &str) -> Vec<String> {
        let mut found = Vec::new();
        for_each_reference_string(body.as_bytes(), |reference| {
            found.push(reference.to_owned())
        });
        found
    }

    #[test]
    fn every_reference_string_of_a_canonical_body_is_found_at_any_depth() {
        let body = r##"{"resourceType":"Encounter","id":"e1","contained":[{"resourceType":"Location","id":"l"}],"location":[{"location":{"reference":"#l"}},{"location":{"reference":"Location/l2"}}],"participant":[{"individual":{"display":"x","reference":"Practitioner/p\"q"}}],"serviceProvider":{"reference":"Organization/o1"},"text":{"div":"\"reference\":\"Patient/fake\""},"subject":{"reference":{"not":"a string"}}}"##;
        assert_eq!(
            references_in(body),
            vec!["#l", "Location/l2", "Practitioner/p\"q", "Organization/o1"]
        );
        assert!(references_in(r#"{"reference":"unterminated"#).is_empty());
    }
}
