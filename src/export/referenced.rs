//! `includeAssociatedData=_referenced`: every local literal reference of an exported
//! compartment resource to a type outside the Patient compartment is followed one hop,
//! and the target's version at the snapshot joins the job's scratch set, so it is
//! exported once however many records point to it; targets missing at the snapshot are
//! noted for the `error` file. The references are collected in the same pass that exports
//! the compartment resources ([`ReferenceCollector`], used by the units of
//! [`JobState::ExportingCompartments`]), and each batch reaches the scratch set before the
//! checkpoint after it. The compartment types whose export waits for the referenced set
//! (Provenance) are walked afterwards ([`run_referenced_collection`]) in chunks of at
//! most `RESOURCES_PER_REFERENCED_CHUNK` resources, with the walk's cursor saved durably
//! after a chunk once `CHECKPOINT_INTERVAL` has passed, so a restart resumes it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use super::error::ExportError;
use super::job::{
    JobState, MissingReason, MissingReference, ReferencedCursor, save_missing_references,
};
use super::planner::{
    CollectionStage, covered_types, deferred_compartment_types, finish_stage, version_as_of,
};
use super::registry::{JobHandle, lock};
use super::request::{ExportLevel, ExportRequest, TypeFilter};
use super::worker::body_meets_type_filter;
use crate::fhir::compartment::PatientCompartment;
use crate::fhir::{LocalBase, ResourceType};
use crate::store::{EventView, ScanControl, SeqWindow, Store, StoreError};

/// Most compartment resources a walk reads per chunk.
const RESOURCES_PER_REFERENCED_CHUNK: usize = 65_536;
/// Most distinct unresolved targets a collector holds before adding them to the scratch
/// set.
const TARGETS_PER_BATCH: usize = 16_384;
/// Least time between durable saves of a walk's cursor.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Resolved targets a job remembers, so a Practitioner that thousands of records name is
/// looked up about once; the memory is cleared when full, so it stays bounded.
const RESOLVED_TARGETS_REMEMBERED: usize = 65_536;
/// Compartment resources a walk reads between progress reports and cancellation checks.
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

/// The targets a job's collectors have added to its scratch set (or noted missing) in
/// this run, shared by its workers. Forgetting one only costs a second look-up.
#[derive(Default)]
pub struct ResolvedReferences {
    targets: Mutex<HashSet<Target>>,
}

impl ResolvedReferences {
    /// `targets` without those already resolved.
    fn unresolved(&self, targets: BTreeMap<ResourceType, HashSet<String>>) -> Vec<Target> {
        let resolved = lock(&self.targets);
        targets
            .into_iter()
            .flat_map(|(resource_type, ids)| ids.into_iter().map(move |id| (resource_type, id)))
            .filter(|target| !resolved.contains(target))
            .collect()
    }

    /// Remembers targets whose resolution is in the store.
    fn remember(&self, targets: Vec<Target>) {
        let mut resolved = lock(&self.targets);
        if resolved.len() + targets.len() > RESOLVED_TARGETS_REMEMBERED {
            resolved.clear();
        }
        resolved.extend(targets);
    }
}

/// The types `_referenced` may add, looked up by name without parsing it: every
/// reference of every exported resource is looked up, and most name compartment types.
struct AddableTypes {
    /// The types by the length of their name.
    by_name_length: Vec<Vec<ResourceType>>,
}

impl AddableTypes {
    fn new(types: Vec<ResourceType>) -> AddableTypes {
        let mut by_name_length: Vec<Vec<ResourceType>> = Vec::new();
        for resource_type in types {
            let length = resource_type.as_str().len();
            if by_name_length.len() <= length {
                by_name_length.resize_with(length + 1, Vec::new);
            }
            by_name_length[length].push(resource_type);
        }
        AddableTypes { by_name_length }
    }

    /// The addable type named `type_name`, if any.
    fn named(&self, type_name: &[u8]) -> Option<ResourceType> {
        self.by_name_length
            .get(type_name.len())?
            .iter()
            .copied()
            .find(|resource_type| resource_type.as_str().as_bytes() == type_name)
    }
}

/// Gathers the addable local targets of exported compartment resources and adds their
/// versions at the job's snapshot to its scratch set. Call
/// [`ReferenceCollector::add_pending_to_scratch`] before saving a checkpoint that covers
/// the resources noted, so a restart never skips their targets.
pub struct ReferenceCollector<'a> {
    store: &'a Store,
    job: &'a JobHandle,
    local_base: &'a LocalBase,
    addable: AddableTypes,
    snapshot_through_seq: u64,
    /// Targets noted since the last batch was added, by type.
    pending: BTreeMap<ResourceType, HashSet<String>>,
    pending_count: usize,
}

impl<'a> ReferenceCollector<'a> {
    pub fn new(
        store: &'a Store,
        job: &'a JobHandle,
        local_base: &'a LocalBase,
    ) -> ReferenceCollector<'a> {
        let (addable, snapshot_through_seq) = {
            let record = job.record();
            (
                AddableTypes::new(associated_types(&record.request)),
                record.window.through_seq,
            )
        };
        ReferenceCollector {
            store,
            job,
            local_base,
            addable,
            snapshot_through_seq,
            pending: BTreeMap::new(),
            pending_count: 0,
        }
    }

    /// Notes the addable local targets an exported resource's stored body references.
    pub fn note_references_of(&mut self, body: &[u8]) {
        for_each_reference_value(body, |value| {
            let resource_type = self
                .local_base
                .local_type_name(value)
                .and_then(|type_name| self.addable.named(type_name))?;
            let reference = read_string(value)?;
            let literal = self.local_base.local_reference(&reference)?;
            let ids = self.pending.entry(resource_type).or_default();
            if !ids.contains(literal.id) {
                ids.insert(literal.id.to_owned());
                self.pending_count += 1;
            }
            Some(())
        });
    }

    /// Whether enough targets wait that they should be added now.
    pub fn is_full(&self) -> bool {
        self.pending_count >= TARGETS_PER_BATCH
    }

    /// Resolves the targets noted so far that the job has not resolved yet, adds the
    /// versions found to the scratch set and notes the missing ones (not fsynced: the
    /// next checkpoint or record save, written after them, makes them durable).
    pub fn add_pending_to_scratch(&mut self) -> Result<(), ExportError> {
        if self.pending_count == 0 {
            return Ok(());
        }
        self.pending_count = 0;
        let resolved_references = self.job.resolved_references();
        let fresh = resolved_references.unresolved(std::mem::take(&mut self.pending));
        let resolved = resolve_targets(self.store, &fresh, self.snapshot_through_seq)?;
        self.store.scratch_insert(self.job.id(), &resolved.found)?;
        save_missing_references(self.store, self.job.id(), &resolved.missing)?;
        resolved_references.remember(fresh);
        Ok(())
    }
}

/// Walks the compartment resources of the walk's types from the job's cursor to the end,
/// then moves the job on to its next stage. `CollectingReferenced` (jobs planned before
/// references were collected while exporting) walks every covered type;
/// `CollectingDeferredReferenced` the types exported after the referenced set is known.
/// Runs on a worker; stops at once when the job must stop.
pub fn run_referenced_collection(
    store: &Store,
    job: &JobHandle,
    local_base: &LocalBase,
) -> Result<(), ExportError> {
    let (request, window, state) = {
        let record = job.record();
        (record.request.clone(), record.window, record.state.clone())
    };
    let (walked_types, mut cursor, save_cursor): (_, _, fn(ReferencedCursor) -> JobState) =
        match state {
            JobState::CollectingReferenced { cursor } => {
                (covered_types(&request), cursor, |cursor| {
                    JobState::CollectingReferenced { cursor }
                })
            }
            JobState::CollectingDeferredReferenced { cursor } => {
                (deferred_compartment_types(&request), cursor, |cursor| {
                    JobState::CollectingDeferredReferenced { cursor }
                })
            }
            _ => return Ok(()),
        };
    let mut collector = ReferenceCollector::new(store, job, local_base);
    let mut last_checkpoint = std::time::Instant::now();
    while let Some(&resource_type) = walked_types.get(cursor.type_index) {
        let type_filter = request
            .type_filters
            .filter_for(resource_type, local_base)
            .map_err(|problem| ExportError::invalid_request(format!("_typeFilter: {problem}")))?;
        let mut walk = ReferenceWalk {
            store,
            job,
            collector: &mut collector,
            type_filter: type_filter.as_ref(),
            read: 0,
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
        collector.add_pending_to_scratch()?;
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
            job.persist(store, |record| record.state = save_cursor(cursor))?;
            last_checkpoint = std::time::Instant::now();
        }
    }
    finish_stage(store, job, CollectionStage::Referenced)
}

/// Where one chunk of a walk ended.
struct ChunkEnd {
    /// Seq of the last resource read, if any.
    last_seq: Option<u64>,
    /// Whether the type has no resources after this chunk.
    type_finished: bool,
}

impl ChunkEnd {
    /// A chunk that has read nothing yet; a read that stops early marks the type unfinished.
    fn empty() -> ChunkEnd {
        ChunkEnd {
            last_seq: None,
            type_finished: true,
        }
    }
}

struct ReferenceWalk<'a, 'collector> {
    store: &'a Store,
    job: &'a JobHandle,
    collector: &'a mut ReferenceCollector<'collector>,
    type_filter: Option<&'a TypeFilter>,
    /// Resources read in this chunk.
    read: usize,
}

impl ReferenceWalk<'_, '_> {
    /// Whether the chunk takes no more.
    fn is_full(&self) -> bool {
        self.read >= RESOURCES_PER_REFERENCED_CHUNK || self.collector.is_full()
    }

    /// Reads up to a chunk of the type's compartment resources current at the snapshot
    /// (the all-patients export's selection) after `window.after_seq`.
    fn read_compartment_chunk(
        &mut self,
        resource_type: ResourceType,
        window: SeqWindow,
    ) -> Result<ChunkEnd, ExportError> {
        let mut chunk = ChunkEnd::empty();
        let mut failure = None;
        self.store
            .scan_newest_in_window(resource_type, window, window.through_seq, |view| {
                chunk.last_seq = Some(view.seq);
                let in_compartment =
                    resource_type == ResourceType::PATIENT || !view.compartment_patients.is_empty();
                if !view.deleted
                    && in_compartment
                    && let Err(error) = self.note_targets(view)
                {
                    failure = Some(error);
                    return ScanControl::Stop;
                }
                if self.is_full() {
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
        &mut self,
        resource_type: ResourceType,
        window: SeqWindow,
    ) -> Result<ChunkEnd, ExportError> {
        let mut chunk = ChunkEnd::empty();
        let mut failure = None;
        let store = self.store;
        let job_id = self.job.id();
        store.scratch_scan(job_id, resource_type, window, |seq| {
            chunk.last_seq = Some(seq);
            let noted = store
                .with_event(resource_type, seq, |view| {
                    if view.deleted {
                        return Ok(());
                    }
                    self.note_targets(view)
                })?
                .ok_or_else(|| StoreError::Corrupt(format!("collected event {seq} is missing")))?;
            if let Err(error) = noted {
                failure = Some(error);
                return Ok(ScanControl::Stop);
            }
            if self.is_full() {
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

    /// Notes the addable local targets of one exported resource; a resource its type's
    /// `_typeFilter` leaves out adds none.
    fn note_targets(&mut self, view: &EventView<'_>) -> Result<(), ExportError> {
        self.read += 1;
        if self.read.is_multiple_of(RESOURCES_PER_PROGRESS_REPORT) {
            self.job.touch();
            if self.job.should_stop() {
                return Err(ExportError::cancelled());
            }
        }
        if let Some(type_filter) = self.type_filter
            && !body_meets_type_filter(type_filter, view)?
        {
            return Ok(());
        }
        self.collector.note_references_of(view.body);
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

/// Calls `visit` with the rest of the body from the start of the value of every
/// `reference` member holding a string, at any depth: the value up to its closing quote
/// is the reference ([`read_string`]).
fn for_each_reference_value(body: &[u8], mut visit: impl FnMut(&[u8]) -> Option<()>) {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(REFERENCE_MEMBER));
    let mut rest = body;
    while let Some(found) = FINDER.find(rest) {
        rest = &rest[found + REFERENCE_MEMBER.len()..];
        visit(rest);
    }
}

/// The JSON string that starts at `value` (just after its opening quote), unescaped;
/// `None` when it is not terminated or not valid.
fn read_string(value: &[u8]) -> Option<Cow<'_, str>> {
    let length = string_length(value)?;
    let raw = &value[..length];
    if raw.contains(&b'\\') {
        let mut quoted = Vec::with_capacity(length + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw);
        quoted.push(b'"');
        return serde_json::from_slice::<String>(&quoted)
            .ok()
            .map(Cow::Owned);
    }
    std::str::from_utf8(raw).ok().map(Cow::Borrowed)
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
        for_each_reference_value(body.as_bytes(), |value| {
            found.push(read_string(value)?.into_owned());
            Some(())
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
