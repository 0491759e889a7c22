//! The jobs the engine knows and the control of each: one `should_stop()`, one `touch()`,
//! progress counters, and the one lock under which a job's end (completed, failed or
//! cancelled) is decided.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use super::error::{ExportError, ExportErrorKind};
use super::job::{ExportedFile, JobRecord, JobState, UnitCheckpoint};
use super::referenced::ResolvedReferences;
use crate::fhir::Instant;
use crate::sink::ContainerStore;
use crate::store::Store;

/// How often a job whose state the store refuses to save (its disk full, or a failed
/// write being repaired) tries again.
const STORE_FULL_RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Locks `mutex`, carrying on with the data if a thread panicked while holding it: every
/// value guarded here is left consistent between statements.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How far a running job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobProgress {
    Collecting {
        members_done: usize,
        members_total: usize,
    },
    /// Collecting referenced resources: walking the `type_index`-th compartment type.
    CollectingReferenced { types_done: usize },
    /// Collecting the Provenance whose targets are exported.
    CollectingProvenance,
    Exporting {
        units_done: usize,
        units_total: usize,
        resources_exported: u64,
        /// The units export the compartments and collect what they reference
        /// (`_referenced`); more units follow.
        collecting_referenced: bool,
    },
}

impl fmt::Display for JobProgress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            JobProgress::Collecting {
                members_done,
                members_total,
            } => write!(
                formatter,
                "collecting patients ({members_done}/{members_total} done)"
            ),
            JobProgress::CollectingReferenced { types_done } => write!(
                formatter,
                "collecting referenced resources ({types_done} compartment types done)"
            ),
            JobProgress::CollectingProvenance => write!(formatter, "collecting provenance"),
            JobProgress::Exporting {
                units_done,
                units_total,
                resources_exported,
                collecting_referenced,
            } => {
                let total = units_total.max(1);
                if collecting_referenced {
                    write!(
                        formatter,
                        "exporting compartments and collecting referenced resources: "
                    )?;
                }
                write!(
                    formatter,
                    "{}% ({} resources; {units_done}/{units_total} work units)",
                    units_done.min(total) * 100 / total,
                    group_thousands(resources_exported)
                )
            }
        }
    }
}

fn group_thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// One job: its persisted record, its container once opened, and its control.
pub struct JobHandle {
    id: String,
    /// The client that started the job; `None` without access control.
    owner: Option<String>,
    record: Mutex<JobRecord>,
    /// Held while the record is written or deleted: decisions about the job's end.
    persistence: Mutex<()>,
    container: OnceLock<ContainerStore>,
    /// Set once the job is cancelled or has failed: its tasks stop at the next check.
    halted: AtomicBool,
    engine_stopping: Arc<AtomicBool>,
    started: std::time::Instant,
    last_progress_millis: AtomicU64,
    active_tasks: AtomicUsize,
    resources_exported: AtomicU64,
    units_total: AtomicUsize,
    units_remaining: AtomicUsize,
    /// The final checkpoints of finished units, for the finalizer.
    finished_units: Mutex<BTreeMap<usize, UnitCheckpoint>>,
    /// The `_referenced` targets this run has already added, shared by the job's workers.
    resolved_references: ResolvedReferences,
}

impl JobHandle {
    pub fn new(record: JobRecord, engine_stopping: Arc<AtomicBool>) -> JobHandle {
        JobHandle {
            id: record.id.clone(),
            owner: None,
            record: Mutex::new(record),
            persistence: Mutex::new(()),
            container: OnceLock::new(),
            halted: AtomicBool::new(false),
            engine_stopping,
            started: std::time::Instant::now(),
            last_progress_millis: AtomicU64::new(0),
            active_tasks: AtomicUsize::new(0),
            resources_exported: AtomicU64::new(0),
            units_total: AtomicUsize::new(0),
            units_remaining: AtomicUsize::new(0),
            finished_units: Mutex::new(BTreeMap::new()),
            resolved_references: ResolvedReferences::default(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn with_owner(mut self, owner: Option<String>) -> JobHandle {
        self.owner = owner;
        self
    }

    pub fn resolved_references(&self) -> &ResolvedReferences {
        &self.resolved_references
    }

    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The record as last persisted; hold the guard briefly and do no I/O under it.
    pub fn record(&self) -> MutexGuard<'_, JobRecord> {
        lock(&self.record)
    }

    /// Whether work on this job must stop now: it was cancelled or failed, or the engine
    /// is shutting down (the job then resumes at the next start).
    pub fn should_stop(&self) -> bool {
        self.halted.load(Ordering::SeqCst) || self.engine_stopping.load(Ordering::SeqCst)
    }

    /// Records that the job made progress (the watchdog fails jobs that stop doing so).
    pub fn touch(&self) {
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.last_progress_millis.store(elapsed, Ordering::SeqCst);
    }

    pub fn idle_for(&self) -> std::time::Duration {
        let last = self.last_progress_millis.load(Ordering::SeqCst);
        let now = self.started.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(last))
    }

    /// The container, once a worker or the kick-off opened it.
    pub fn container(&self) -> Option<&ContainerStore> {
        self.container.get()
    }

    pub fn set_container(&self, container: ContainerStore) -> &ContainerStore {
        self.container.get_or_init(|| container)
    }

    /// Runs `work` as an active task of the job unless it must stop.
    pub fn run_task<T>(
        &self,
        work: impl FnOnce() -> Result<T, ExportError>,
    ) -> Result<T, ExportError> {
        if self.should_stop() {
            return Err(ExportError::cancelled());
        }
        self.active_tasks.fetch_add(1, Ordering::SeqCst);
        self.touch();
        let outcome = work();
        self.active_tasks.fetch_sub(1, Ordering::SeqCst);
        outcome
    }

    pub fn has_active_tasks(&self) -> bool {
        self.active_tasks.load(Ordering::SeqCst) > 0
    }

    pub fn count_exported(&self, resources: u64) {
        self.resources_exported
            .fetch_add(resources, Ordering::Relaxed);
    }

    pub fn resources_exported(&self) -> u64 {
        self.resources_exported.load(Ordering::Relaxed)
    }

    /// Starts counting `remaining` of `total` units as still to run.
    pub fn expect_units(&self, total: usize, remaining: usize) {
        self.units_total.store(total, Ordering::SeqCst);
        self.units_remaining.store(remaining, Ordering::SeqCst);
    }

    /// Keeps the checkpoint of a unit found done when the job was scheduled.
    pub fn unit_was_done(&self, unit_index: usize, checkpoint: UnitCheckpoint) {
        lock(&self.finished_units).insert(unit_index, checkpoint);
    }

    /// Counts a unit as done with its final checkpoint; true when it was the last.
    pub fn unit_done(&self, unit_index: usize, checkpoint: UnitCheckpoint) -> bool {
        lock(&self.finished_units).insert(unit_index, checkpoint);
        self.units_remaining.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// The final checkpoint of a finished unit, if this run knows it.
    pub fn finished_unit(&self, unit_index: usize) -> Option<UnitCheckpoint> {
        lock(&self.finished_units).get(&unit_index).cloned()
    }

    pub fn progress(&self) -> JobProgress {
        let record = self.record();
        match record.state {
            JobState::Collecting { next_member } => JobProgress::Collecting {
                members_done: next_member,
                members_total: record.member_count,
            },
            JobState::CollectingReferenced { cursor }
            | JobState::CollectingDeferredReferenced { cursor } => {
                JobProgress::CollectingReferenced {
                    types_done: cursor.type_index,
                }
            }
            JobState::CollectingProvenance { .. } => JobProgress::CollectingProvenance,
            _ => {
                let units_total = self.units_total.load(Ordering::SeqCst);
                let remaining = self.units_remaining.load(Ordering::SeqCst);
                JobProgress::Exporting {
                    units_done: units_total.saturating_sub(remaining),
                    units_total,
                    resources_exported: self.resources_exported(),
                    collecting_referenced: record.state == JobState::ExportingCompartments,
                }
            }
        }
    }

    /// Saves `change` applied to the record, unless the job was cancelled or failed
    /// meanwhile. Decisions are serialised by the persistence lock, so a job that was
    /// cancelled is never written back; status readers never wait on the disk. While the
    /// store's disk is full the job waits for room (without the lock, so it can still be
    /// cancelled; `--job-timeout` bounds the wait, as the job makes no progress).
    pub fn persist(
        &self,
        store: &Store,
        change: impl FnOnce(&mut JobRecord),
    ) -> Result<(), ExportError> {
        let mut change = Some(change);
        let mut changed: Option<JobRecord> = None;
        loop {
            let persisting = lock(&self.persistence);
            if self.halted.load(Ordering::SeqCst) {
                return Err(ExportError::cancelled());
            }
            let changed = changed.get_or_insert_with(|| {
                let mut changed = self.record().clone();
                if let Some(change) = change.take() {
                    change(&mut changed);
                }
                changed
            });
            match changed.save(store) {
                Ok(()) => {
                    *self.record() = changed.clone();
                    return Ok(());
                }
                Err(error) if error.is_passing_refusal() => {
                    drop(persisting);
                    tracing::warn!(job = %self.id, %error, "the job waits to save its state");
                    std::thread::sleep(STORE_FULL_RETRY_INTERVAL);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Completes the job with `files`; the Completed state is durable when this returns.
    pub fn complete(&self, store: &Store, files: Vec<ExportedFile>) -> Result<(), ExportError> {
        self.persist(store, |record| {
            record.files = files;
            record.state = JobState::Completed {
                completed_at: Instant::now(),
            };
        })
    }

    /// Fails the job with `error` unless it already ended; its tasks stop. True when this
    /// call decided the failure.
    pub fn fail(&self, store: &Store, error: &ExportError) -> bool {
        let _persisting = lock(&self.persistence);
        if self.halted.swap(true, Ordering::SeqCst) || self.record().is_finished() {
            return false;
        }
        tracing::error!(job = %self.id, kind = ?error.kind(), error = %error.detail(), "export failed");
        let mut failed = self.record().clone();
        failed.state = JobState::Failed {
            failed_at: Instant::now(),
            kind: error.kind(),
            message: error.message().to_owned(),
        };
        if let Err(save_error) = failed.save(store) {
            tracing::error!(job = %self.id, error = %save_error, "could not persist the failure of an export");
        }
        *self.record() = failed;
        true
    }

    /// Stops the job for good and deletes its record durably: a later completion or
    /// failure is refused, so a cancelled job never comes back after a restart.
    pub fn cancel(&self, store: &Store) -> Result<(), ExportError> {
        let _persisting = lock(&self.persistence);
        self.halted.store(true, Ordering::SeqCst);
        JobRecord::delete(store, &self.id)?;
        Ok(())
    }
}

/// The share of the server one client may use.
#[derive(Debug, Clone, Copy)]
pub struct OwnerLimits<'a> {
    pub owner: &'a str,
    pub max_unfinished: usize,
    pub max_retained: usize,
}

/// Every job the engine knows, by id.
#[derive(Default)]
pub struct JobRegistry {
    jobs: Mutex<HashMap<String, Arc<JobHandle>>>,
}

impl JobRegistry {
    pub fn get(&self, job_id: &str) -> Result<Arc<JobHandle>, ExportError> {
        lock(&self.jobs)
            .get(job_id)
            .cloned()
            .ok_or_else(|| ExportError::not_found(format!("no export job '{job_id}'")))
    }

    /// Adds a resumed job, whatever the limit.
    pub fn insert(&self, job: Arc<JobHandle>) {
        lock(&self.jobs).insert(job.id().to_owned(), job);
    }

    /// Adds a new job unless `max_unfinished` jobs, or the owner's limit of them, are
    /// already queued or running.
    pub fn insert_within_limit(
        &self,
        job: Arc<JobHandle>,
        max_unfinished: usize,
        owner_limits: Option<OwnerLimits<'_>>,
    ) -> Result<(), ExportError> {
        let mut jobs = lock(&self.jobs);
        let unfinished: Vec<&Arc<JobHandle>> = jobs
            .values()
            .filter(|existing| !existing.record().is_finished())
            .collect();
        if unfinished.len() >= max_unfinished {
            return Err(too_many_jobs(unfinished.len(), max_unfinished));
        }
        if let Some(limits) = owner_limits {
            let owned = unfinished
                .iter()
                .filter(|existing| existing.owner() == Some(limits.owner))
                .count();
            if owned >= limits.max_unfinished {
                return Err(too_many_owned_jobs(owned, limits.max_unfinished));
            }
        }
        jobs.insert(job.id().to_owned(), job);
        Ok(())
    }

    /// Refuses a new job early when the running limit (checked again at insertion) or a
    /// quota on kept exports is reached.
    pub fn check_room(
        &self,
        max_unfinished: usize,
        max_retained: usize,
        max_retained_bytes: Option<u64>,
        owner_limits: Option<OwnerLimits<'_>>,
    ) -> Result<(), ExportError> {
        let (mut unfinished, mut retained, mut retained_bytes) = (0usize, 0usize, 0u64);
        let (mut owned_unfinished, mut owned_retained) = (0usize, 0usize);
        for existing in lock(&self.jobs).values() {
            let owned = owner_limits.is_some_and(|limits| existing.owner() == Some(limits.owner));
            let record = existing.record();
            match record.state {
                JobState::Completed { .. } => {
                    retained += 1;
                    owned_retained += usize::from(owned);
                    retained_bytes += record.files.iter().map(|file| file.bytes).sum::<u64>();
                }
                JobState::Failed { .. } => {}
                _ => {
                    unfinished += 1;
                    owned_unfinished += usize::from(owned);
                }
            }
        }
        if unfinished >= max_unfinished {
            return Err(too_many_jobs(unfinished, max_unfinished));
        }
        if let Some(limits) = owner_limits {
            if owned_unfinished >= limits.max_unfinished {
                return Err(too_many_owned_jobs(owned_unfinished, limits.max_unfinished));
            }
            if owned_retained >= limits.max_retained {
                return Err(ExportError::new(
                    ExportErrorKind::TooManyJobs,
                    format!(
                        "{owned_retained} completed exports of this client are kept (the limit is {}); delete one with DELETE on its status URL or retry after one expires",
                        limits.max_retained
                    ),
                ));
            }
        }
        if retained >= max_retained {
            return Err(ExportError::new(
                ExportErrorKind::TooManyJobs,
                format!(
                    "{retained} completed exports are kept (the limit is {max_retained}); delete one with DELETE on its status URL or retry after one expires"
                ),
            ));
        }
        if let Some(limit) = max_retained_bytes
            && retained_bytes >= limit
        {
            return Err(ExportError::new(
                ExportErrorKind::InsufficientStorage,
                format!(
                    "completed exports kept use {retained_bytes} bytes (the limit is {limit}); delete one with DELETE on its status URL or retry after one expires"
                ),
            ));
        }
        Ok(())
    }

    pub fn remove(&self, job_id: &str) -> Option<Arc<JobHandle>> {
        lock(&self.jobs).remove(job_id)
    }

    pub fn contains(&self, job_id: &str) -> bool {
        lock(&self.jobs).contains_key(job_id)
    }

    pub fn all(&self) -> Vec<Arc<JobHandle>> {
        lock(&self.jobs).values().cloned().collect()
    }
}

fn too_many_owned_jobs(unfinished: usize, limit: usize) -> ExportError {
    ExportError::new(
        ExportErrorKind::TooManyJobs,
        format!(
            "{unfinished} exports of this client are queued or running (the limit is {limit}); retry later"
        ),
    )
}

fn too_many_jobs(unfinished: usize, limit: usize) -> ExportError {
    ExportError::new(
        ExportErrorKind::TooManyJobs,
        format!("{unfinished} exports are queued or running (the limit is {limit}); retry later"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::job::JobRecord;
    use crate::export::request::{ExportLevel, ExportRequest};
    use crate::sink::ContainerName;
    use crate::store::{SeqWindow, StoreError, StoreOptions};

    fn exporting_job(store: &Store) -> JobHandle {
        exporting_job_with_id(store, "0123456789abcdef0123456789abcdef")
    }

    fn exporting_job_with_id(store: &Store, id: &str) -> JobHandle {
        let record = JobRecord {
            id: id.to_owned(),
            request: ExportRequest::everything_at(ExportLevel::System),
            request_url: "http://test/fhir/$export".to_owned(),
            container: ContainerName::default_container(),
            window: SeqWindow {
                after_seq: 0,
                through_seq: 0,
            },
            transaction_time: Instant::now(),
            created_at: Instant::now(),
            max_resources_per_file: 10,
            member_count: 0,
            units: Vec::new(),
            state: JobState::Exporting,
            files: Vec::new(),
        };
        record.save(store).unwrap();
        JobHandle::new(record, Arc::new(AtomicBool::new(false)))
    }

    fn persisted_states(store: &Store) -> Vec<JobState> {
        JobRecord::load_all(store)
            .unwrap()
            .into_iter()
            .map(|record| record.state)
            .collect()
    }

    #[test]
    fn a_cancelled_job_is_never_completed_or_written_back() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
        let job = exporting_job(&store);
        job.cancel(&store).unwrap();
        assert!(job.should_stop());
        let completion = job.complete(&store, Vec::new()).unwrap_err();
        assert_eq!(completion.kind(), ExportErrorKind::Cancelled);
        let failure = ExportError::new(ExportErrorKind::Store, "late failure");
        assert!(!job.fail(&store, &failure));
        assert_eq!(persisted_states(&store), Vec::new());
    }

    #[test]
    fn the_first_end_decided_is_the_one_kept() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
        let failed = exporting_job(&store);
        let failure = ExportError::new(ExportErrorKind::TimedOut, "stalled");
        assert!(failed.fail(&store, &failure));
        assert!(failed.complete(&store, Vec::new()).is_err());
        assert!(matches!(
            persisted_states(&store).as_slice(),
            [JobState::Failed {
                kind: ExportErrorKind::TimedOut,
                ..
            }]
        ));

        let completed = exporting_job(&store);
        completed.complete(&store, Vec::new()).unwrap();
        assert!(!completed.fail(&store, &failure));
        assert!(matches!(
            persisted_states(&store).as_slice(),
            [JobState::Completed { .. }]
        ));
    }

    #[test]
    fn a_job_whose_state_the_full_store_refuses_saves_it_once_the_store_takes_writes() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
        let job = exporting_job(&store);
        store.fail_a_write_for_test(std::io::Error::from_raw_os_error(28));
        assert!(matches!(
            store.job_put("unrelated", b""),
            Err(StoreError::OutOfSpace)
        ));
        job.complete(&store, Vec::new()).unwrap();
        assert!(matches!(
            persisted_states(&store).as_slice(),
            [JobState::Completed { .. }]
        ));
    }

    #[test]
    fn a_client_at_its_running_limit_is_refused_while_others_are_not() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
        let registry = JobRegistry::default();
        let limits_of = |owner| OwnerLimits {
            owner,
            max_unfinished: 2,
            max_retained: 10,
        };
        for index in 0..2 {
            let job = exporting_job_with_id(&store, &format!("{index:032x}"))
                .with_owner(Some("busy".to_owned()));
            registry
                .insert_within_limit(Arc::new(job), 16, Some(limits_of("busy")))
                .unwrap();
        }
        let refused = registry
            .check_room(16, 100, None, Some(limits_of("busy")))
            .unwrap_err();
        assert_eq!(refused.kind(), ExportErrorKind::TooManyJobs);
        assert!(refused.message().contains("this client"), "{refused:?}");
        let third = exporting_job_with_id(&store, &format!("{:032x}", 2))
            .with_owner(Some("busy".to_owned()));
        let refused = registry
            .insert_within_limit(Arc::new(third), 16, Some(limits_of("busy")))
            .unwrap_err();
        assert_eq!(refused.kind(), ExportErrorKind::TooManyJobs);
        registry
            .check_room(16, 100, None, Some(limits_of("idle")))
            .unwrap();
        registry.check_room(16, 100, None, None).unwrap();
        let other = exporting_job_with_id(&store, &format!("{:032x}", 3))
            .with_owner(Some("idle".to_owned()));
        registry
            .insert_within_limit(Arc::new(other), 16, Some(limits_of("idle")))
            .unwrap();
    }

    #[test]
    fn progress_reads_like_the_status_header() {
        let progress = JobProgress::Exporting {
            units_done: 3,
            units_total: 10,
            resources_exported: 1_917_000,
            collecting_referenced: false,
        };
        assert_eq!(
            progress.to_string(),
            "30% (1,917,000 resources; 3/10 work units)"
        );
        let first_pass = JobProgress::Exporting {
            units_done: 3,
            units_total: 10,
            resources_exported: 1_917_000,
            collecting_referenced: true,
        };
        assert_eq!(
            first_pass.to_string(),
            "exporting compartments and collecting referenced resources: 30% (1,917,000 resources; 3/10 work units)"
        );
    }
}
