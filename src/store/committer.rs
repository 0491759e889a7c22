//! The single writer: the committer thread assigns seqs, versions and instants and stages
//! each request's events and projections into one batch per group; the applier thread
//! commits the groups in order and acknowledges a group only after its batch is fsynced,
//! which happens before any of it becomes visible to readers. The committer stages the
//! next groups while the applier commits the previous one, reading `current` through the
//! entries of the groups the applier has not finished.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fjall::{OwnedWriteBatch, PersistMode};
use tokio::sync::oneshot;

use super::journal_cut::{cut_failed_writes, wait_until_journals_closed};
use super::out_of_space::{FailedWrite, PROBE_INTERVAL, exit_unrecoverable, probe_free_space};
use super::projection::{CurrentOverlay, current_under_key_through_overlays, stage_projections};
use super::read::newest_event;
use super::record::{self, CurrentEntry, EventOperation, EventRecord};
use super::sorted_writes::SortedWrites;
use super::write::{
    PreparedResource, UnchangedContent, VersionInfo, WriteOperation, WriteOutcome, WriteRejection,
};
use super::{DatabaseSlot, Keyspaces, StoreError, keys, open_database};
use crate::fhir::{Instant, ResourceId, ResourceType};

/// Most commit requests folded into one batch and one fsync.
pub(super) const MAX_REQUESTS_PER_GROUP: usize = 512;

/// Groups the committer may stage while the applier still commits an earlier one. With
/// none it waited for each commit's fsync, ~25% of a 2.25M-resource load, and with one a
/// third of that; the load was 4.5% faster (two alternated runs each), and two or three
/// more bought nothing measurable.
const STAGED_GROUPS_AHEAD_OF_THE_APPLIER: usize = 1;

/// fjall 3.1 halts a write that finds this many sealed memtables in a keyspace, in sleeps
/// of 100 ms, until its flush worker catches up.
const FJALL_SEALED_MEMTABLES_HALTING_WRITES: usize = 4;

/// How long holding a group back for flushes may take before the committer checks that
/// fjall still takes writes (a flush that failed, on a full disk, stops them for good).
const FLUSH_WAIT_BEFORE_HEALTH_CHECK: Duration = Duration::from_millis(100);

/// Longest wait for readers to let go of the database so it can be reopened; beyond it
/// the process exits ([`exit_unrecoverable`]).
const REOPEN_WAIT: Duration = Duration::from_secs(30);

/// Longest wait, once the database is closed, for fjall's journal files to be closed.
const JOURNAL_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How long the committer keeps new readers out at a time while readers of the old
/// database finish: a reader that needs a second handle for its operation waits this
/// long at most before all readers are let in again.
const READER_DRAIN_WINDOW: Duration = Duration::from_millis(20);

type CommitReply = Result<Vec<WriteOutcome>, StoreError>;

pub(super) struct CommitRequest {
    pub operations: Vec<WriteOperation>,
    pub reply: oneshot::Sender<CommitReply>,
}

/// One group staged into one batch, on its way from the committer to the applier.
struct StagedGroup {
    number: u64,
    keyspaces: Arc<Keyspaces>,
    batch: OwnedWriteBatch,
    /// Each request's reply channel with what staging answered for it.
    answers: Vec<(oneshot::Sender<CommitReply>, CommitReply)>,
    first_event_key: Option<Vec<u8>>,
    memtables_to_seal: MemtablesToSeal,
}

/// The applier thread ended (it panicked); nothing can be committed any more.
struct ApplierGone;

/// Which memtables the applier seals once the group's batch is in them.
#[derive(Clone, Copy)]
struct MemtablesToSeal {
    events: bool,
    indexes: bool,
}

/// The committer's ends of the channels to and from the applier thread.
pub(super) struct ApplierLink {
    staged: Sender<StagedGroup>,
    /// The number of every group the applier is done with, committed or refused.
    applied: Receiver<u64>,
}

/// Starts the applier thread; it stops once the committer drops its link, after the
/// groups already handed over.
pub(super) fn spawn_applier(
    slot: Arc<DatabaseSlot>,
) -> std::io::Result<(ApplierLink, JoinHandle<()>)> {
    let (staged_sender, staged_receiver) =
        crossbeam_channel::bounded::<StagedGroup>(STAGED_GROUPS_AHEAD_OF_THE_APPLIER);
    let (applied_sender, applied_receiver) = crossbeam_channel::unbounded();
    let thread = std::thread::Builder::new()
        .name("fhirlog-applier".to_owned())
        .spawn(move || {
            for group in staged_receiver {
                let number = group.number;
                apply_group(&slot, group);
                if applied_sender.send(number).is_err() {
                    return;
                }
            }
        })?;
    let link = ApplierLink {
        staged: staged_sender,
        applied: applied_receiver,
    };
    Ok((link, thread))
}

/// Holds the group back, in 1 ms steps, while a keyspace has as many sealed memtables as
/// make fjall halt writes (fjall would sleep 100 ms at a time, and those halts cost a
/// late 2.2M-resource load about a sixth of its time although a flush takes ~25 ms), or
/// while sealed memtables wait for a flush and all memtables together hold more than
/// [`super::StoreOptions::max_write_buffer_bytes`]; only a flush frees memtable memory, so
/// without a sealed memtable there is nothing to wait for.
/// Stops waiting once fjall refuses writes (its flush failed): the commit then fails
/// and the committer repairs the store. The applier runs it right before each commit, so
/// it sees the memtables the previous group sealed.
fn wait_while_flushes_are_behind(keyspaces: &Keyspaces, max_write_buffer_bytes: u64) {
    let flushes_are_behind = || {
        let (most_sealed, total_sealed) = std::iter::once(&keyspaces.events)
            .chain(keyspaces.projections().map(|(_, keyspace)| keyspace))
            .map(fjall::Keyspace::sealed_memtable_count)
            .fold((0, 0), |(most, total), count| {
                (most.max(count), total + count)
            });
        most_sealed >= FJALL_SEALED_MEMTABLES_HALTING_WRITES
            || (total_sealed > 0 && keyspaces.database.write_buffer_size() > max_write_buffer_bytes)
    };
    let mut next_health_check = std::time::Instant::now() + FLUSH_WAIT_BEFORE_HEALTH_CHECK;
    while flushes_are_behind() {
        if std::time::Instant::now() >= next_health_check {
            if keyspaces.database.persist(PersistMode::Buffer).is_err() {
                return;
            }
            next_health_check += FLUSH_WAIT_BEFORE_HEALTH_CHECK;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Commits one group's batch, which fjall fsyncs to its journal before applying it to the
/// memtables, so readers never see a write a crash could lose, and then answers the
/// group's requests. A failed batch leaves nothing visible, and its seqs stay used. While
/// a failure is not repaired every group is refused: a group staged after a failed one
/// was staged on top of writes that were never made.
fn apply_group(slot: &DatabaseSlot, group: StagedGroup) {
    let StagedGroup {
        keyspaces,
        batch,
        answers,
        first_event_key,
        memtables_to_seal,
        ..
    } = group;
    if let Some(refusal) = slot.health.refusal() {
        let message = refusal.to_string();
        for (reply, _) in answers {
            let _ = reply.send(Err(same_refusal(&refusal, &message)));
        }
        return;
    }
    wait_while_flushes_are_behind(&keyspaces, slot.options.max_write_buffer_bytes);
    let min_batch_seqno = keyspaces.database.seqno();
    if let Err(error) = batch.commit() {
        tracing::error!(%error, "commit failed; the group's writes were not acknowledged");
        let failed_write = first_event_key.map(|key| FailedWrite {
            keyspace_id: keyspaces.events.id(),
            key,
            min_batch_seqno,
        });
        let refusal = slot
            .health
            .note_failure(&slot.data_dir, error, failed_write);
        let message = refusal.to_string();
        for (reply, staged) in answers {
            let _ = reply.send(staged.and(Err(same_refusal(&refusal, &message))));
        }
        return;
    }
    for (reply, staged) in answers {
        let _ = reply.send(staged);
    }
    if memtables_to_seal.events {
        seal(&keyspaces.events);
    }
    if memtables_to_seal.indexes {
        for index in [
            &keyspaces.current,
            &keyspaces.history,
            &keyspaces.compartment,
        ] {
            seal(index);
        }
    }
}

pub(super) struct Committer {
    slot: Arc<DatabaseSlot>,
    keyspaces: Arc<Keyspaces>,
    last_seq: u64,
    last_instant: Instant,
    /// Event bytes written since the `events` memtable was last sealed.
    event_bytes_since_rotation: u64,
    events_memtable_bytes: u64,
    /// Approximate bytes written to the id-keyed indexes since they were last sealed.
    index_bytes_since_rotation: u64,
    index_memtable_bytes: u64,
    applier: ApplierLink,
    /// The `current` entries each group handed to the applier wrote, oldest group first,
    /// until the applier reports the group done.
    unapplied: VecDeque<(u64, CurrentOverlay)>,
    last_group_number: u64,
    scratch: EncodingScratch,
}

/// Buffers the committer reuses for every event it encodes, so an event costs one
/// allocation (its value in the batch) rather than three; fjall copies the encoded event.
#[derive(Default)]
struct EncodingScratch {
    finished_body: String,
    encoded_event: Vec<u8>,
}

/// Capacity an [`EncodingScratch`] buffer keeps between events; one grown past it by a
/// large resource is let go once that event is staged, so memory stays bounded.
const SCRATCH_KEPT_BYTES: usize = 1 << 20;

impl EncodingScratch {
    /// The encoded record of `event`, its body finished as written at `instant`
    /// (`last_updated` is its text).
    fn encode(&mut self, event: &PlannedEvent<'_>, instant: Instant, last_updated: &str) -> &[u8] {
        match event.put {
            Some(resource) => {
                resource
                    .body
                    .finish_into(event.version, last_updated, &mut self.finished_body)
            }
            None => self.finished_body.clear(),
        }
        let record = event.record(instant, self.finished_body.as_bytes());
        record::encode_into(&record, &mut self.encoded_event);
        &self.encoded_event
    }

    fn release_if_large(&mut self) {
        if self.finished_body.capacity() > SCRATCH_KEPT_BYTES {
            self.finished_body = String::new();
        }
        if self.encoded_event.capacity() > SCRATCH_KEPT_BYTES {
            self.encoded_event = Vec::new();
        }
    }
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
    fn record<'body>(&'body self, instant: Instant, body: &'body [u8]) -> EventRecord<'body> {
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
        slot: Arc<DatabaseSlot>,
        keyspaces: Arc<Keyspaces>,
        applier: ApplierLink,
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
            event_bytes_since_rotation: 0,
            events_memtable_bytes: slot.options.events_memtable_bytes,
            index_bytes_since_rotation: 0,
            index_memtable_bytes: slot.options.index_memtable_bytes,
            slot,
            keyspaces,
            last_seq,
            last_instant,
            applier,
            unapplied: VecDeque::new(),
            last_group_number: 0,
            scratch: EncodingScratch::default(),
        })
    }

    /// Commits groups until every sender is gone. After a failed write (its own or
    /// another's) it refuses writes at once until the disk has room, then reopens the
    /// database; it wakes every [`PROBE_INTERVAL`] to notice failures of other writers.
    pub fn run(mut self, requests: Receiver<CommitRequest>) {
        loop {
            if self.slot.health.has_failed() {
                self.wait_until_every_group_is_applied();
                match self.refuse_until_writable(&requests) {
                    Some(reopened) => self = reopened,
                    None => return,
                }
            }
            let first = match requests.recv_timeout(PROBE_INTERVAL) {
                Ok(first) => first,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut group = vec![first];
            while group.len() < MAX_REQUESTS_PER_GROUP {
                match requests.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            if let Some(refusal) = self.slot.health.refusal() {
                let message = refusal.to_string();
                for request in group {
                    let _ = request.reply.send(Err(same_refusal(&refusal, &message)));
                }
                continue;
            }
            if self.stage_group(group).is_err() {
                return;
            }
        }
    }

    /// Forgets the entries of the groups the applier reported done: `current` has them.
    fn retire_applied_groups(&mut self) {
        while let Ok(number) = self.applier.applied.try_recv() {
            self.retire_groups_up_to(number);
        }
    }

    fn wait_until_every_group_is_applied(&mut self) {
        while !self.unapplied.is_empty() {
            match self.applier.applied.recv() {
                Ok(number) => self.retire_groups_up_to(number),
                Err(_) => self.unapplied.clear(),
            }
        }
    }

    fn retire_groups_up_to(&mut self, number: u64) {
        while self
            .unapplied
            .front()
            .is_some_and(|(unapplied_number, _)| *unapplied_number <= number)
        {
            self.unapplied.pop_front();
        }
    }

    /// The `current` entry of each operation's resource as the groups staged so far leave
    /// it, in the operations' order. They are looked up in key order: most lookups of a
    /// load miss, and every miss searches each memtable's skiplist, whose search path a
    /// lookup next to the previous one finds in the CPU cache.
    fn current_entries_before(
        &self,
        operations: &[WriteOperation],
        group_overlay: &CurrentOverlay,
    ) -> Result<Vec<Option<CurrentEntry>>, StoreError> {
        let mut keys_in_order: Vec<(Vec<u8>, usize)> = operations
            .iter()
            .enumerate()
            .map(|(index, operation)| {
                let (resource_type, id) = operation.target();
                (keys::type_id(resource_type, id.as_str()), index)
            })
            .collect();
        keys_in_order.sort_unstable();
        let mut entries = vec![None; operations.len()];
        let mut previous_lookup: Option<(&[u8], Option<CurrentEntry>)> = None;
        for (key, index) in &keys_in_order {
            let entry = match previous_lookup {
                Some((previous_key, entry)) if previous_key == key.as_slice() => entry,
                _ => {
                    let staged_overlays = std::iter::once(group_overlay)
                        .chain(self.unapplied.iter().rev().map(|(_, overlay)| overlay));
                    current_under_key_through_overlays(&self.keyspaces, staged_overlays, key)?
                }
            };
            entries[*index] = entry;
            previous_lookup = Some((key, entry));
        }
        Ok(entries)
    }

    /// Answers every request with the refusal until a probe finds room on the disk, then
    /// reopens the database. `None` once every sender is gone.
    fn refuse_until_writable(self, requests: &Receiver<CommitRequest>) -> Option<Committer> {
        let health = &self.slot.health;
        loop {
            let probed = probe_free_space(&self.slot.data_dir);
            health.note_probe(&probed);
            if probed.is_ok() {
                break;
            }
            let deadline = std::time::Instant::now() + PROBE_INTERVAL;
            loop {
                match requests.recv_deadline(deadline) {
                    Ok(request) => {
                        let refusal = health.refusal().unwrap_or(StoreError::Recovering);
                        let _ = request.reply.send(Err(refusal));
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
        }
        Some(self.reopen())
    }

    /// Closes the database once no reader holds it, cuts the failed writes out of its
    /// journal and opens it again. Long scans let go of it meanwhile; new readers wait
    /// [`READER_DRAIN_WINDOW`] at a time while the others finish, and while it is closed.
    /// Exits the process when that cannot be done ([`exit_unrecoverable`]).
    fn reopen(self) -> Committer {
        let started = std::time::Instant::now();
        let Committer {
            slot,
            keyspaces,
            last_seq,
            last_instant,
            events_memtable_bytes,
            index_memtable_bytes,
            applier,
            last_group_number,
            ..
        } = self;
        slot.health.set_reopening(true);
        let held_by_slot_and_committer_only = || Arc::strong_count(&keyspaces) == 2;
        let mut current = loop {
            let current = slot.current.write().unwrap_or_else(PoisonError::into_inner);
            let window_ends = std::time::Instant::now() + READER_DRAIN_WINDOW;
            while !held_by_slot_and_committer_only() && std::time::Instant::now() < window_ends {
                std::thread::sleep(Duration::from_micros(100));
            }
            if held_by_slot_and_committer_only() {
                break current;
            }
            drop(current);
            if started.elapsed() > REOPEN_WAIT {
                exit_unrecoverable(&format!(
                    "readers still held the database after {} s",
                    REOPEN_WAIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let closing = std::time::Instant::now();
        current.take();
        drop(keyspaces);
        let store_dir = slot.data_dir.join("store");
        if let Err(reason) = wait_until_journals_closed(&store_dir, JOURNAL_CLOSE_WAIT) {
            exit_unrecoverable(&reason);
        }
        let failed_writes = slot.health.take_failed_writes();
        match cut_failed_writes(&store_dir, &failed_writes) {
            Ok(Some(cut)) => tracing::warn!(
                journal = %cut.journal.display(),
                length = cut.length,
                "cut the failed writes out of the store's journal"
            ),
            Ok(None) => {}
            Err(error) => exit_unrecoverable(&format!(
                "cutting the failed writes out of the journal in {} failed: {error}",
                store_dir.display()
            )),
        }
        let opening = std::time::Instant::now();
        let keyspaces = match open_database(&slot.data_dir, &slot.options) {
            Ok(keyspaces) => Arc::new(keyspaces),
            Err(error) => exit_unrecoverable(&format!("reopening the store failed: {error}")),
        };
        *current = Some(Arc::clone(&keyspaces));
        slot.health.clear();
        slot.health.set_reopening(false);
        drop(current);
        tracing::warn!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            readers_waited_ms = (closing - started).as_millis() as u64,
            closed_ms = (opening - closing).as_millis() as u64,
            opened_ms = opening.elapsed().as_millis() as u64,
            "the store was reopened after a failed write; writes are taken again"
        );
        Committer {
            slot,
            keyspaces,
            last_seq,
            last_instant,
            event_bytes_since_rotation: 0,
            events_memtable_bytes,
            index_bytes_since_rotation: 0,
            index_memtable_bytes,
            applier,
            unapplied: VecDeque::new(),
            last_group_number,
            scratch: EncodingScratch::default(),
        }
    }

    /// Stages the group into one batch and hands it to the applier, once fewer than
    /// [`STAGED_GROUPS_AHEAD_OF_THE_APPLIER`] wait for it.
    fn stage_group(&mut self, group: Vec<CommitRequest>) -> Result<(), ApplierGone> {
        let mut batch = self
            .keyspaces
            .database
            .batch()
            .durability(Some(PersistMode::SyncAll));
        let mut writes = SortedWrites::new();
        let mut group_overlay = CurrentOverlay::new();
        let mut answers = Vec::with_capacity(group.len());
        let mut first_event_key = None;
        for request in group {
            let staged = self.stage_request(
                &request.operations,
                &mut writes,
                &mut group_overlay,
                &mut first_event_key,
            );
            answers.push((request.reply, staged));
        }
        writes.append_to(&mut batch);
        self.last_group_number += 1;
        let staged_group = StagedGroup {
            number: self.last_group_number,
            keyspaces: Arc::clone(&self.keyspaces),
            batch,
            answers,
            first_event_key,
            memtables_to_seal: self.memtables_to_seal(),
        };
        if let Err(unsent) = self.applier.staged.send(staged_group) {
            tracing::error!("the applier thread is gone; the store takes no more writes");
            for (reply, _) in unsent.0.answers {
                let _ = reply.send(Err(StoreError::Closed));
            }
            return Err(ApplierGone);
        }
        self.unapplied
            .push_back((self.last_group_number, group_overlay));
        self.retire_applied_groups();
        Ok(())
    }

    /// Whether the `events` memtable, and the id-keyed indexes' memtables, hold their share
    /// of bytes once this group is in them: then the applier seals them. fjall asks its
    /// background worker to do this, and while that worker compacts the request waits and
    /// the memtables keep growing; sealing here lets fjall's own limit on sealed memtables
    /// hold writes back, which keeps memory bounded.
    fn memtables_to_seal(&mut self) -> MemtablesToSeal {
        let events = self.event_bytes_since_rotation >= self.events_memtable_bytes;
        if events {
            self.event_bytes_since_rotation = 0;
        }
        let indexes = self.index_bytes_since_rotation >= self.index_memtable_bytes * 3;
        if indexes {
            self.index_bytes_since_rotation = 0;
        }
        MemtablesToSeal { events, indexes }
    }

    /// Validates a whole request, then stages it; a refused request stages nothing.
    fn stage_request(
        &mut self,
        operations: &[WriteOperation],
        writes: &mut SortedWrites,
        group_overlay: &mut CurrentOverlay,
        first_event_key: &mut Option<Vec<u8>>,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let planned = self.plan_request(operations, group_overlay)?;
        let Some(last_event) = planned.events.last() else {
            return Ok(planned.outcomes);
        };
        if first_event_key.is_none() {
            let first_event = &planned.events[0];
            *first_event_key =
                Some(keys::event(first_event.resource_type, first_event.seq).to_vec());
        }
        let last_seq = last_event.seq;
        let last_updated = planned.instant.to_fhir_string();
        for event in &planned.events {
            let encoded = self.scratch.encode(event, planned.instant, &last_updated);
            self.event_bytes_since_rotation += encoded.len() as u64;
            writes.insert(
                &self.keyspaces.events,
                keys::event(event.resource_type, event.seq),
                encoded,
            );
            // The projections never read the body: a large one's buffers are let go before
            // they stage a key per compartment patient (a large Group's peak).
            self.scratch.release_if_large();
            let record = event.record(planned.instant, &[]);
            self.index_bytes_since_rotation +=
                approximate_index_bytes(&record, event.previous.is_some());
            stage_projections(
                &self.keyspaces,
                writes,
                group_overlay,
                &record,
                event.previous,
            )?;
        }
        writes.insert(
            &self.keyspaces.clock,
            keys::clock(planned.instant),
            keys::seq(last_seq),
        );
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
        let entries_before = self.current_entries_before(operations, group_overlay)?;
        let mut next_seq = self.last_seq + 1;
        for (operation, entry_before) in operations.iter().zip(entries_before) {
            let (resource_type, id) = operation.target();
            let previous = match request_current.get(&(resource_type, id.as_str())) {
                Some(entry) => Some(*entry),
                None => entry_before,
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
                        && let Some(live) = previous.filter(|entry| {
                            !entry.deleted
                                && entry.digest_prefix == record::digest_prefix(&resource.digest)
                        })
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
                    digest_prefix: put
                        .map(|resource| record::digest_prefix(&resource.digest))
                        .unwrap_or_default(),
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

/// Another copy of `refusal` (whose `message` is given) for the next request it answers.
fn same_refusal(refusal: &StoreError, message: &str) -> StoreError {
    match refusal {
        StoreError::OutOfSpace => StoreError::OutOfSpace,
        StoreError::Recovering => StoreError::Recovering,
        _ => StoreError::Storage(fjall::Error::Io(std::io::Error::other(message.to_owned()))),
    }
}

fn seal(keyspace: &fjall::Keyspace) {
    if let Err(error) = keyspace.rotate_memtable() {
        tracing::warn!(%error, "could not seal a memtable");
    }
}

/// What one event adds to `current`, `history` (only when it supersedes a version) and
/// `compartment`: keys, values and fjall's per-entry overhead, roughly.
fn approximate_index_bytes(record: &EventRecord<'_>, supersedes: bool) -> u64 {
    const PER_ENTRY_OVERHEAD: u64 = 16;
    let id_bytes = keys::encoded_id_length(record.id) as u64;
    let current = 2 + id_bytes + 32 + PER_ENTRY_OVERHEAD;
    let history = if supersedes {
        2 + id_bytes + 1 + 8 + 8 + PER_ENTRY_OVERHEAD
    } else {
        0
    };
    let compartment: u64 = record
        .compartment_patients
        .iter()
        .map(|patient| {
            keys::encoded_id_length(patient) as u64 + 1 + 2 + id_bytes + PER_ENTRY_OVERHEAD
        })
        .sum();
    current + history + compartment
}
