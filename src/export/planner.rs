//! The planner: every plan step of a job — the snapshot window, the members of a Group or
//! `patient=` list as of the snapshot, collecting their compartments into the job's
//! scratch set (checkpointed, on a worker), the order of the collection stages that follow
//! ([`referenced`](super::referenced), [`provenance`](super::provenance)), and splitting
//! each type's seq range into work units.

use std::collections::{BTreeSet, HashSet};

use super::error::ExportError;
use super::job::{JobState, ReferencedCursor, UnitSource, WorkUnit, load_members};
use super::provenance::{collects_provenance, run_provenance_collection};
use super::referenced::{associated_types, collects_members, run_referenced_collection};
use super::registry::JobHandle;
use super::request::{ExportLevel, ExportRequest};
use crate::fhir::compartment::PatientCompartment;
use crate::fhir::{Instant, LocalBase, ResourceId, ResourceType};
use crate::store::{SeqWindow, Store, StoreError};

/// Largest seq span one work unit covers; large types become several units so every
/// worker has something to do.
const UNIT_SEQ_SPAN: u64 = 100_000;
/// Compartment members examined between progress reports.
const PROGRESS_EVERY_MEMBERS: usize = 128;
/// Member patients collected between durable checkpoints.
const MEMBERS_PER_COLLECTION_CHECKPOINT: usize = 1024;

/// The export's snapshot: the seq window and the instant the manifest reports.
pub struct Snapshot {
    pub window: SeqWindow,
    pub transaction_time: Instant,
}

/// What a new job starts from: its snapshot, and either its units or the members whose
/// compartments a worker collects first.
pub struct NewJobPlan {
    pub snapshot: Snapshot,
    pub members: Option<Vec<String>>,
    pub units: Vec<WorkUnit>,
    pub state: JobState,
}

/// Plans a job at kick-off: fixes the snapshot and resolves members; the units of a
/// system or all-patients export are planned at once, a member export's after collection.
pub fn plan_new_job(
    store: &Store,
    request: &ExportRequest,
    now: Instant,
    local_base: &LocalBase,
) -> Result<NewJobPlan, ExportError> {
    let snapshot = take_snapshot(store, request, now)?;
    let members = resolve_members(store, request, snapshot.window.through_seq, local_base)?;
    let (units, state) = match &members {
        Some(_) => (Vec::new(), JobState::Collecting { next_member: 0 }),
        None => {
            let units = plan_event_units(
                store,
                request,
                first_pass_compartment_types(request),
                snapshot.window,
            )?;
            let state = next_stage(request, snapshot.window, CollectionStage::Members)
                .unwrap_or(JobState::Exporting);
            (units, state)
        }
    };
    Ok(NewJobPlan {
        snapshot,
        members,
        units,
        state,
    })
}

/// Runs the collection stages a job still has, from where the last checkpoint left off:
/// the members' compartments, the resources they reference (under `_referenced`, after
/// the units of [`JobState::ExportingCompartments`] collected most of them), then the
/// Provenance of the exported resources. Runs on a worker; stops at once when the job
/// must stop or its next stage is exporting.
pub fn run_collection(
    store: &Store,
    job: &JobHandle,
    local_base: &LocalBase,
) -> Result<(), ExportError> {
    collect_members(store, job)?;
    run_referenced_collection(store, job, local_base)?;
    run_provenance_collection(store, job, local_base)
}

/// The collection stages of a Patient or Group export, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CollectionStage {
    /// The members' compartments (Group and `patient=` exports).
    Members,
    /// Exporting the compartments' first-pass types while collecting the resources they
    /// reference (`_referenced`).
    CompartmentExport,
    /// The resources the other compartment resources reference (`_referenced`).
    Referenced,
    /// The Provenance whose targets are exported.
    Provenance,
}

/// The state of the first stage after `finished` that the request needs; `None` when
/// collecting is over.
fn next_stage(
    request: &ExportRequest,
    window: SeqWindow,
    finished: CollectionStage,
) -> Option<JobState> {
    if finished < CollectionStage::CompartmentExport && request.wants_referenced() {
        return Some(JobState::ExportingCompartments);
    }
    if finished < CollectionStage::Referenced && request.wants_referenced() {
        return Some(JobState::CollectingDeferredReferenced {
            cursor: ReferencedCursor::default(),
        });
    }
    if finished < CollectionStage::Provenance && collects_provenance(request) {
        return Some(JobState::CollectingProvenance {
            after_seq: window.after_seq,
        });
    }
    None
}

/// Moves the job from the `finished` stage to the next one it needs. Exporting the
/// compartments first plans their units; when collecting is over, the units still missing
/// are planned (those of the compartment types not exported yet, and those over the
/// scratch set's referenced resources and Provenance) after the ones planned before,
/// and the job moves on to exporting.
pub fn finish_stage(
    store: &Store,
    job: &JobHandle,
    finished: CollectionStage,
) -> Result<(), ExportError> {
    let (request, window, planned_units) = {
        let record = job.record();
        (record.request.clone(), record.window, record.units.clone())
    };
    match next_stage(&request, window, finished) {
        Some(JobState::ExportingCompartments) if collects_members(&request) => {
            let units =
                plan_collected_units(store, job.id(), first_pass_compartment_types(&request))?;
            job.persist(store, |record| {
                record.units = units;
                record.state = JobState::ExportingCompartments;
            })
        }
        Some(state) => job.persist(store, |record| record.state = state),
        None => {
            let units = plan_remaining_units(store, job.id(), &request, window, planned_units)?;
            job.persist(store, |record| {
                record.units = units;
                record.state = JobState::Exporting;
            })
        }
    }
}

/// `planned_units` followed by the units of every type still without units: the event
/// units of compartment types not planned yet (all-patients exports), then units over the
/// scratch set for the referenced types, Provenance, and (Group and `patient=` exports)
/// the compartment types not planned yet. A type planned before keeps its units, so a
/// compartment type exported in the first pass is not exported again.
fn plan_remaining_units(
    store: &Store,
    job_id: &str,
    request: &ExportRequest,
    window: SeqWindow,
    planned_units: Vec<WorkUnit>,
) -> Result<Vec<WorkUnit>, StoreError> {
    let planned_types: HashSet<ResourceType> = planned_units
        .iter()
        .map(|unit| unit.resource_type)
        .collect();
    let mut scratch_types: BTreeSet<ResourceType> = associated_types(request).into_iter().collect();
    let mut units = planned_units;
    if collects_members(request) {
        scratch_types.extend(
            covered_types(request)
                .into_iter()
                .filter(|resource_type| !planned_types.contains(resource_type)),
        );
    } else {
        let unplanned = compartment_export_types(request)
            .into_iter()
            .filter(|resource_type| !planned_types.contains(resource_type))
            .collect();
        units.extend(plan_event_units(store, request, unplanned, window)?);
        scratch_types.insert(ResourceType::PROVENANCE);
    }
    units.extend(plan_collected_units(store, job_id, scratch_types)?);
    Ok(units)
}

/// Collects the members' compartments into the job's scratch set from where the last
/// checkpoint left off, then moves the job on to its next stage.
fn collect_members(store: &Store, job: &JobHandle) -> Result<(), ExportError> {
    let (request, window, mut next_member) = {
        let record = job.record();
        let JobState::Collecting { next_member } = record.state else {
            return Ok(());
        };
        (record.request.clone(), record.window, next_member)
    };
    let members = load_members(store, job.id())?;
    let covered: HashSet<ResourceType> = compartment_export_types(&request).into_iter().collect();
    while next_member < members.len() {
        let chunk_end = (next_member + MEMBERS_PER_COLLECTION_CHECKPOINT).min(members.len());
        let mut collected = Vec::new();
        for patient_id in &members[next_member..chunk_end] {
            if job.should_stop() {
                return Err(ExportError::cancelled());
            }
            job.touch();
            collect_member(
                store,
                &request,
                window,
                patient_id,
                &covered,
                &mut collected,
                &|| job.touch(),
            )?;
        }
        store.scratch_insert(job.id(), &collected)?;
        next_member = chunk_end;
        job.persist(store, |record| {
            record.state = JobState::Collecting { next_member };
        })?;
        job.touch();
    }
    finish_stage(store, job, CollectionStage::Members)
}

/// Fixes the snapshot: everything committed so far (or up to `_until`), after `_since`.
pub fn take_snapshot(
    store: &Store,
    request: &ExportRequest,
    now: Instant,
) -> Result<Snapshot, StoreError> {
    let high_water_seq = store.high_water_seq()?;
    let (through_seq, transaction_time) = match request.until.filter(|until| *until < now) {
        Some(until) => (store.seq_at_or_before(until)?.min(high_water_seq), until),
        None => {
            let last_commit = store.commit_instant(high_water_seq)?.unwrap_or(now);
            (high_water_seq, last_commit)
        }
    };
    let after_seq = match request.since {
        Some(since) => store.seq_at_or_before(since)?.min(through_seq),
        None => 0,
    };
    Ok(Snapshot {
        window: SeqWindow {
            after_seq,
            through_seq,
        },
        transaction_time,
    })
}

/// The types a level covers, narrowed by `_type`. A Group export leaves Groups out:
/// it exports the members' data, not the groups that define membership.
pub fn covered_types(request: &ExportRequest) -> Vec<ResourceType> {
    let level_types: Vec<ResourceType> = match request.level {
        ExportLevel::System => ResourceType::all().collect(),
        ExportLevel::AllPatients => PatientCompartment::r4().types().collect(),
        ExportLevel::Group(_) => PatientCompartment::r4()
            .types()
            .filter(|resource_type| *resource_type != ResourceType::GROUP)
            .collect(),
    };
    match &request.types {
        Some(requested) => level_types
            .into_iter()
            .filter(|resource_type| requested.contains(resource_type))
            .collect(),
        None => level_types,
    }
}

/// The compartment types a `_referenced` export exports in its first pass, collecting
/// their references as it goes: all but Provenance, whose export waits for the Provenance
/// stage, which needs the referenced set. Without `_referenced`, every compartment type.
pub fn first_pass_compartment_types(request: &ExportRequest) -> Vec<ResourceType> {
    let mut types = compartment_export_types(request);
    if request.wants_referenced() {
        types.retain(|resource_type| *resource_type != ResourceType::PROVENANCE);
    }
    types
}

/// The covered types a `_referenced` export walks for references after its first pass:
/// those the first pass does not export.
pub fn deferred_compartment_types(request: &ExportRequest) -> Vec<ResourceType> {
    let first_pass = first_pass_compartment_types(request);
    covered_types(request)
        .into_iter()
        .filter(|resource_type| !first_pass.contains(resource_type))
        .collect()
}

/// The covered types exported as compartment resources: under `LatestProvenanceResources`
/// without Provenance, which then come from the Provenance stage alone (only the latest of
/// each exported resource, v3: "other Provenance resources will not be returned").
fn compartment_export_types(request: &ExportRequest) -> Vec<ResourceType> {
    let mut types = covered_types(request);
    if request.wants_latest_provenance() {
        types.retain(|resource_type| *resource_type != ResourceType::PROVENANCE);
    }
    types
}

/// Units over the events of `resource_types` (system and all-patients exports).
pub fn plan_event_units(
    store: &Store,
    request: &ExportRequest,
    resource_types: Vec<ResourceType>,
    window: SeqWindow,
) -> Result<Vec<WorkUnit>, StoreError> {
    let source = match request.level {
        ExportLevel::System => UnitSource::AllEvents,
        _ => UnitSource::CompartmentEvents,
    };
    let mut units = Vec::new();
    for resource_type in resource_types {
        if let Some(bounds) = store.type_seq_bounds(resource_type, window)? {
            split_into_units(resource_type, bounds, source, &mut units);
        }
    }
    Ok(units)
}

/// Units over the job's collected scratch set, for `resource_types` in order.
pub fn plan_collected_units(
    store: &Store,
    job_id: &str,
    resource_types: impl IntoIterator<Item = ResourceType>,
) -> Result<Vec<WorkUnit>, StoreError> {
    let mut units = Vec::new();
    for resource_type in resource_types {
        if let Some(bounds) = store.scratch_bounds(job_id, resource_type)? {
            split_into_units(
                resource_type,
                bounds,
                UnitSource::CollectedEvents,
                &mut units,
            );
        }
    }
    Ok(units)
}

fn split_into_units(
    resource_type: ResourceType,
    (first_seq, last_seq): (u64, u64),
    source: UnitSource,
    units: &mut Vec<WorkUnit>,
) {
    let mut after_seq = first_seq - 1;
    while after_seq < last_seq {
        let through_seq = after_seq.saturating_add(UNIT_SEQ_SPAN).min(last_seq);
        units.push(WorkUnit {
            resource_type,
            seqs: SeqWindow {
                after_seq,
                through_seq,
            },
            source,
        });
        after_seq = through_seq;
    }
}

/// The seq of the version of a resource current as of `through_seq` (a delete included).
pub fn version_as_of(
    store: &Store,
    resource_type: ResourceType,
    id: &str,
    through_seq: u64,
) -> Result<Option<u64>, StoreError> {
    Ok(store
        .version_seqs(resource_type, id)?
        .into_iter()
        .map(|(_, seq)| seq)
        .find(|seq| *seq <= through_seq))
}

/// The sorted patient ids an export of Group or `patient=` covers, as of the snapshot;
/// a Group's members are its local references only.
pub fn resolve_members(
    store: &Store,
    request: &ExportRequest,
    through_seq: u64,
    local_base: &LocalBase,
) -> Result<Option<Vec<String>>, ExportError> {
    let mut members: BTreeSet<String> = match &request.level {
        ExportLevel::System => return Ok(None),
        ExportLevel::AllPatients if request.patients.is_empty() => return Ok(None),
        ExportLevel::AllPatients => BTreeSet::new(),
        ExportLevel::Group(group_id) => group_members(store, group_id, through_seq, local_base)?,
    };
    if request.patients.is_empty() {
        return Ok(Some(members.into_iter().collect()));
    }
    let mut narrowed = BTreeSet::new();
    for patient in &request.patients {
        let present = match &request.level {
            ExportLevel::Group(group_id) => {
                if !members.contains(patient.as_str()) {
                    return Err(ExportError::invalid_request(format!(
                        "Patient/{patient} is not a member of Group/{group_id}"
                    )));
                }
                true
            }
            _ => live_as_of(store, ResourceType::PATIENT, patient, through_seq)?,
        };
        if !present {
            return Err(ExportError::invalid_request(format!(
                "Patient/{patient} does not exist"
            )));
        }
        narrowed.insert(patient.as_str().to_owned());
    }
    members = narrowed;
    Ok(Some(members.into_iter().collect()))
}

fn live_as_of(
    store: &Store,
    resource_type: ResourceType,
    id: &ResourceId,
    through_seq: u64,
) -> Result<bool, StoreError> {
    let Some(seq) = version_as_of(store, resource_type, id.as_str(), through_seq)? else {
        return Ok(false);
    };
    Ok(store
        .with_event(resource_type, seq, |view| !view.deleted)?
        .unwrap_or(false))
}

/// The parts of a Group that membership needs; everything else is skipped while parsing,
/// so a Group of hundreds of thousands of members is read without building its JSON tree.
#[derive(serde::Deserialize)]
struct GroupMembers {
    #[serde(default)]
    member: Vec<Lenient<GroupMember>>,
}

#[derive(serde::Deserialize)]
struct GroupMember {
    entity: Option<Lenient<MemberEntity>>,
    inactive: Option<Lenient<bool>>,
}

#[derive(serde::Deserialize)]
struct MemberEntity {
    reference: Option<Lenient<String>>,
}

/// A field of the expected shape, or anything else (ignored, as a malformed member is).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Lenient<T> {
    Expected(T),
    Other(serde::de::IgnoredAny),
}

impl<T> Lenient<T> {
    fn into_value(self) -> Option<T> {
        match self {
            Lenient::Expected(value) => Some(value),
            Lenient::Other(_) => None,
        }
    }
}

/// Patients referenced by `Group.member.entity`, following nested Groups and skipping
/// inactive members, all as of `through_seq`; references to other servers are no members.
fn group_members(
    store: &Store,
    group_id: &ResourceId,
    through_seq: u64,
    local_base: &LocalBase,
) -> Result<BTreeSet<String>, ExportError> {
    let mut members = BTreeSet::new();
    let mut pending = vec![group_id.as_str().to_owned()];
    let mut visited = HashSet::new();
    while let Some(current) = pending.pop() {
        if !visited.insert(current.clone()) {
            continue;
        }
        let body = match version_as_of(store, ResourceType::GROUP, &current, through_seq)? {
            Some(seq) => store
                .with_event(ResourceType::GROUP, seq, |view| {
                    (!view.deleted).then(|| view.body.to_vec())
                })?
                .flatten(),
            None => None,
        };
        let Some(body) = body else {
            if current == group_id.as_str() {
                return Err(ExportError::not_found(format!(
                    "Group/{group_id} does not exist"
                )));
            }
            continue;
        };
        let group: GroupMembers = serde_json::from_slice(&body)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        for member in group.member.into_iter().filter_map(Lenient::into_value) {
            if member.inactive.and_then(Lenient::into_value) == Some(true) {
                continue;
            }
            let Some(reference_text) = member
                .entity
                .and_then(Lenient::into_value)
                .and_then(|entity| entity.reference)
                .and_then(Lenient::into_value)
            else {
                continue;
            };
            let Some(reference) = local_base.local_reference(&reference_text) else {
                continue;
            };
            match reference.resource_type_name {
                "Patient" => {
                    members.insert(reference.id.to_owned());
                }
                "Group" => pending.push(reference.id.to_owned()),
                _ => {}
            }
        }
    }
    Ok(members)
}

/// Adds to the scratch set every (type, seq) in `patient_id`'s compartment that the
/// export covers: the version current as of the snapshot, changed inside the window, and
/// (re-checked on that version) really in this patient's compartment. A resource reached
/// through several patients yields one key, so it is exported once.
pub fn collect_member(
    store: &Store,
    request: &ExportRequest,
    window: SeqWindow,
    patient_id: &str,
    covered: &HashSet<ResourceType>,
    collected: &mut Vec<(ResourceType, u64)>,
    touch_progress: &dyn Fn(),
) -> Result<(), StoreError> {
    for (position, (resource_type, id)) in store
        .compartment_members(patient_id)?
        .into_iter()
        .enumerate()
    {
        if position.is_multiple_of(PROGRESS_EVERY_MEMBERS) {
            touch_progress();
        }
        if !covered.contains(&resource_type) {
            continue;
        }
        let versions = store.version_seqs(resource_type, &id)?;
        let Some(position) = versions
            .iter()
            .position(|(_, seq)| *seq <= window.through_seq)
        else {
            continue;
        };
        let seq = versions[position].1;
        if !window.contains(seq) {
            continue;
        }
        let Some((deleted, in_compartment)) = store.with_event(resource_type, seq, |view| {
            (
                view.deleted,
                view.compartment_patients.contains(&patient_id),
            )
        })?
        else {
            continue;
        };
        let keep = if deleted {
            request.since.is_some()
                && deleted_version_was_in_compartment(
                    store,
                    resource_type,
                    &versions[position + 1..],
                    patient_id,
                )?
        } else {
            in_compartment
        };
        if keep {
            collected.push((resource_type, seq));
        }
    }
    Ok(())
}

fn deleted_version_was_in_compartment(
    store: &Store,
    resource_type: ResourceType,
    older_versions: &[(u64, u64)],
    patient_id: &str,
) -> Result<bool, StoreError> {
    for (_, seq) in older_versions {
        let verdict = store.with_event(resource_type, *seq, |view| {
            (!view.deleted).then(|| view.compartment_patients.contains(&patient_id))
        })?;
        if let Some(Some(in_compartment)) = verdict {
            return Ok(in_compartment);
        }
    }
    Ok(false)
}
