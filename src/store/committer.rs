//! The single writer thread: assigns seqs, versions and instants, stages each request's
//! events and projections into one batch per group, and acknowledges a group only after
//! its batch is fsynced, which happens before any of it becomes visible to readers.

use std::collections::HashMap;

use fjall::{OwnedWriteBatch, PersistMode};
use tokio::sync::oneshot;

use super::projection::{CurrentOverlay, stage_projections};
use super::read::newest_event;
use super::record::{self, CurrentEntry, EventOperation, EventRecord};
use super::write::{
    PreparedResource, UnchangedContent, VersionInfo, WriteOperation, WriteOutcome, WriteRejection,
};
use super::{Keyspaces, StoreError, keys};
use crate::fhir::{Instant, ResourceId, ResourceType};

/// Most commit requests folded into one batch and one fsync.
pub(super) const MAX_REQUESTS_PER_GROUP: usize = 512;

/// fjall 3.1 halts a write that finds this many sealed memtables in a keyspace, in sleeps
/// of 100 ms, until its flush worker catches up.
const FJALL_SEALED_MEMTABLES_HALTING_WRITES: usize = 4;

pub(super) struct CommitRequest {
    pub operations: Vec<WriteOperation>,
    pub reply: oneshot::Sender<Result<Vec<WriteOutcome>, StoreError>>,
}

pub(super) struct Committer {
    keyspaces: Keyspaces,
    last_seq: u64,
    last_instant: Instant,
    /// Event bytes written since the `events` memtable was last sealed.
    event_bytes_since_rotation: u64,
    events_memtable_bytes: u64,
    /// Approximate bytes written to the id-keyed indexes since they were last sealed.
    index_bytes_since_rotation: u64,
    index_memtable_bytes: u64,
}

struct PlannedEvent<'request> {
    resource_type: ResourceType,
    id: &'request ResourceId,
    seq: u64,
    version: u64,
    put: Option<&'request PreparedResource>,
    previous: Option<CurrentEntry>,
}

impl<'request> PlannedEvent<'request> {
    fn record(&self, instant: Instant, body: &'request [u8]) -> EventRecord<'request> {
        EventRecord {
            seq: self.seq,
            instant_micros: instant.micros_since_epoch(),
            resource_type_code: self.resource_type.code(),
            id: self.id.as_str(),
            version: self.version,
            operation: if self.put.is_some() {
                EventOperation::Put
            } else {
                EventOperation::Delete
            },
            digest: self.put.map(|resource| resource.digest).unwrap_or_default(),
            compartment_patients: self
                .put
                .map(|resource| {
                    resource
                        .compartment_patients
                        .iter()
                        .map(String::as_str)
                        .collect()
                })
                .unwrap_or_default(),
            body,
        }
    }
}

struct PlannedRequest<'request> {
    instant: Instant,
    events: Vec<PlannedEvent<'request>>,
    outcomes: Vec<WriteOutcome>,
}

impl Committer {
    /// Resumes numbering after the newest event in `events`.
    pub fn recover(
        keyspaces: Keyspaces,
        events_memtable_bytes: u64,
        index_memtable_bytes: u64,
    ) -> Result<Committer, StoreError> {
        let (last_seq, last_instant) = match newest_event(&keyspaces)? {
            Some((resource_type, seq)) => keyspaces
                .with_event_record(resource_type, seq, |event| {
                    (
                        event.seq,
                        Instant::from_micros_since_epoch(event.instant_micros),
                    )
                })?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("newest event {seq} could not be read"))
                })?,
            None => (0, Instant::from_micros_since_epoch(i64::MIN)),
        };
        Ok(Committer {
            keyspaces,
            event_bytes_since_rotation: 0,
            events_memtable_bytes,
            index_bytes_since_rotation: 0,
            index_memtable_bytes,
            last_seq,
            last_instant,
        })
    }

    pub fn run(mut self, requests: crossbeam_channel::Receiver<CommitRequest>) {
        while let Ok(first) = requests.recv() {
            let mut group = vec![first];
            while group.len() < MAX_REQUESTS_PER_GROUP {
                match requests.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
    }

    /// Stages the group into one batch that fjall fsyncs to its journal before applying it
    /// to the memtables, so readers never see a write a crash could lose. A failed batch
    /// leaves nothing visible, and its seqs stay used: the next group numbers after them.
    fn commit_group(&mut self, group: Vec<CommitRequest>) {
        self.wait_while_flushes_are_behind();
        let mut batch = self
            .keyspaces
            .database
            .batch()
            .durability(Some(PersistMode::SyncAll));
        let mut group_overlay = CurrentOverlay::new();
        let mut answers = Vec::with_capacity(group.len());
        for request in group {
            let staged = self.stage_request(&request.operations, &mut batch, &mut group_overlay);
            answers.push((request.reply, staged));
        }
        if let Err(error) = batch.commit() {
            tracing::error!(%error, "commit failed; the group's writes were not acknowledged");
            let message = error.to_string();
            for (reply, staged) in answers {
                let answer = staged.and(Err(StoreError::Storage(fjall::Error::Io(
                    std::io::Error::other(message.clone()),
                ))));
                let _ = reply.send(answer);
            }
            return;
        }
        for (reply, staged) in answers {
            let _ = reply.send(staged);
        }
        self.seal_full_memtables();
    }

    /// Holds the group back, in 1 ms steps, while a keyspace has as many sealed memtables as
    /// make fjall halt writes: fjall would sleep 100 ms at a time, and those halts cost a
    /// late 2.2M-resource load about a sixth of its time although a flush takes ~25 ms.
    fn wait_while_flushes_are_behind(&self) {
        let keyspaces = &self.keyspaces;
        let flushes_are_behind = || {
            std::iter::once(&keyspaces.events)
                .chain(keyspaces.projections().map(|(_, keyspace)| keyspace))
                .any(|keyspace| {
                    keyspace.sealed_memtable_count() >= FJALL_SEALED_MEMTABLES_HALTING_WRITES
                })
        };
        while flushes_are_behind() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Seals the `events` memtable, and the id-keyed indexes' memtables, once they hold
    /// their share of bytes. fjall asks its background worker to do this, and while that
    /// worker compacts the request waits and the memtables keep growing; sealing here lets
    /// fjall's own limit on sealed memtables hold writes back, which keeps memory bounded.
    fn seal_full_memtables(&mut self) {
        let keyspaces = self.keyspaces.clone();
        if self.event_bytes_since_rotation >= self.events_memtable_bytes {
            self.event_bytes_since_rotation = 0;
            seal(&keyspaces.events);
        }
        if self.index_bytes_since_rotation >= self.index_memtable_bytes * 3 {
            self.index_bytes_since_rotation = 0;
            for index in [
                &keyspaces.current,
                &keyspaces.history,
                &keyspaces.compartment,
            ] {
                seal(index);
            }
        }
    }

    /// Validates a whole request, then stages it; a refused request stages nothing.
    fn stage_request(
        &mut self,
        operations: &[WriteOperation],
        batch: &mut OwnedWriteBatch,
        group_overlay: &mut CurrentOverlay,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let planned = self.plan_request(operations, group_overlay)?;
        let Some(last_event) = planned.events.last() else {
            return Ok(planned.outcomes);
        };
        let last_seq = last_event.seq;
        let mut request_overlay = CurrentOverlay::new();
        for event in &planned.events {
            let encoded = {
                let body = event
                    .put
                    .map(|resource| resource.body.finish(event.version, planned.instant))
                    .unwrap_or_default();
                record::encode(&event.record(planned.instant, body.as_bytes()))
            };
            // The projections never read the body: its copy is freed before they stage a key
            // per compartment patient (a large Group's peak).
            let record = event.record(planned.instant, &[]);
            self.event_bytes_since_rotation += encoded.len() as u64;
            self.index_bytes_since_rotation += approximate_index_bytes(&record);
            batch.insert(
                &self.keyspaces.events,
                keys::event(event.resource_type, event.seq),
                encoded,
            );
            stage_projections(
                &self.keyspaces,
                batch,
                &mut request_overlay,
                &record,
                event.previous,
            )?;
        }
        batch.insert(
            &self.keyspaces.clock,
            keys::clock(planned.instant),
            keys::seq(last_seq),
        );
        group_overlay.absorb(request_overlay);
        self.last_seq = last_seq;
        self.last_instant = planned.instant;
        Ok(planned.outcomes)
    }

    fn plan_request<'request>(
        &self,
        operations: &'request [WriteOperation],
        group_overlay: &CurrentOverlay,
    ) -> Result<PlannedRequest<'request>, StoreError> {
        let instant = Instant::now().max(Instant::from_micros_since_epoch(
            self.last_instant.micros_since_epoch().saturating_add(1),
        ));
        let mut planned = PlannedRequest {
            instant,
            events: Vec::new(),
            outcomes: Vec::with_capacity(operations.len()),
        };
        let mut request_current: HashMap<(ResourceType, &str), CurrentEntry> = HashMap::new();
        let mut next_seq = self.last_seq + 1;
        for operation in operations {
            let (resource_type, id) = match operation {
                WriteOperation::Create(resource) | WriteOperation::Update { resource, .. } => {
                    (resource.resource_type, &resource.id)
                }
                WriteOperation::Delete {
                    resource_type, id, ..
                } => (*resource_type, id),
            };
            let previous = match request_current.get(&(resource_type, id.as_str())) {
                Some(entry) => Some(*entry),
                None => group_overlay.get(&self.keyspaces, resource_type, id.as_str())?,
            };
            let live_version = previous
                .filter(|entry| !entry.deleted)
                .map(|entry| entry.version);
            let expected_version = match operation {
                WriteOperation::Create(_) => None,
                WriteOperation::Update {
                    expected_version, ..
                }
                | WriteOperation::Delete {
                    expected_version, ..
                } => *expected_version,
            };
            if let Some(expected_version) = expected_version
                && live_version != Some(expected_version)
            {
                return Err(WriteRejection::VersionConflict {
                    resource_type,
                    id: id.clone(),
                    expected_version,
                    current_version: live_version,
                }
                .into());
            }
            let put = match operation {
                WriteOperation::Create(resource) => {
                    if previous.is_some() {
                        return Err(WriteRejection::AlreadyExists {
                            resource_type,
                            id: id.clone(),
                        }
                        .into());
                    }
                    Some(resource)
                }
                WriteOperation::Update {
                    resource,
                    unchanged,
                    ..
                } => {
                    if *unchanged == UnchangedContent::Skip
                        && let Some(live) = previous
                            .filter(|entry| !entry.deleted && entry.digest == resource.digest)
                    {
                        planned.outcomes.push(WriteOutcome::Unchanged {
                            resource_type,
                            id: id.clone(),
                            version: live.version,
                        });
                        continue;
                    }
                    Some(resource)
                }
                WriteOperation::Delete { .. } => {
                    if live_version.is_none() {
                        planned.outcomes.push(WriteOutcome::NothingToDelete);
                        continue;
                    }
                    None
                }
            };
            let version = previous.map_or(1, |entry| entry.version + 1);
            let seq = next_seq;
            next_seq += 1;
            let info = VersionInfo {
                resource_type,
                id: id.clone(),
                version,
                last_updated: instant,
                seq,
            };
            planned.outcomes.push(match (put, live_version) {
                (Some(_), None) => WriteOutcome::Created { version: info },
                (Some(_), Some(_)) => WriteOutcome::Updated { version: info },
                (None, _) => WriteOutcome::Deleted { version: info },
            });
            request_current.insert(
                (resource_type, id.as_str()),
                CurrentEntry {
                    seq,
                    version,
                    deleted: put.is_none(),
                    digest: put.map(|resource| resource.digest).unwrap_or_default(),
                },
            );
            planned.events.push(PlannedEvent {
                resource_type,
                id,
                seq,
                version,
                put,
                previous,
            });
        }
        Ok(planned)
    }
}

fn seal(keyspace: &fjall::Keyspace) {
    if let Err(error) = keyspace.rotate_memtable() {
        tracing::warn!(%error, "could not seal a memtable");
    }
}

/// What one event adds to `current`, `history` and `compartment`: keys, values and
/// fjall's per-entry overhead, roughly.
fn approximate_index_bytes(record: &EventRecord<'_>) -> u64 {
    const PER_ENTRY_OVERHEAD: u64 = 16;
    let id_bytes = record.id.len() as u64;
    let current = 2 + id_bytes + 48 + PER_ENTRY_OVERHEAD;
    let history = 2 + id_bytes + 1 + 8 + 8 + PER_ENTRY_OVERHEAD;
    let compartment: u64 = record
        .compartment_patients
        .iter()
        .map(|patient| patient.len() as u64 + 1 + 2 + id_bytes + PER_ENTRY_OVERHEAD)
        .sum();
    current + history + compartment
}
