//! The event-sourced store: the only code that touches fjall. Every write appends
//! immutable events; `current`, `history`, `superseded`, `compartment`, `log` and `clock`
//! are projections of them written in the same batch (DESIGN.md §2).

mod committer;
mod compactor;
mod journal_cut;
mod keys;
mod out_of_space;
mod projection;
mod read;
mod rebuild;
mod record;
mod scan;
mod sorted_writes;
mod write;

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;

use fjall::{Database, Keyspace, KeyspaceCreateOptions};

pub use read::{HistoryPage, HistoryRead, HistoryScope, ProjectionDump, StoredVersion};
pub use rebuild::RebuildSummary;
pub use record::{decode as decode_record, encode as encode_record};
pub use scan::{EventView, ScanControl, SeqWindow};
pub use write::{
    PreparedResource, UnchangedContent, VersionInfo, WriteOperation, WriteOutcome, WriteRejection,
};

use committer::{CommitRequest, Committer, spawn_applier};
use compactor::{RandomKeyedCompactor, SnapshotRegistry, spawn_random_keyed_compactor};
use out_of_space::{FailedWrite, WriteHealth};

/// Store failures a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {path} is in use by another fhirlog process")]
    Locked { path: PathBuf },
    #[error(
        "the data directory {path} holds a store in {found}, but this fhirlog reads layout \
         {STORE_LAYOUT_VERSION}; load the data into a new data directory"
    )]
    IncompatibleLayout { path: PathBuf, found: String },
    #[error("storage failure: {0}")]
    Storage(#[from] fjall::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{} holds no fhirlog store; check --data-dir", path.display())]
    NoStore { path: PathBuf },
    #[error(
        "the data directory {path} holds a half-rebuilt store (a `fhirlog rebuild` was \
         interrupted); run `fhirlog rebuild --data-dir {path}` to finish it"
    )]
    RebuildInterrupted { path: PathBuf },
    #[error("the store is shutting down")]
    Closed,
    #[error(
        "the store's disk is full: writes are refused until space is freed on it (reads, \
         history, metadata and exports of stored data still work)"
    )]
    OutOfSpace,
    #[error("the store is recovering from a failed write; retry shortly")]
    Recovering,
    #[error(transparent)]
    Rejected(#[from] WriteRejection),
}

impl StoreError {
    /// Whether the store refused a write only until its disk has room again or it has
    /// repaired a failed write: the same write may succeed shortly.
    pub fn is_passing_refusal(&self) -> bool {
        matches!(self, StoreError::OutOfSpace | StoreError::Recovering)
    }
}

/// Memory and durability settings; the defaults keep memory bounded whatever the store size.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub block_cache_bytes: u64,
    pub max_journal_bytes: u64,
    pub events_memtable_bytes: u64,
    pub index_memtable_bytes: u64,
    /// Memtable bytes, active and sealed, above which the applier holds groups back while
    /// sealed memtables wait for their flush: fjall's single worker flushes only between
    /// the compactions it runs (those of the id-keyed indexes run on the store's own
    /// thread, [`compactor`]).
    pub max_write_buffer_bytes: u64,
    /// Commit requests waiting for the committer, beyond the groups it stages while an
    /// earlier one is applied; a writer that finds the queue full waits for room, so a
    /// burst of writers cannot grow memory without bound.
    pub max_queued_commits: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_cache_bytes: 32 << 20,
            max_journal_bytes: 256 << 20,
            events_memtable_bytes: 8 << 20,
            // 16 MiB cut fjall's compaction time at 13.5M resources, but on the 1,000-patient
            // set it made `Observation?patient=…&code=…` 2.8× slower (p50 15.6 vs 5.6 ms) and
            // the load slower (51.9k vs 56.2k res/s, peak RSS 257 vs 243 MB).
            index_memtable_bytes: 8 << 20,
            // 96 MiB peaked at 310 MB RSS in the last quarter of a 13.5M-resource load
            // (31.5k res/s); 64 MiB peaked at 284 MB (28.4k res/s).
            max_write_buffer_bytes: 64 << 20,
            max_queued_commits: DEFAULT_MAX_QUEUED_COMMITS,
        }
    }
}

/// As many queued requests as the committer folds into one group, so queueing never
/// shrinks a group.
const DEFAULT_MAX_QUEUED_COMMITS: usize = committer::MAX_REQUESTS_PER_GROUP;

/// The version of the key and record layout; a store written with another one is refused
/// at open rather than misread. 2: `events` keys lead with a seq bucket. 3: `history` holds
/// only superseded versions; the newest is in `current`. 4: ids that are lowercase UUIDs are
/// packed into 16 bytes in the id-keyed indexes, and `current` keeps half the digest.
const STORE_LAYOUT_VERSION: u32 = 4;

/// The `meta` entry holding the layout version.
const STORE_LAYOUT_KEY: &[u8] = b"layout";

/// The `meta` entry present, durably, from the start of a rebuild until its last batch is
/// durable: the projections may be partial while it exists.
const REBUILD_IN_PROGRESS_KEY: &[u8] = b"rebuild-in-progress";

/// One background thread for flushes and compactions: with two, fjall 3.1's idle worker
/// spins re-queueing work while the other compacts (measured at ~18% of all CPU late in a
/// 2.2M-resource load); one thread loaded that store ~25% faster on two cores.
const FJALL_WORKER_THREADS: usize = 1;

/// Tables of 16 MiB instead of fjall's 64 MiB: compactions rewrite less at a time
/// (measured ~10% faster late in a 2.2M-resource load).
const TABLE_TARGET_BYTES: u64 = 16 << 20;

/// Level-0 tables gathered before a compaction into level 1 for the indexes keyed by
/// resource or patient id: their keys are random, so every such compaction rewrites all
/// of level 1, and gathering more tables per compaction rewrites it less often (12 rather
/// than 8: the last quarter of a 2.2M-resource load ran at 57k instead of 52k resources/s,
/// averaged over three runs each). fjall starts slowing writes at 20 level-0 tables. Their
/// blocks (UUIDs and seqs) barely compress, so they are stored uncompressed. The store's
/// own thread compacts them ([`compactor`]).
const RANDOM_KEYED_L0_THRESHOLD: u8 = 12;

/// How the store's compaction thread compacts the indexes keyed by resource or patient id.
fn random_keyed_compaction() -> fjall::compaction::Leveled {
    fjall::compaction::Leveled::default()
        .with_table_target_size(TABLE_TARGET_BYTES)
        .with_l0_threshold(RANDOM_KEYED_L0_THRESHOLD)
}

/// Data blocks of `events` (fjall's default is 4 KiB): an export reads whole runs of
/// events, and a 4 KiB block holds only a few resources, so per-block costs (a read
/// call, a cache entry, an index step) dominated the scan.
const EVENTS_DATA_BLOCK_BYTES: u32 = 64 << 10;

/// How a keyspace's keys arrive, which decides how it is compressed and compacted.
#[derive(Debug, Clone, Copy)]
enum KeyOrder {
    /// Mostly ascending keys (seqs, instants, job names): fjall's defaults.
    Ascending,
    /// `events`: ascending seq buckets, so older tables are moved down, never rewritten;
    /// hence LZ4 from level 0, as a moved table is never recompressed.
    EventBuckets,
    /// Keys led by a resource or patient id: see [`RANDOM_KEYED_L0_THRESHOLD`].
    RandomIds,
}

/// Which point reads a keyspace serves, which decides its Bloom filters.
#[derive(Debug, Clone, Copy)]
enum PointReads {
    /// fjall's defaults: filters on every level, pinned in memory on level 0 only.
    Some,
    /// `current`: looked up for every written resource, and in a load of new resources
    /// every lookup misses. Filters pinned on every level, so a miss reads no table block
    /// (unpinned, the 32 MiB block cache held only a part of them and lookups kept
    /// reading them back); they take ~1.5 bytes per resource.
    EveryWrite,
    /// `history`: read only for versions known to exist, so the last level, which holds
    /// most keys, has no filter.
    Hits,
    /// `compartment`: only prefix scans, which filters cannot serve.
    None,
}

fn keyspace_options(
    memtable_bytes: u64,
    key_order: KeyOrder,
    point_reads: PointReads,
) -> KeyspaceCreateOptions {
    let options = KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes);
    let options = match point_reads {
        PointReads::Some => options,
        PointReads::EveryWrite => {
            options.filter_block_pinning_policy(fjall::config::PinningPolicy::all(true))
        }
        PointReads::Hits => options.expect_point_read_hits(true),
        PointReads::None => options.filter_policy(fjall::config::FilterPolicy::all(
            fjall::config::FilterPolicyEntry::None,
        )),
    };
    let leveled = fjall::compaction::Leveled::default().with_table_target_size(TABLE_TARGET_BYTES);
    let all_blocks = fjall::config::CompressionPolicy::all;
    let (options, leveled) = match key_order {
        KeyOrder::Ascending => (unpinned_blocks(options), leveled),
        KeyOrder::EventBuckets => (
            unpinned_blocks(options)
                .data_block_compression_policy(all_blocks(fjall::CompressionType::Lz4))
                .data_block_size_policy(fjall::config::BlockSizePolicy::all(
                    EVENTS_DATA_BLOCK_BYTES,
                )),
            leveled,
        ),
        KeyOrder::RandomIds => (
            options.data_block_compression_policy(all_blocks(fjall::CompressionType::None)),
            leveled.with_l0_threshold(compactor::HANDS_OFF_L0_THRESHOLD),
        ),
    };
    options.compaction_strategy(Arc::new(leveled))
}

/// No filter or index block held in memory outside the block cache. fjall pins a table's
/// blocks by the level it is written to and keeps them pinned when it moves the table
/// down unchanged, which is how tables of ascending keys reach the lower levels: with its
/// defaults (level-0 filters at ~19 bits per key) a process that loaded 13.5M resources
/// held the `events` and `log` filters of every table it had flushed.
fn unpinned_blocks(options: KeyspaceCreateOptions) -> KeyspaceCreateOptions {
    options
        .filter_block_pinning_policy(fjall::config::PinningPolicy::all(false))
        .index_block_pinning_policy(fjall::config::PinningPolicy::all(false))
}

#[derive(Clone)]
pub(crate) struct Keyspaces {
    database: Database,
    events: Keyspace,
    log: Keyspace,
    superseded: Keyspace,
    current: Keyspace,
    history: Keyspace,
    compartment: Keyspace,
    clock: Keyspace,
    jobs: Keyspace,
    scratch: Keyspace,
    meta: Keyspace,
    snapshots: Arc<SnapshotRegistry>,
    /// Declared last: dropped, and its thread joined, once every other field is gone.
    _compactor: Arc<RandomKeyedCompactor>,
}

impl Keyspaces {
    fn open(database: Database, options: &StoreOptions) -> Result<Keyspaces, StoreError> {
        let events_bytes = options.events_memtable_bytes;
        let index_bytes = options.index_memtable_bytes;
        let small_index_bytes = (index_bytes / 4).max(1 << 20);
        let open = |name: &str, memtable_bytes: u64, key_order: KeyOrder, reads: PointReads| {
            database.keyspace(name, || keyspace_options(memtable_bytes, key_order, reads))
        };
        let ascending = KeyOrder::Ascending;
        let random_ids = KeyOrder::RandomIds;
        let some = PointReads::Some;
        let current = open("current", index_bytes, random_ids, PointReads::EveryWrite)?;
        let history = open("history", index_bytes, random_ids, PointReads::Hits)?;
        let compartment = open("compartment", index_bytes, random_ids, PointReads::None)?;
        let snapshots = Arc::new(SnapshotRegistry::default());
        let compactor = spawn_random_keyed_compactor(
            database.clone(),
            vec![current.clone(), history.clone(), compartment.clone()],
            random_keyed_compaction(),
            Arc::clone(&snapshots),
        )
        .map_err(|error| StoreError::Storage(fjall::Error::Io(error)))?;
        Ok(Keyspaces {
            events: open("events", events_bytes, KeyOrder::EventBuckets, some)?,
            log: open("log", small_index_bytes, ascending, some)?,
            superseded: open("superseded", small_index_bytes, ascending, some)?,
            current,
            history,
            compartment,
            clock: open("clock", small_index_bytes, ascending, some)?,
            jobs: open("jobs", small_index_bytes, ascending, some)?,
            scratch: open("scratch", index_bytes, ascending, some)?,
            meta: open("meta", small_index_bytes, ascending, some)?,
            database,
            snapshots,
            _compactor: Arc::new(compactor),
        })
    }

    /// Every projection, i.e. every keyspace but `events`, with its name.
    fn projections(&self) -> [(&'static str, &Keyspace); 6] {
        [
            ("log", &self.log),
            ("superseded", &self.superseded),
            ("current", &self.current),
            ("history", &self.history),
            ("compartment", &self.compartment),
            ("clock", &self.clock),
        ]
    }
}

/// The open database, which the committer swaps for a reopened one after a failed write
/// ([`out_of_space`]); readers take a handle per operation.
struct DatabaseSlot {
    data_dir: PathBuf,
    options: StoreOptions,
    /// `None` only while the committer, holding the lock, reopens the database.
    current: RwLock<Option<Arc<Keyspaces>>>,
    health: WriteHealth,
}

impl DatabaseSlot {
    fn keyspaces(&self) -> Arc<Keyspaces> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            current
                .as_ref()
                .expect("the database slot is empty only while its lock is held"),
        )
    }
}

/// Opens fjall in `data_dir/store` with its keyspaces.
fn open_database(data_dir: &Path, options: &StoreOptions) -> Result<Keyspaces, StoreError> {
    let database = Database::builder(data_dir.join("store"))
        .cache_size(options.block_cache_bytes)
        .max_journaling_size(options.max_journal_bytes)
        .worker_threads(FJALL_WORKER_THREADS)
        .open()
        .map_err(|error| match error {
            fjall::Error::Locked => StoreError::Locked {
                path: data_dir.to_path_buf(),
            },
            other => StoreError::Storage(other),
        })?;
    Keyspaces::open(database, options)
}

/// fjall 3.1 starts a new journal only when a flush finds the active one past this many
/// bytes, and replays the whole active journal, item by item, at every open.
const FJALL_JOURNAL_ROTATION_BYTES: usize = 64_000_000;
const JOURNAL_FILLER_VALUE_BYTES: usize = 1 << 20;
/// Filler values written and deleted between two flushes of `scratch`: the filler reaches
/// the journal in rounds, so at most this many values sit in a memtable at once (all 62 at
/// once put 64 MiB in memory at the end of every load).
const JOURNAL_FILLER_VALUES_PER_ROUND: usize = 8;
/// Sorts after every job's scratch keys (job ids are hex).
const JOURNAL_FILLER_KEY_PREFIX: &[u8] = b"\xffjournal-filler/";

/// Bytes that fjall's LZ4 journal compression cannot shrink (xorshift64).
fn incompressible_bytes(length: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// A handle to an open store; clones share it. Dropping the last handle stops the
/// committer and closes the database, releasing the data directory.
#[derive(Clone)]
pub struct Store {
    shared: Arc<StoreShared>,
}

struct StoreShared {
    slot: Arc<DatabaseSlot>,
    commit_sender: Option<crossbeam_channel::Sender<CommitRequest>>,
    committer_thread: Option<JoinHandle<()>>,
    applier_thread: Option<JoinHandle<()>>,
}

impl Drop for StoreShared {
    fn drop(&mut self) {
        self.commit_sender.take();
        for thread in [self.committer_thread.take(), self.applier_thread.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// A commit submitted to the committer; [`PendingCommit::wait`] returns once it is
/// durable (fsynced) or refused.
pub struct PendingCommit {
    /// A request submitted from inside the async runtime while the queue was full; it is
    /// queued when waited for.
    unqueued: Option<(Store, CommitRequest)>,
    reply: tokio::sync::oneshot::Receiver<Result<Vec<WriteOutcome>, StoreError>>,
}

impl PendingCommit {
    /// Blocks the calling thread; never call it on the async runtime.
    pub fn wait(self) -> Result<Vec<WriteOutcome>, StoreError> {
        if let Some((store, request)) = self.unqueued {
            store.queue_waiting_for_room(request);
        }
        self.reply
            .blocking_recv()
            .unwrap_or(Err(StoreError::Closed))
    }

    /// Waits without blocking the runtime, also while the commit queue is full.
    pub async fn wait_async(self) -> Result<Vec<WriteOutcome>, StoreError> {
        if let Some((store, request)) = self.unqueued {
            let queued =
                tokio::task::spawn_blocking(move || store.queue_waiting_for_room(request)).await;
            if queued.is_err() {
                return Err(StoreError::Closed);
            }
        }
        self.reply.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// Refuses a data directory that holds no store.
fn require_existing_store(data_dir: &Path) -> Result<(), StoreError> {
    if data_dir.join("store").is_dir() {
        return Ok(());
    }
    Err(StoreError::NoStore {
        path: data_dir.to_path_buf(),
    })
}

impl Store {
    /// Opens the store in `data_dir` without creating one: a directory holding no store
    /// is refused.
    pub fn open_existing(data_dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        require_existing_store(data_dir)?;
        Store::open(data_dir, options)
    }

    /// Writes every memtable out as tables, waits for those flushes and retires the
    /// journal they came from, so the next open replays (almost) no journal. Blocking; for
    /// the end of a bulk load. A flush that fails (a full disk) ends the wait with the
    /// error.
    pub fn flush_memtables(&self) -> Result<(), StoreError> {
        let keyspaces = self.keyspaces();
        let all = [
            &keyspaces.events,
            &keyspaces.log,
            &keyspaces.superseded,
            &keyspaces.current,
            &keyspaces.history,
            &keyspaces.compartment,
            &keyspaces.clock,
            &keyspaces.jobs,
            &keyspaces.scratch,
            &keyspaces.meta,
        ];
        self.flush_and_wait(&keyspaces.database, &all)?;
        self.retire_flushed_journal(&keyspaces.database, &keyspaces.scratch)
    }

    /// Seals `keyspaces`' memtables and waits until they are flushed; a flush that fails
    /// ends the wait with the error.
    fn flush_and_wait(
        &self,
        database: &Database,
        keyspaces: &[&Keyspace],
    ) -> Result<(), StoreError> {
        for keyspace in keyspaces {
            keyspace
                .rotate_memtable()
                .map_err(|error| self.write_failed(error, None))?;
        }
        while database.outstanding_flushes() > 0
            || keyspaces
                .iter()
                .any(|keyspace| keyspace.sealed_memtable_count() > 0)
        {
            database
                .persist(fjall::PersistMode::Buffer)
                .map_err(|error| self.write_failed(error, None))?;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Makes fjall start a new journal once everything in the active one is in tables: pads
    /// the journal past fjall's rotation mark with filler (incompressible, as fjall compresses
    /// journal values with LZ4) that is deleted at once, flushing after every
    /// [`JOURNAL_FILLER_VALUES_PER_ROUND`] values. Without it the next
    /// open replays up to 64 MB of journal (0.35-0.47 s after a load of 2.25M resources, the
    /// largest fixed cost of `fhirlog export`). Costs one 64 MB journal write; compaction
    /// drops whatever filler reached a table.
    fn retire_flushed_journal(
        &self,
        database: &Database,
        scratch: &Keyspace,
    ) -> Result<(), StoreError> {
        let filler = incompressible_bytes(JOURNAL_FILLER_VALUE_BYTES);
        let filler_count = FJALL_JOURNAL_ROTATION_BYTES / JOURNAL_FILLER_VALUE_BYTES + 1;
        let filler_key = |index: usize| [JOURNAL_FILLER_KEY_PREFIX, &index.to_be_bytes()].concat();
        let indexes: Vec<usize> = (0..filler_count).collect();
        for round in indexes.chunks(JOURNAL_FILLER_VALUES_PER_ROUND) {
            for &index in round {
                scratch
                    .insert(filler_key(index), filler.as_slice())
                    .map_err(|error| self.write_failed(error, None))?;
            }
            for &index in round {
                scratch
                    .remove(filler_key(index))
                    .map_err(|error| self.write_failed(error, None))?;
            }
            self.flush_and_wait(database, &[scratch])?;
        }
        Ok(())
    }

    /// Opens the store for reads and writes; refuses one that a rebuild left half done.
    pub fn open(data_dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let store = Store::open_even_mid_rebuild(data_dir, options)?;
        if store
            .keyspaces()
            .meta
            .contains_key(REBUILD_IN_PROGRESS_KEY)?
        {
            return Err(StoreError::RebuildInterrupted {
                path: data_dir.to_path_buf(),
            });
        }
        Ok(store)
    }

    /// Opens an existing store for [`Store::rebuild_projections`], also when an earlier
    /// rebuild was interrupted. Opening reads only `events` and `meta`, so no projection,
    /// however damaged, keeps a rebuild from starting.
    pub fn open_for_rebuild(data_dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        require_existing_store(data_dir)?;
        Store::open_even_mid_rebuild(data_dir, options)
    }

    fn open_even_mid_rebuild(data_dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| StoreError::Storage(fjall::Error::Io(error)))?;
        let keyspaces = Arc::new(open_database(data_dir, options)?);
        check_layout(&keyspaces, data_dir)?;
        let slot = Arc::new(DatabaseSlot {
            data_dir: data_dir.to_path_buf(),
            options: options.clone(),
            current: RwLock::new(Some(Arc::clone(&keyspaces))),
            health: WriteHealth::default(),
        });
        let thread_error = |error| StoreError::Storage(fjall::Error::Io(error));
        let (applier, applier_thread) = spawn_applier(Arc::clone(&slot)).map_err(thread_error)?;
        let (commit_sender, commit_receiver) =
            crossbeam_channel::bounded(options.max_queued_commits.max(1));
        let committer_thread = match Committer::recover(Arc::clone(&slot), keyspaces, applier)
            .and_then(|committer| {
                std::thread::Builder::new()
                    .name("fhirlog-committer".to_owned())
                    .spawn(move || committer.run(commit_receiver))
                    .map_err(thread_error)
            }) {
            Ok(committer_thread) => committer_thread,
            Err(error) => {
                // The committer's end of the applier link is gone, which ends the applier;
                // joining it releases the database before the error is returned.
                let _ = applier_thread.join();
                return Err(error);
            }
        };
        Ok(Store {
            shared: Arc::new(StoreShared {
                slot,
                commit_sender: Some(commit_sender),
                committer_thread: Some(committer_thread),
                applier_thread: Some(applier_thread),
            }),
        })
    }

    /// Queues `operations` as one all-or-nothing commit. Commits queued together share one
    /// fsync (group commit). While [`StoreOptions::max_queued_commits`] requests wait, a
    /// caller outside the async runtime blocks here until there is room, so its commits
    /// keep the order it submitted them in; inside the runtime the request is queued by
    /// [`PendingCommit::wait_async`] instead, and never blocks a runtime thread.
    pub fn submit(&self, operations: Vec<WriteOperation>) -> PendingCommit {
        let (reply_sender, reply) = tokio::sync::oneshot::channel();
        let request = CommitRequest {
            operations,
            reply: reply_sender,
        };
        let Some(sender) = &self.shared.commit_sender else {
            let _ = request.reply.send(Err(StoreError::Closed));
            return PendingCommit {
                unqueued: None,
                reply,
            };
        };
        let unqueued = match sender.try_send(request) {
            Ok(()) => None,
            Err(crossbeam_channel::TrySendError::Disconnected(request)) => {
                let _ = request.reply.send(Err(StoreError::Closed));
                None
            }
            Err(crossbeam_channel::TrySendError::Full(request)) => {
                if tokio::runtime::Handle::try_current().is_ok() {
                    Some((self.clone(), request))
                } else {
                    self.queue_waiting_for_room(request);
                    None
                }
            }
        };
        PendingCommit { unqueued, reply }
    }

    /// Queues `request`, blocking while the queue is full.
    fn queue_waiting_for_room(&self, request: CommitRequest) {
        if let Some(sender) = &self.shared.commit_sender
            && let Err(crossbeam_channel::SendError(request)) = sender.send(request)
        {
            let _ = request.reply.send(Err(StoreError::Closed));
        }
    }

    /// Commit requests waiting in the queue for the committer.
    pub fn queued_commits(&self) -> usize {
        self.shared
            .commit_sender
            .as_ref()
            .map_or(0, crossbeam_channel::Sender::len)
    }

    /// Commits and waits until durable; blocks the calling thread.
    pub fn commit(&self, operations: Vec<WriteOperation>) -> Result<Vec<WriteOutcome>, StoreError> {
        self.submit(operations).wait()
    }

    /// The directory the store was opened in.
    pub fn data_dir(&self) -> &Path {
        &self.shared.slot.data_dir
    }

    /// The open database, for one operation: holding it across a reopen delays the
    /// reopen, so a long scan lets go of it when [`Store::is_reopening`] says so.
    pub(crate) fn keyspaces(&self) -> Arc<Keyspaces> {
        self.shared.slot.keyspaces()
    }

    /// Refuses a write while the store repairs a failed one (its disk full, most often).
    fn refuse_while_failed(&self) -> Result<(), StoreError> {
        match self.shared.slot.health.refusal() {
            Some(refusal) => Err(refusal),
            None => Ok(()),
        }
    }

    /// Records a failed write outside the committer and classifies it for its caller;
    /// `failed_write` names what must not come back when the journal is replayed.
    fn write_failed(&self, error: fjall::Error, failed_write: Option<FailedWrite>) -> StoreError {
        self.shared
            .slot
            .health
            .note_failure(self.data_dir(), error, failed_write)
    }

    /// Records a write as failed with `error`, as a real failure would: writes are refused
    /// until the committer has probed the disk and reopened the database.
    #[cfg(test)]
    pub(crate) fn fail_a_write_for_test(&self, error: std::io::Error) {
        self.write_failed(fjall::Error::Io(error), None);
    }

    /// Whether the committer waits for readers to let go of the database to reopen it.
    fn is_reopening(&self) -> bool {
        self.shared.slot.health.is_reopening()
    }

    /// Waits until the committer has reopened the database.
    fn wait_out_reopen(&self) {
        while self.is_reopening() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Marks a new store with [`STORE_LAYOUT_VERSION`]; refuses a store marked with another
/// version, or holding events without a mark (written before layouts were versioned).
fn check_layout(keyspaces: &Keyspaces, data_dir: &Path) -> Result<(), StoreError> {
    let incompatible = |found: String| StoreError::IncompatibleLayout {
        path: data_dir.to_path_buf(),
        found,
    };
    match keyspaces.meta.get(STORE_LAYOUT_KEY)? {
        Some(bytes) => {
            let found = <[u8; 4]>::try_from(bytes.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("bad layout entry".to_owned()))?;
            if found == STORE_LAYOUT_VERSION {
                Ok(())
            } else {
                Err(incompatible(format!("layout {found}")))
            }
        }
        None if keyspaces.events.first_key_value().is_none() => {
            keyspaces
                .meta
                .insert(STORE_LAYOUT_KEY, STORE_LAYOUT_VERSION.to_be_bytes())?;
            keyspaces.database.persist(fjall::PersistMode::SyncAll)?;
            Ok(())
        }
        None => Err(incompatible("an unversioned layout".to_owned())),
    }
}

#[cfg(test)]
mod tests;
