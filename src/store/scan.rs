//! Reads for exports: the newest version of each resource as of a snapshot seq (a merge
//! of two sequential scans, DESIGN.md §3), event lookups, a per-job scratch set of
//! (type, seq) keys, and the `jobs` keyspace.

use fjall::{PersistMode, Readable};
use serde::{Deserialize, Serialize};

use super::out_of_space::FailedWrite;
use super::record::{self, EventOperation, EventRecord};
use super::{Keyspaces, Store, StoreError, keys};
use crate::fhir::{Instant, ResourceType};

/// The seqs in `(after_seq, through_seq]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqWindow {
    pub after_seq: u64,
    pub through_seq: u64,
}

impl SeqWindow {
    pub fn is_empty(&self) -> bool {
        self.after_seq >= self.through_seq
    }

    pub fn contains(&self, seq: u64) -> bool {
        seq > self.after_seq && seq <= self.through_seq
    }
}

/// One stored event, borrowed from the store for the duration of a visit.
#[derive(Debug)]
pub struct EventView<'a> {
    pub resource_type: ResourceType,
    pub seq: u64,
    pub id: &'a str,
    pub version: u64,
    pub last_updated: Instant,
    pub deleted: bool,
    /// The stored JSON (UTF-8; empty for a delete).
    pub body: &'a [u8],
    pub compartment_patients: &'a [&'a str],
}

/// Whether a scan goes on after a visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanControl {
    Continue,
    Stop,
}

fn view_of<'a>(resource_type: ResourceType, event: &'a EventRecord<'a>) -> EventView<'a> {
    EventView {
        resource_type,
        seq: event.seq,
        id: event.id,
        version: event.version,
        last_updated: Instant::from_micros_since_epoch(event.instant_micros),
        deleted: event.operation == EventOperation::Delete,
        body: event.body,
        compartment_patients: &event.compartment_patients,
    }
}

fn scratch_key(namespace: &str, resource_type: ResourceType, seq: u64) -> Vec<u8> {
    let mut key = scratch_type_prefix(namespace, resource_type);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Sets a scratch namespace's map (a (type, seq) to a value) apart from its set: resource
/// type codes never reach it, and clearing the namespace clears the map too.
const SCRATCH_MAP_MARKER: [u8; 2] = [0xFF, 0xFF];

fn scratch_map_prefix(namespace: &str) -> Vec<u8> {
    let mut key = scratch_namespace_prefix(namespace);
    key.extend_from_slice(&SCRATCH_MAP_MARKER);
    key
}

fn scratch_map_key(namespace: &str, resource_type: ResourceType, seq: u64) -> Vec<u8> {
    let mut key = scratch_map_prefix(namespace);
    key.extend_from_slice(&keys::type_prefix(resource_type));
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn scratch_type_prefix(namespace: &str, resource_type: ResourceType) -> Vec<u8> {
    let mut key = scratch_namespace_prefix(namespace);
    key.extend_from_slice(&keys::type_prefix(resource_type));
    key
}

fn scratch_namespace_prefix(namespace: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(namespace.len() + 11);
    key.extend_from_slice(namespace.as_bytes());
    key.push(keys::ID_TERMINATOR);
    key
}

/// The seqs ending the first and the last key `keys()` yields.
fn first_and_last_seq(keys: impl Fn() -> fjall::Iter) -> Result<Option<(u64, u64)>, StoreError> {
    seqs_of_first_and_last(keys().next(), keys().next_back())
}

/// The seqs ending the keys of two entries, when both exist.
fn seqs_of_first_and_last(
    first: Option<fjall::Guard>,
    last: Option<fjall::Guard>,
) -> Result<Option<(u64, u64)>, StoreError> {
    let first = first.map(|guard| guard.key()).transpose()?;
    let last = last.map(|guard| guard.key()).transpose()?;
    match (first, last) {
        (Some(first), Some(last)) => Ok(Some((
            parse_trailing_seq(&first)?,
            parse_trailing_seq(&last)?,
        ))),
        _ => Ok(None),
    }
}

fn parse_trailing_seq(key: &[u8]) -> Result<u64, StoreError> {
    key.split_last_chunk::<8>()
        .map(|(_, seq)| u64::from_be_bytes(*seq))
        .ok_or_else(|| StoreError::Corrupt("key without a seq".to_owned()))
}

/// How one pass of a scan ended.
enum ScanPass {
    Finished,
    /// The store is being reopened: the scan let go of the database after this seq.
    PausedAfter(u64),
}

impl Store {
    /// Visits, in seq order, every event of `resource_type` in `window` that is still the
    /// resource's newest version as of `snapshot_seq` (which may lie beyond the window
    /// when the window is one slice of a larger export). While the store is reopened
    /// the scan waits without holding the database, then resumes where it was.
    pub fn scan_newest_in_window(
        &self,
        resource_type: ResourceType,
        window: SeqWindow,
        snapshot_seq: u64,
        mut visit: impl FnMut(&EventView<'_>) -> ScanControl,
    ) -> Result<(), StoreError> {
        debug_assert!(window.through_seq <= snapshot_seq);
        let mut window = window;
        loop {
            if window.is_empty() {
                return Ok(());
            }
            let keyspaces = self.keyspaces();
            let pass =
                self.scan_newest_pass(&keyspaces, resource_type, window, snapshot_seq, &mut visit)?;
            drop(keyspaces);
            match pass {
                ScanPass::Finished => return Ok(()),
                ScanPass::PausedAfter(seq) => {
                    self.wait_out_reopen();
                    window.after_seq = seq;
                }
            }
        }
    }

    fn scan_newest_pass(
        &self,
        keyspaces: &Keyspaces,
        resource_type: ResourceType,
        window: SeqWindow,
        snapshot_seq: u64,
        visit: &mut impl FnMut(&EventView<'_>) -> ScanControl,
    ) -> Result<ScanPass, StoreError> {
        let first_seq = window.after_seq + 1;
        let mut superseded = keyspaces.superseded.range(
            keys::type_seq(resource_type, first_seq)
                ..=keys::type_seq(resource_type, window.through_seq),
        );
        let mut pending_superseded: Option<(u64, u64)> = None;
        let events = keys::event_ranges(resource_type, first_seq, window.through_seq)
            .flat_map(|range| keyspaces.events.range(range));
        let mut last_seq_done = window.after_seq;
        for entry in events {
            if self.is_reopening() {
                return Ok(ScanPass::PausedAfter(last_seq_done));
            }
            let (key, value) = entry.into_inner()?;
            let seq = parse_trailing_seq(&key)?;
            last_seq_done = seq;
            let mut superseded_by = None;
            loop {
                if pending_superseded.is_none() {
                    pending_superseded = match superseded.next() {
                        Some(guard) => {
                            let (superseded_key, next_seq) = guard.into_inner()?;
                            let next_seq = keys::parse_seq(&next_seq).ok_or_else(|| {
                                StoreError::Corrupt("bad superseded entry".to_owned())
                            })?;
                            Some((parse_trailing_seq(&superseded_key)?, next_seq))
                        }
                        None => None,
                    };
                }
                match pending_superseded {
                    Some((superseded_seq, _)) if superseded_seq < seq => pending_superseded = None,
                    Some((superseded_seq, next_seq)) if superseded_seq == seq => {
                        superseded_by = Some(next_seq);
                        pending_superseded = None;
                        break;
                    }
                    _ => break,
                }
            }
            if superseded_by.is_some_and(|next| next <= snapshot_seq) {
                continue;
            }
            let event: EventRecord = record::decode(&value)?;
            if visit(&view_of(resource_type, &event)) == ScanControl::Stop {
                break;
            }
        }
        Ok(ScanPass::Finished)
    }

    /// The first and last seq of `resource_type`'s events inside `window`.
    pub fn type_seq_bounds(
        &self,
        resource_type: ResourceType,
        window: SeqWindow,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        if window.is_empty() || !self.has_ever_stored(resource_type)? {
            return Ok(None);
        }
        let keyspaces = self.keyspaces();
        let events = &keyspaces.events;
        let ranges = || keys::event_ranges(resource_type, window.after_seq + 1, window.through_seq);
        let first = ranges().find_map(|range| events.range(range).next());
        let last = ranges()
            .rev()
            .find_map(|range| events.range(range).next_back());
        seqs_of_first_and_last(first, last)
    }

    /// Whether any resource of this type was ever written (deleted ones included): one
    /// seek in `current`, where a type without events would otherwise cost a seek per
    /// seq bucket in `events`.
    pub(super) fn has_ever_stored(&self, resource_type: ResourceType) -> Result<bool, StoreError> {
        let mut entries = self
            .keyspaces()
            .current
            .prefix(keys::type_prefix(resource_type));
        Ok(entries
            .next()
            .map(|guard| guard.key())
            .transpose()?
            .is_some())
    }

    /// Calls `visit` with event `seq` of `resource_type`; `None` if there is no such event.
    pub fn with_event<R>(
        &self,
        resource_type: ResourceType,
        seq: u64,
        visit: impl FnOnce(&EventView<'_>) -> R,
    ) -> Result<Option<R>, StoreError> {
        self.keyspaces()
            .with_event_record(resource_type, seq, |event| {
                visit(&view_of(resource_type, event))
            })
    }

    /// `(version, seq)` of every version of a resource, newest first: the newest from
    /// `current`, the superseded ones from `history`, both as of one snapshot.
    pub fn version_seqs(
        &self,
        resource_type: ResourceType,
        id: &str,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let keyspaces = self.keyspaces();
        let snapshot = keyspaces.snapshot();
        let Some(newest) = keyspaces.current_entry(&snapshot, resource_type, id)? else {
            return Ok(Vec::new());
        };
        let mut versions = vec![(newest.version, newest.seq)];
        let prefix = keys::history_prefix(resource_type, id);
        for entry in snapshot.prefix(&keyspaces.history, &prefix).rev() {
            let (key, seq_bytes) = entry.into_inner()?;
            let version = parse_trailing_seq(&key)?;
            let seq = keys::parse_seq(&seq_bytes)
                .ok_or_else(|| StoreError::Corrupt("bad history entry".to_owned()))?;
            versions.push((version, seq));
        }
        Ok(versions)
    }

    /// Adds `(type, seq)` keys to the scratch set `namespace` (not yet durable; see
    /// [`Store::persist_durably`]).
    pub fn scratch_insert(
        &self,
        namespace: &str,
        entries: &[(ResourceType, u64)],
    ) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        let keyspaces = self.keyspaces();
        let mut batch = keyspaces.database.batch();
        for (resource_type, seq) in entries {
            batch.insert(
                &keyspaces.scratch,
                scratch_key(namespace, *resource_type, *seq),
                [],
            );
        }
        batch
            .commit()
            .map_err(|error| self.write_failed(error, None))
    }

    /// Visits, in order, the scratch seqs of `resource_type` inside `window`; pauses
    /// like [`Store::scan_newest_in_window`] while the store is reopened.
    pub fn scratch_scan(
        &self,
        namespace: &str,
        resource_type: ResourceType,
        window: SeqWindow,
        mut visit: impl FnMut(u64) -> Result<ScanControl, StoreError>,
    ) -> Result<(), StoreError> {
        let mut window = window;
        'passes: loop {
            if window.is_empty() {
                return Ok(());
            }
            let start = scratch_key(namespace, resource_type, window.after_seq + 1);
            let end = scratch_key(namespace, resource_type, window.through_seq);
            let keyspaces = self.keyspaces();
            for entry in keyspaces.scratch.range(start..=end) {
                if self.is_reopening() {
                    drop(keyspaces);
                    self.wait_out_reopen();
                    continue 'passes;
                }
                let seq = parse_trailing_seq(&entry.key()?)?;
                window.after_seq = seq;
                if visit(seq)? == ScanControl::Stop {
                    break;
                }
            }
            return Ok(());
        }
    }

    /// Whether `(resource_type, seq)` is in the scratch set `namespace`.
    pub fn scratch_contains(
        &self,
        namespace: &str,
        resource_type: ResourceType,
        seq: u64,
    ) -> Result<bool, StoreError> {
        Ok(self
            .keyspaces()
            .scratch
            .get(scratch_key(namespace, resource_type, seq))?
            .is_some())
    }

    /// The value the scratch map of `namespace` holds for `(resource_type, seq)`.
    pub fn scratch_map_get(
        &self,
        namespace: &str,
        resource_type: ResourceType,
        seq: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .keyspaces()
            .scratch
            .get(scratch_map_key(namespace, resource_type, seq))?
            .map(|value| value.to_vec()))
    }

    /// Sets, in one batch, the scratch map values of `namespace` for each `(type, seq)`.
    pub fn scratch_map_put(
        &self,
        namespace: &str,
        entries: &[((ResourceType, u64), Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        let keyspaces = self.keyspaces();
        let mut batch = keyspaces.database.batch();
        for ((resource_type, seq), value) in entries {
            batch.insert(
                &keyspaces.scratch,
                scratch_map_key(namespace, *resource_type, *seq),
                value.as_slice(),
            );
        }
        batch
            .commit()
            .map_err(|error| self.write_failed(error, None))
    }

    /// Visits, in key order, every value of the scratch map of `namespace`; pauses like
    /// [`Store::scan_newest_in_window`] while the store is reopened.
    pub fn scratch_map_values(
        &self,
        namespace: &str,
        mut visit: impl FnMut(&[u8]) -> Result<ScanControl, StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = scratch_map_prefix(namespace);
        let mut after_key: Option<Vec<u8>> = None;
        'passes: loop {
            let keyspaces = self.keyspaces();
            let entries = match &after_key {
                Some(after_key) => keyspaces.scratch.range::<Vec<u8>, _>((
                    std::ops::Bound::Excluded(after_key.clone()),
                    std::ops::Bound::Unbounded,
                )),
                None => keyspaces.scratch.range::<Vec<u8>, _>(prefix.clone()..),
            };
            for entry in entries {
                if self.is_reopening() {
                    drop(keyspaces);
                    self.wait_out_reopen();
                    continue 'passes;
                }
                let (key, value) = entry.into_inner()?;
                if !key.starts_with(&prefix) {
                    return Ok(());
                }
                after_key = Some(key.to_vec());
                if visit(&value)? == ScanControl::Stop {
                    return Ok(());
                }
            }
            return Ok(());
        }
    }

    /// The first and last scratch seq of `resource_type`.
    pub fn scratch_bounds(
        &self,
        namespace: &str,
        resource_type: ResourceType,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let prefix = scratch_type_prefix(namespace, resource_type);
        let scratch = &self.keyspaces().scratch;
        first_and_last_seq(|| scratch.prefix(&prefix))
    }

    /// Removes the whole scratch set `namespace`.
    pub fn scratch_clear(&self, namespace: &str) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        let keyspaces = self.keyspaces();
        let mut batch = keyspaces.database.batch();
        let mut pending = 0usize;
        for entry in keyspaces
            .scratch
            .prefix(scratch_namespace_prefix(namespace))
        {
            batch.remove(&keyspaces.scratch, entry.key()?);
            pending += 1;
            if pending == 10_000 {
                batch
                    .commit()
                    .map_err(|error| self.write_failed(error, None))?;
                batch = keyspaces.database.batch();
                pending = 0;
            }
        }
        batch
            .commit()
            .map_err(|error| self.write_failed(error, None))
    }

    /// Makes every write so far durable (fsync).
    pub fn persist_durably(&self) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        self.keyspaces()
            .database
            .persist(PersistMode::SyncAll)
            .map_err(|error| self.write_failed(error, None))
    }

    /// Whether the store still takes durable writes: writes a probe entry to `meta` and
    /// fsyncs it (for health checks; a full disk or a failed fsync shows here). While
    /// the store refuses writes it says why without writing.
    pub fn probe_writable(&self) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        let keyspaces = self.keyspaces();
        keyspaces
            .meta
            .insert(
                b"health-probe",
                crate::fhir::Instant::now()
                    .micros_since_epoch()
                    .to_be_bytes(),
            )
            .map_err(|error| self.write_failed(error, None))?;
        self.persist_durably()
    }

    /// Writes a job record durably. One refused (the disk full, say) does not come back
    /// when the store is reopened or restarted.
    pub fn job_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        let keyspaces = self.keyspaces();
        let min_batch_seqno = keyspaces.database.seqno();
        keyspaces
            .jobs
            .insert(key.as_bytes(), value)
            .and_then(|()| keyspaces.database.persist(PersistMode::SyncAll))
            .map_err(|error| {
                let failed_write = FailedWrite {
                    keyspace_id: keyspaces.jobs.id(),
                    key: key.as_bytes().to_vec(),
                    min_batch_seqno,
                };
                self.write_failed(error, Some(failed_write))
            })
    }

    /// Writes a job record that survives a crash of the process (it reaches the OS at
    /// once) but is not fsynced: for per-part checkpoints, whose parts are not fsynced
    /// either, so an fsync would buy no power-loss safety and costs one per part.
    pub fn job_put_buffered(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        self.keyspaces()
            .jobs
            .insert(key.as_bytes(), value)
            .map_err(|error| self.write_failed(error, None))
    }

    pub fn job_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .keyspaces()
            .jobs
            .get(key.as_bytes())?
            .map(|value| value.to_vec()))
    }

    /// Every job record whose key starts with `prefix`, in key order.
    pub fn job_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut records = Vec::new();
        for entry in self.keyspaces().jobs.prefix(prefix.as_bytes()) {
            let (key, value) = entry.into_inner()?;
            let key = String::from_utf8(key.to_vec())
                .map_err(|_| StoreError::Corrupt("job key is not UTF-8".to_owned()))?;
            records.push((key, value.to_vec()));
        }
        Ok(records)
    }

    /// Removes every job record whose key starts with `prefix`, durably.
    pub fn job_delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        self.refuse_while_failed()?;
        let keyspaces = self.keyspaces();
        let mut batch = keyspaces.database.batch();
        for entry in keyspaces.jobs.prefix(prefix.as_bytes()) {
            batch.remove(&keyspaces.jobs, entry.key()?);
        }
        batch
            .commit()
            .map_err(|error| self.write_failed(error, None))?;
        self.persist_durably()
    }
}
