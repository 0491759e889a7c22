//! Compaction of the keyspaces keyed by resource or patient id on a thread of the store's
//! own, so that fjall's worker stays free to flush. fjall 3.1's single worker flushes
//! memtables only between compactions, and a compaction of these keyspaces rewrites all
//! of their level 1 (their keys are random): late in a 13.5M-resource load the applier
//! held writes back for sealed memtables 13–15 s of a 79–149-s quarter, 2 s with this
//! thread. Their strategy as stored in the database leaves them to this thread
//! ([`HANDS_OFF_L0_THRESHOLD`]); in stores created before, fjall's worker compacts them
//! too, which fjall allows.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fjall::{AbstractTree, Database, Keyspace, SeqNo, Snapshot};

/// Level-0 tables at which the strategy stored with the keyspaces would compact: more than
/// fjall lets level 0 hold (it halts writes at 30), so fjall's worker never starts a
/// level-0 compaction of them.
pub(super) const HANDS_OFF_L0_THRESHOLD: u8 = u8::MAX;

/// How long the thread sleeps after a round in which no keyspace changed; a flush adds a
/// level-0 table every ~0.1 s at most, and a compaction starts at twelve of them.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// How long the thread waits after a failed compaction (a full disk) before trying again:
/// were it to stop, level 0 would grow until fjall halts every write.
const RETRY_WAIT: Duration = Duration::from_secs(1);

/// The snapshots this store's readers hold open, so that a compaction keeps every version
/// one of them can still see. fjall's own watermark is not public; this one is never above
/// it for the snapshots taken here, and no other code takes snapshots of the database.
#[derive(Default)]
pub(crate) struct SnapshotRegistry {
    open_by_seqno: Mutex<BTreeMap<SeqNo, usize>>,
}

impl SnapshotRegistry {
    /// Takes a snapshot of `database` that the registry knows of until it is dropped.
    pub(super) fn open(self: &Arc<Self>, database: &Database) -> RegisteredSnapshot {
        let mut open_by_seqno = self.lock();
        let snapshot = database.snapshot();
        *open_by_seqno.entry(snapshot.seqno()).or_default() += 1;
        RegisteredSnapshot {
            snapshot,
            registry: Arc::clone(self),
        }
    }

    /// Versions below this seqno that a newer version below it shadows are invisible to
    /// every open snapshot and to every snapshot taken later, so a compaction may drop them.
    pub(super) fn garbage_collection_watermark(&self, database: &Database) -> SeqNo {
        let open_by_seqno = self.lock();
        let oldest_needed = match open_by_seqno.keys().next() {
            Some(&oldest_open) => oldest_open,
            None => database.visible_seqno(),
        };
        oldest_needed.saturating_sub(1)
    }

    fn close(&self, seqno: SeqNo) {
        let mut open_by_seqno = self.lock();
        if let Some(count) = open_by_seqno.get_mut(&seqno) {
            *count -= 1;
            if *count == 0 {
                open_by_seqno.remove(&seqno);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SeqNo, usize>> {
        self.open_by_seqno
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A snapshot of the database, known to the [`SnapshotRegistry`] while it lives.
pub(crate) struct RegisteredSnapshot {
    snapshot: Snapshot,
    registry: Arc<SnapshotRegistry>,
}

impl std::ops::Deref for RegisteredSnapshot {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl Drop for RegisteredSnapshot {
    fn drop(&mut self) {
        self.registry.close(self.snapshot.seqno());
    }
}

/// The compaction thread; dropping this stops it after the compaction it is running.
pub(super) struct RandomKeyedCompactor {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RandomKeyedCompactor {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts compacting `keyspaces` with `strategy` until the returned handle is dropped.
pub(super) fn spawn_random_keyed_compactor(
    database: Database,
    keyspaces: Vec<Keyspace>,
    strategy: fjall::compaction::Leveled,
    snapshots: Arc<SnapshotRegistry>,
) -> std::io::Result<RandomKeyedCompactor> {
    let (stop_sender, stop_receiver) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("fhirlog-compactor".to_owned())
        .spawn(move || {
            compact_until_stopped(&database, &keyspaces, &strategy, &snapshots, &stop_receiver)
        })?;
    Ok(RandomKeyedCompactor {
        stop: Some(stop_sender),
        thread: Some(thread),
    })
}

fn compact_until_stopped(
    database: &Database,
    keyspaces: &[Keyspace],
    strategy: &fjall::compaction::Leveled,
    snapshots: &SnapshotRegistry,
    stop: &Receiver<()>,
) {
    loop {
        let mut wait = IDLE_WAIT;
        for keyspace in keyspaces {
            let tables_before = table_counts(keyspace);
            let watermark = snapshots.garbage_collection_watermark(database);
            let compacted = std::panic::catch_unwind(AssertUnwindSafe(|| {
                keyspace.tree.compact(Arc::new(strategy.clone()), watermark)
            }));
            match compacted {
                Ok(Ok(())) if table_counts(keyspace) != tables_before => wait = Duration::ZERO,
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(keyspace = %keyspace.name(), %error, "compaction failed; retrying");
                    wait = RETRY_WAIT;
                }
                Err(_) => {
                    tracing::error!(keyspace = %keyspace.name(), "compaction panicked; retrying");
                    wait = RETRY_WAIT;
                }
            }
        }
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn table_counts(keyspace: &Keyspace) -> (usize, usize) {
    (keyspace.l0_table_count(), keyspace.table_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> (tempfile::TempDir, Database, Keyspace) {
        let directory = tempfile::tempdir().expect("temporary directory");
        let database = Database::builder(directory.path())
            .open()
            .expect("database opens");
        let keyspace = database
            .keyspace("values", fjall::KeyspaceCreateOptions::default)
            .expect("keyspace opens");
        (directory, database, keyspace)
    }

    #[test]
    fn the_watermark_stays_below_the_oldest_open_snapshot_until_it_is_dropped() {
        let (_directory, database, keyspace) = database();
        let registry = Arc::new(SnapshotRegistry::default());
        keyspace.insert("a", "1").expect("insert");
        let old_snapshot = registry.open(&database);
        let old_seqno = old_snapshot.seqno();
        for value in 2..10 {
            keyspace.insert("a", value.to_string()).expect("insert");
        }
        let newer_snapshot = registry.open(&database);
        assert!(newer_snapshot.seqno() > old_seqno);
        assert_eq!(
            registry.garbage_collection_watermark(&database),
            old_seqno - 1
        );
        drop(old_snapshot);
        assert_eq!(
            registry.garbage_collection_watermark(&database),
            newer_snapshot.seqno() - 1
        );
        drop(newer_snapshot);
        assert_eq!(
            registry.garbage_collection_watermark(&database),
            database.visible_seqno() - 1
        );
    }

    #[test]
    fn two_snapshots_at_one_seqno_hold_the_watermark_until_both_are_dropped() {
        let (_directory, database, keyspace) = database();
        let registry = Arc::new(SnapshotRegistry::default());
        keyspace.insert("a", "1").expect("insert");
        let first = registry.open(&database);
        let second = registry.open(&database);
        assert_eq!(first.seqno(), second.seqno());
        keyspace.insert("a", "2").expect("insert");
        drop(first);
        assert_eq!(
            registry.garbage_collection_watermark(&database),
            second.seqno() - 1
        );
        drop(second);
        assert_eq!(
            registry.garbage_collection_watermark(&database),
            database.visible_seqno() - 1
        );
    }
}
