//! The Provenance of a Patient or Group export (Bulk Data v3): every Provenance whose
//! `target` names an exported compartment resource is exported, also when it is in no
//! patient's compartment itself; under `includeAssociatedData=RelevantProvenanceResources`
//! also those naming a resource `_referenced` added. Reads the Provenance current at the
//! snapshot (changed inside the window), adds the ones not exported yet to the job's
//! scratch set, and checkpoints every `PROVENANCE_PER_CHECKPOINT` Provenance read.
//!
//! Under `includeAssociatedData=LatestProvenanceResources` (without
//! `RelevantProvenanceResources`, which v3 says wins as the least restrictive value) the
//! value replaces that default, as v3 ties the default to no Provenance value being named
//! and says "other Provenance resources will not be returned": for each exported
//! non-Provenance resource, compartment and `_referenced` ones alike, only the most recent
//! Provenance naming it among those the stage reads is exported, the compartment
//! Provenance included (the compartment stages leave Provenance to this one). Most recent
//! means the latest `recorded`, then the latest `meta.lastUpdated`, then the highest seq;
//! a Provenance without `recorded` ranks below any with it. The best so far per target is
//! kept in the job's on-disk scratch map, updated per checkpoint chunk (so a chunk read
//! again after `kill -9` changes nothing); at the end the winners join the scratch set,
//! once each however many targets they are latest for.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::error::ExportError;
use super::job::JobState;
use super::planner::{CollectionStage, covered_types, finish_stage, version_as_of};
use super::referenced::collects_members;
use super::registry::JobHandle;
use super::request::{ExportRequest, TypeFilter};
use crate::fhir::{Instant, LocalBase, ResourceType};
use crate::store::{ScanControl, SeqWindow, Store, StoreError};

/// Provenance read between durable checkpoints.
pub(super) const PROVENANCE_PER_CHECKPOINT: usize = 2048;

/// Whether a Patient or Group export collects Provenance: when it covers the type.
pub fn collects_provenance(request: &ExportRequest) -> bool {
    request.level != super::request::ExportLevel::System
        && covered_types(request).contains(&ResourceType::PROVENANCE)
}

/// One live Provenance read, not exported by the compartments yet.
struct ProvenanceCandidate {
    /// `(type, id)` of each local target.
    targets: Vec<(ResourceType, String)>,
    rank: ProvenanceRank,
}

/// How recent a Provenance is, compared field by field (`None` first); `seq` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ProvenanceRank {
    recorded: Option<Instant>,
    last_updated: Option<Instant>,
    seq: u64,
}

/// Bytes of an encoded [`ProvenanceRank`]: a presence byte and micros per instant, the seq.
const ENCODED_RANK_LEN: usize = 26;

impl ProvenanceRank {
    fn encode(self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ENCODED_RANK_LEN);
        for instant in [self.recorded, self.last_updated] {
            bytes.push(u8::from(instant.is_some()));
            let micros = instant.map_or(0, Instant::micros_since_epoch);
            bytes.extend_from_slice(&micros.to_be_bytes());
        }
        bytes.extend_from_slice(&self.seq.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<ProvenanceRank, StoreError> {
        let corrupt =
            || StoreError::Corrupt("a latest-Provenance scratch entry is malformed".into());
        let bytes: &[u8; ENCODED_RANK_LEN] = bytes.try_into().map_err(|_| corrupt())?;
        let instant_at = |start: usize| {
            let micros = i64::from_be_bytes(bytes[start + 1..start + 9].try_into().ok()?);
            (bytes[start] == 1).then(|| Instant::from_micros_since_epoch(micros))
        };
        Ok(ProvenanceRank {
            recorded: instant_at(0),
            last_updated: instant_at(9),
            seq: u64::from_be_bytes(bytes[18..].try_into().map_err(|_| corrupt())?),
        })
    }
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
    let latest_only = request.wants_latest_provenance();
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
                let exported_already = if latest_only {
                    Ok(false)
                } else if collects_members(&request) {
                    store.scratch_contains(job.id(), ResourceType::PROVENANCE, view.seq)
                } else {
                    Ok(!view.compartment_patients.is_empty())
                };
                match exported_already {
                    Ok(false) if !view.deleted => {
                        match read_candidate(view.seq, view.body, local_base) {
                            Ok(candidate) => candidates.push(candidate),
                            Err(error) => failure = Some(error),
                        }
                    }
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
        if latest_only {
            judge.record_latest(&candidates)?;
        } else {
            let mut added = Vec::new();
            for candidate in candidates {
                if judge.any_exported(&candidate.targets)? {
                    added.push((ResourceType::PROVENANCE, candidate.rank.seq));
                }
            }
            store.scratch_insert(job.id(), &added)?;
        }
        let Some(last_seq) = last_seq.filter(|_| read >= PROVENANCE_PER_CHECKPOINT) else {
            if latest_only {
                add_latest_to_scratch_set(store, job)?;
            }
            return finish_stage(store, job, CollectionStage::Provenance);
        };
        after_seq = last_seq;
        job.persist(store, |record| {
            record.state = JobState::CollectingProvenance { after_seq };
        })?;
        job.touch();
    }
}

/// Adds each Provenance the scratch map holds as the latest of some target to the scratch
/// set (a set, so once each, and adding again after a restart changes nothing).
fn add_latest_to_scratch_set(store: &Store, job: &JobHandle) -> Result<(), ExportError> {
    let mut winners = Vec::new();
    store.scratch_map_values(job.id(), |value| {
        winners.push((ResourceType::PROVENANCE, ProvenanceRank::decode(value)?.seq));
        if winners.len() >= PROVENANCE_PER_CHECKPOINT {
            store.scratch_insert(job.id(), &winners)?;
            winners.clear();
            job.touch();
        }
        Ok(ScanControl::Continue)
    })?;
    store.scratch_insert(job.id(), &winners)?;
    Ok(())
}

/// The local `Provenance.target` references and the rank of a stored Provenance body.
fn read_candidate(
    seq: u64,
    body: &[u8],
    local_base: &LocalBase,
) -> Result<ProvenanceCandidate, StoreError> {
    let provenance: Value = serde_json::from_slice(body).map_err(|error| {
        StoreError::Corrupt(format!("a stored Provenance is not JSON: {error}"))
    })?;
    let references = provenance
        .get("target")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|target| target.get("reference").and_then(Value::as_str));
    let targets = references
        .filter_map(|reference| {
            let literal = local_base.local_reference(reference)?;
            let resource_type = ResourceType::parse(literal.resource_type_name).ok()?;
            Some((resource_type, literal.id.to_owned()))
        })
        .collect();
    let instant_of = |element: Option<&Value>| {
        element
            .and_then(Value::as_str)
            .and_then(|text| Instant::parse(text).ok())
    };
    let rank = ProvenanceRank {
        recorded: instant_of(provenance.get("recorded")),
        last_updated: instant_of(provenance.pointer("/meta/lastUpdated")),
        seq,
    };
    Ok(ProvenanceCandidate { targets, rank })
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
            if self.exported_version(*resource_type, id)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Keeps, in the job's scratch map, each exported non-Provenance target's most recent
    /// Provenance among those recorded so far and `candidates`.
    fn record_latest(&mut self, candidates: &[ProvenanceCandidate]) -> Result<(), ExportError> {
        let mut latest: HashMap<(ResourceType, u64), ProvenanceRank> = HashMap::new();
        for candidate in candidates {
            for (resource_type, id) in &candidate.targets {
                if *resource_type == ResourceType::PROVENANCE {
                    continue;
                }
                let Some(target_seq) = self.exported_version(*resource_type, id)? else {
                    continue;
                };
                let target = (*resource_type, target_seq);
                let best_so_far = match latest.get(&target) {
                    Some(rank) => Some(*rank),
                    None => self
                        .store
                        .scratch_map_get(self.job_id, *resource_type, target_seq)?
                        .map(|bytes| ProvenanceRank::decode(&bytes))
                        .transpose()?,
                };
                latest.insert(
                    target,
                    best_so_far.map_or(candidate.rank, |best| best.max(candidate.rank)),
                );
            }
        }
        let entries: Vec<_> = latest
            .into_iter()
            .map(|(target, rank)| (target, rank.encode()))
            .collect();
        self.store.scratch_map_put(self.job_id, &entries)?;
        Ok(())
    }

    /// The seq of the version of `resource_type/id` current at the snapshot when that
    /// version is exported: a compartment resource the export covers, or (under
    /// RelevantProvenanceResources or LatestProvenanceResources) a resource `_referenced`
    /// added.
    fn exported_version(
        &mut self,
        resource_type: ResourceType,
        id: &str,
    ) -> Result<Option<u64>, ExportError> {
        let Some(seq) = version_as_of(self.store, resource_type, id, self.window.through_seq)?
        else {
            return Ok(None);
        };
        if !self.compartment_types.contains(&resource_type) {
            let names_referenced =
                self.request.wants_relevant_provenance() || self.request.wants_latest_provenance();
            let added = names_referenced
                && self
                    .store
                    .scratch_contains(self.job_id, resource_type, seq)?;
            return Ok(added.then_some(seq));
        }
        if !self.window.contains(seq) {
            return Ok(None);
        }
        if collects_members(self.request)
            && !self
                .store
                .scratch_contains(self.job_id, resource_type, seq)?
        {
            return Ok(None);
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
        Ok(verdict.transpose()?.unwrap_or(false).then_some(seq))
    }
}
