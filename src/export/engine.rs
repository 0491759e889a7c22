//! The export engine: accepts jobs, persists them, feeds their work units to a pool of
//! crossbeam worker threads, finalises file names and the manifest, and watches for
//! stalled, cancelled and expired jobs. Jobs survive restarts: `start` resumes them from
//! their checkpoints.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::job::{
    ExportedFile, FileKind, JobRecord, JobState, UnitCheckpoint, final_file_name, staged_part_name,
};
use super::plan::{self, MEMBERS_PER_COLLECTION_CHECKPOINT, PlanError};
use super::request::ExportRequest;
use super::unit::{UnitContext, UnitError, run_unit};
use crate::fhir::outcome::{IssueKind, IssueSeverity, OperationOutcome};
use crate::fhir::{Instant, ResourceType};
use crate::sink::{ContainerName, ContainerStore, Destination, SinkError};
use crate::store::{Store, StoreError};

pub use super::settings::ExportSettings;

/// Errors a caller of the engine can act on.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{running} exports are queued or running (the limit is {limit}); retry later")]
    TooManyJobs { running: usize, limit: usize },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PlanError> for ExportError {
    fn from(error: PlanError) -> Self {
        match error {
            PlanError::Invalid(message) => ExportError::InvalidRequest(message),
            PlanError::NotFound(message) => ExportError::NotFound(message),
            PlanError::Store(error) => ExportError::Store(error),
        }
    }
}

/// What a status request sees.
#[derive(Debug, Clone)]
pub enum JobStatus {
    InProgress {
        progress: String,
    },
    Completed {
        record: Box<JobRecord>,
        expires: Instant,
    },
    Failed {
        status: u16,
        message: String,
    },
}

struct JobRuntime {
    record: Mutex<JobRecord>,
    files: ContainerStore,
    cancelled: AtomicBool,
    exported: AtomicU64,
    units_remaining: AtomicUsize,
    active_tasks: AtomicUsize,
    last_progress: Mutex<std::time::Instant>,
}

impl JobRuntime {
    fn record(&self) -> MutexGuard<'_, JobRecord> {
        self.record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn touch(&self) {
        *self
            .last_progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = std::time::Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .elapsed()
    }
}

enum Task {
    Collect(Arc<JobRuntime>),
    Unit(Arc<JobRuntime>, usize),
    Finalize(Arc<JobRuntime>),
    Cleanup(Arc<JobRuntime>),
    Stop,
}

struct EngineShared {
    store: Store,
    destination: Arc<dyn Destination>,
    settings: ExportSettings,
    runtime: tokio::runtime::Handle,
    jobs: Mutex<HashMap<String, Arc<JobRuntime>>>,
    /// Held for a whole kick-off, so the job limit cannot be overrun by simultaneous ones.
    submissions: Mutex<()>,
    /// Containers already checked (and created if allowed); later exports reuse them.
    opened_containers: Mutex<HashMap<ContainerName, ContainerStore>>,
    tasks: Sender<Task>,
    stopping: AtomicBool,
    /// Wakes the watchdog at shutdown instead of letting it finish its sleep.
    watchdog_wakeup: (Sender<()>, Receiver<()>),
}

/// The running engine; dropping it stops the workers (jobs resume on the next start).
pub struct ExportEngine {
    shared: Arc<EngineShared>,
    threads: Vec<JoinHandle<()>>,
}

impl ExportEngine {
    /// Starts the workers and the watchdog and resumes every unfinished persisted job.
    /// `runtime` drives the destination's async I/O.
    pub fn start(
        store: Store,
        destination: Arc<dyn Destination>,
        settings: ExportSettings,
        runtime: tokio::runtime::Handle,
    ) -> Result<ExportEngine, ExportError> {
        let (tasks, task_receiver) = crossbeam_channel::unbounded();
        let shared = Arc::new(EngineShared {
            store,
            destination,
            settings,
            runtime,
            jobs: Mutex::new(HashMap::new()),
            submissions: Mutex::new(()),
            opened_containers: Mutex::new(HashMap::new()),
            tasks,
            stopping: AtomicBool::new(false),
            watchdog_wakeup: crossbeam_channel::bounded(1),
        });
        let mut threads = Vec::new();
        for worker_index in 0..shared.settings.workers.max(1) {
            let worker_shared = Arc::clone(&shared);
            let receiver = task_receiver.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fhirlog-export-{worker_index}"))
                    .spawn(move || worker_loop(&worker_shared, &receiver))
                    .map_err(SinkError::Io)?,
            );
        }
        let watchdog_shared = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("fhirlog-export-watchdog".to_owned())
                .spawn(move || watchdog_loop(&watchdog_shared))
                .map_err(SinkError::Io)?,
        );
        let engine = ExportEngine { shared, threads };
        engine.resume_persisted_jobs()?;
        Ok(engine)
    }

    fn resume_persisted_jobs(&self) -> Result<(), ExportError> {
        for record in JobRecord::load_all(&self.shared.store)? {
            let files = match self.shared.open_container(&record.container) {
                Ok(files) => files,
                Err(error) => {
                    tracing::error!(job = %record.id, %error, "cannot reopen an export's container; failing it");
                    let mut failed = record;
                    failed.state = JobState::Failed {
                        failed_at: Instant::now(),
                        status: 500,
                        message: format!(
                            "after a restart the export's destination was unavailable: {error}"
                        ),
                    };
                    failed.save(&self.shared.store)?;
                    continue;
                }
            };
            let job_id = record.id.clone();
            let runtime = Arc::new(new_runtime(record, files));
            self.shared
                .lock_jobs()
                .insert(job_id.clone(), Arc::clone(&runtime));
            if !runtime.record().is_finished() {
                tracing::info!(job = %job_id, "resuming export after restart");
                self.shared.schedule_remaining(&runtime)?;
            }
        }
        Ok(())
    }

    /// Accepts a job: fixes its snapshot, resolves members, plans units and persists it.
    /// Blocking: call from a worker or blocking thread.
    pub fn submit(
        &self,
        request: ExportRequest,
        request_url: String,
    ) -> Result<String, ExportError> {
        let shared = &self.shared;
        let _one_kick_off_at_a_time = shared
            .submissions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let running = shared
            .lock_jobs()
            .values()
            .filter(|job| !job.record().is_finished())
            .count();
        if running >= shared.settings.max_jobs {
            return Err(ExportError::TooManyJobs {
                running,
                limit: shared.settings.max_jobs,
            });
        }
        let container = request
            .container
            .clone()
            .unwrap_or_else(|| shared.destination.default_container());
        let files = shared
            .open_container(&container)
            .map_err(|error| match error {
                SinkError::ContainerMissing { .. } => {
                    ExportError::InvalidRequest(error.to_string())
                }
                other => ExportError::Sink(other),
            })?;
        let now = Instant::now();
        let snapshot = plan::take_snapshot(&shared.store, &request, now)?;
        let members = plan::resolve_members(&shared.store, &request, snapshot.window.through_seq)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (units, state) = match &members {
            Some(_) => (Vec::new(), JobState::Collecting { next_member: 0 }),
            None => (
                plan::plan_event_units(&shared.store, &request, snapshot.window)?,
                JobState::Exporting,
            ),
        };
        let record = JobRecord {
            id: id.clone(),
            request,
            request_url,
            container,
            window: snapshot.window,
            transaction_time: snapshot.transaction_time,
            created_at: now,
            max_resources_per_file: shared.settings.max_resources_per_file.max(1),
            members: members.unwrap_or_default(),
            units,
            state,
            files: Vec::new(),
        };
        record.save(&shared.store)?;
        let runtime = Arc::new(new_runtime(record, files));
        shared.lock_jobs().insert(id.clone(), Arc::clone(&runtime));
        shared.schedule_remaining(&runtime)?;
        tracing::info!(job = %id, "export accepted");
        Ok(id)
    }

    pub fn status(&self, job_id: &str) -> Result<JobStatus, ExportError> {
        let job = self.shared.job(job_id)?;
        let record = job.record();
        Ok(match &record.state {
            JobState::Completed { completed_at } => JobStatus::Completed {
                expires: add_duration(*completed_at, self.shared.settings.retention),
                record: Box::new(record.clone()),
            },
            JobState::Failed {
                status, message, ..
            } => JobStatus::Failed {
                status: *status,
                message: message.clone(),
            },
            JobState::Collecting { next_member } => JobStatus::InProgress {
                progress: format!(
                    "collecting patients ({next_member}/{} done)",
                    record.members.len()
                ),
            },
            JobState::Exporting => {
                let total = record.units.len().max(1);
                let done = total - job.units_remaining.load(Ordering::Relaxed).min(total);
                let exported = job.exported.load(Ordering::Relaxed);
                JobStatus::InProgress {
                    progress: format!(
                        "{}% ({} resources; {done}/{total} work units)",
                        done * 100 / total,
                        group_thousands(exported)
                    ),
                }
            }
        })
    }

    /// Cancels a job or discards a finished one: it disappears at once (status 404) and
    /// its files are deleted once its workers have stopped.
    pub fn cancel(&self, job_id: &str) -> Result<(), ExportError> {
        let job = self
            .shared
            .lock_jobs()
            .remove(job_id)
            .ok_or_else(|| ExportError::NotFound(format!("no export job '{job_id}'")))?;
        job.cancelled.store(true, Ordering::SeqCst);
        JobRecord::delete(&self.shared.store, job_id)?;
        let _ = self.shared.tasks.send(Task::Cleanup(job));
        Ok(())
    }

    /// Where to read a finished job's file `file_name` from.
    pub fn file(
        &self,
        job_id: &str,
        file_name: &str,
    ) -> Result<(ContainerStore, String), ExportError> {
        let job = self.shared.job(job_id)?;
        let record = job.record();
        if !matches!(record.state, JobState::Completed { .. }) {
            return Err(ExportError::NotFound(format!(
                "export job '{job_id}' has not completed"
            )));
        }
        if !record.files.iter().any(|file| file.name == file_name) {
            return Err(ExportError::NotFound(format!(
                "export job '{job_id}' has no file '{file_name}'"
            )));
        }
        Ok((job.files.clone(), final_file_name(job_id, file_name)))
    }

    /// Blocks until the job is no longer in progress (for the CLI).
    pub fn wait(
        &self,
        job_id: &str,
        mut on_progress: impl FnMut(&str),
    ) -> Result<JobStatus, ExportError> {
        loop {
            match self.status(job_id)? {
                JobStatus::InProgress { progress } => on_progress(&progress),
                finished => return Ok(finished),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ExportEngine {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.shared.watchdog_wakeup.0.try_send(());
        for _ in 0..self.threads.len() {
            let _ = self.shared.tasks.send(Task::Stop);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn new_runtime(record: JobRecord, files: ContainerStore) -> JobRuntime {
    JobRuntime {
        record: Mutex::new(record),
        files,
        cancelled: AtomicBool::new(false),
        exported: AtomicU64::new(0),
        units_remaining: AtomicUsize::new(0),
        active_tasks: AtomicUsize::new(0),
        last_progress: Mutex::new(std::time::Instant::now()),
    }
}

fn add_duration(instant: Instant, duration: Duration) -> Instant {
    Instant::from_micros_since_epoch(
        instant
            .micros_since_epoch()
            .saturating_add(duration.as_micros() as i64),
    )
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

impl EngineShared {
    fn lock_jobs(&self) -> MutexGuard<'_, HashMap<String, Arc<JobRuntime>>> {
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn job(&self, job_id: &str) -> Result<Arc<JobRuntime>, ExportError> {
        self.lock_jobs()
            .get(job_id)
            .cloned()
            .ok_or_else(|| ExportError::NotFound(format!("no export job '{job_id}'")))
    }

    fn open_container(&self, container: &ContainerName) -> Result<ContainerStore, SinkError> {
        let cached = self
            .opened_containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(container)
            .cloned();
        if let Some(opened) = cached {
            return Ok(opened);
        }
        let opened = self.destination.open_container(container, &self.runtime)?;
        let store = ContainerStore::new(container.clone(), opened, self.runtime.clone());
        self.opened_containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(container.clone(), store.clone());
        Ok(store)
    }

    /// Queues what is left of a job, from its persisted state and checkpoints.
    fn schedule_remaining(&self, job: &Arc<JobRuntime>) -> Result<(), ExportError> {
        let (state, unit_count, job_id) = {
            let record = job.record();
            (record.state.clone(), record.units.len(), record.id.clone())
        };
        match state {
            JobState::Collecting { .. } => {
                let _ = self.tasks.send(Task::Collect(Arc::clone(job)));
            }
            JobState::Exporting => {
                let mut pending = Vec::new();
                for unit_index in 0..unit_count {
                    if !UnitCheckpoint::load(&self.store, &job_id, unit_index)?.done {
                        pending.push(unit_index);
                    }
                }
                job.units_remaining.store(pending.len(), Ordering::SeqCst);
                if pending.is_empty() {
                    let _ = self.tasks.send(Task::Finalize(Arc::clone(job)));
                }
                for unit_index in pending {
                    let _ = self.tasks.send(Task::Unit(Arc::clone(job), unit_index));
                }
            }
            JobState::Completed { .. } | JobState::Failed { .. } => {}
        }
        Ok(())
    }

    fn fail_job(&self, job: &JobRuntime, status: u16, message: String) {
        job.cancelled.store(true, Ordering::SeqCst);
        let mut record = job.record();
        if record.is_finished() {
            return;
        }
        tracing::error!(job = %record.id, %message, "export failed");
        record.state = JobState::Failed {
            failed_at: Instant::now(),
            status,
            message,
        };
        if let Err(error) = record.save(&self.store) {
            tracing::error!(job = %record.id, %error, "could not persist the failure of an export");
        }
    }

    fn run_task(&self, task: Task) -> bool {
        let (job, outcome) = match task {
            Task::Stop => return false,
            Task::Cleanup(job) => {
                self.cleanup_cancelled(&job);
                return true;
            }
            Task::Collect(job) => {
                let outcome = self.guarded(&job, |shared| shared.collect(&job));
                (job, outcome)
            }
            Task::Unit(job, unit_index) => {
                let outcome = self.guarded(&job, |shared| shared.run_unit_task(&job, unit_index));
                (job, outcome)
            }
            Task::Finalize(job) => {
                let outcome = self.guarded(&job, |shared| shared.finalize(&job));
                (job, outcome)
            }
        };
        match outcome {
            Ok(()) | Err(UnitError::Cancelled) => {}
            Err(error) => {
                self.fail_job(&job, 500, format!("export failed: {error}"));
                let _ = self.tasks.send(Task::Cleanup(job));
            }
        }
        true
    }

    /// Runs `work` unless the job is cancelled or stopping, counting it as active.
    fn guarded(
        &self,
        job: &JobRuntime,
        work: impl FnOnce(&Self) -> Result<(), UnitError>,
    ) -> Result<(), UnitError> {
        if job.cancelled.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst) {
            return Err(UnitError::Cancelled);
        }
        job.active_tasks.fetch_add(1, Ordering::SeqCst);
        job.touch();
        let outcome = work(self);
        job.active_tasks.fetch_sub(1, Ordering::SeqCst);
        outcome
    }

    fn collect(&self, job: &Arc<JobRuntime>) -> Result<(), UnitError> {
        let (request, window, members, job_id, mut next_member) = {
            let record = job.record();
            let JobState::Collecting { next_member } = record.state else {
                return Ok(());
            };
            (
                record.request.clone(),
                record.window,
                record.members.clone(),
                record.id.clone(),
                next_member,
            )
        };
        let covered: HashSet<ResourceType> = plan::covered_types(&request).into_iter().collect();
        while next_member < members.len() {
            if job.cancelled.load(Ordering::Relaxed) || self.stopping.load(Ordering::Relaxed) {
                return Err(UnitError::Cancelled);
            }
            let chunk_end = (next_member + MEMBERS_PER_COLLECTION_CHECKPOINT).min(members.len());
            let mut collected = Vec::new();
            for patient_id in &members[next_member..chunk_end] {
                if job.cancelled.load(Ordering::Relaxed) || self.stopping.load(Ordering::Relaxed) {
                    return Err(UnitError::Cancelled);
                }
                job.touch();
                plan::collect_member(
                    &self.store,
                    &request,
                    window,
                    patient_id,
                    &covered,
                    &mut collected,
                    &|| job.touch(),
                )?;
            }
            self.store.scratch_insert(&job_id, &collected)?;
            self.store.persist_durably()?;
            next_member = chunk_end;
            let mut record = job.record();
            record.state = JobState::Collecting { next_member };
            record.save(&self.store)?;
            drop(record);
            job.touch();
        }
        let units = plan::plan_collected_units(&self.store, &job_id, &request)?;
        {
            let mut record = job.record();
            record.units = units;
            record.state = JobState::Exporting;
            record.save(&self.store)?;
        }
        self.schedule_remaining(job).map_err(|error| match error {
            ExportError::Store(error) => UnitError::Store(error),
            ExportError::Sink(error) => UnitError::Sink(error),
            other => UnitError::Store(StoreError::Corrupt(other.to_string())),
        })
    }

    fn run_unit_task(&self, job: &Arc<JobRuntime>, unit_index: usize) -> Result<(), UnitError> {
        let record = job.record().clone();
        let touch = || job.touch();
        let context = UnitContext {
            store: &self.store,
            files: &job.files,
            job: &record,
            unit_index,
            cancelled: &job.cancelled,
            stopping: &self.stopping,
            exported: &job.exported,
            touch_progress: &touch,
        };
        self.retrying_transient_storage_failures(job, || run_unit(&context))?;
        if job.units_remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = self.tasks.send(Task::Finalize(Arc::clone(job)));
        }
        Ok(())
    }

    /// Runs `attempt` again while it fails with transient storage errors, until
    /// `destination_timeout` has passed since the first failure. Every attempt resumes
    /// from the last checkpoint, so a retried unit writes exactly what one run would.
    fn retrying_transient_storage_failures(
        &self,
        job: &JobRuntime,
        mut attempt: impl FnMut() -> Result<(), UnitError>,
    ) -> Result<(), UnitError> {
        let mut first_failure: Option<std::time::Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            match attempt() {
                Err(UnitError::Sink(error))
                    if error.is_transient()
                        && first_failure
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            < self.settings.destination_timeout =>
                {
                    tracing::warn!(%error, "transient storage failure; retrying from the last checkpoint");
                    if job.cancelled.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst)
                    {
                        return Err(UnitError::Cancelled);
                    }
                    job.touch();
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                outcome => return outcome,
            }
        }
    }

    /// Names the parts `{Type}-{n}.ndjson` in unit order, writes the error file, and
    /// completes the job. Safe to repeat after a crash.
    fn finalize(&self, job: &Arc<JobRuntime>) -> Result<(), UnitError> {
        self.retrying_transient_storage_failures(job, || self.finalize_once(job))
    }

    fn finalize_once(&self, job: &Arc<JobRuntime>) -> Result<(), UnitError> {
        let record = job.record().clone();
        if record.is_finished() {
            return Ok(());
        }
        let mut files = Vec::new();
        let mut renames = Vec::new();
        let mut next_output_number: HashMap<ResourceType, usize> = HashMap::new();
        let mut next_deleted_number = 0usize;
        for (unit_index, unit) in record.units.iter().enumerate() {
            let checkpoint = UnitCheckpoint::load(&self.store, &record.id, unit_index)?;
            for (part_index, count) in checkpoint.output.part_counts.iter().enumerate() {
                let number = next_output_number.entry(unit.resource_type).or_insert(0);
                *number += 1;
                let name = format!("{}-{number}.ndjson", unit.resource_type);
                renames.push((
                    staged_part_name(&record.id, FileKind::Output, unit_index, part_index + 1),
                    name.clone(),
                ));
                files.push(ExportedFile {
                    kind: FileKind::Output,
                    type_name: unit.resource_type.to_string(),
                    name,
                    count: *count,
                });
            }
            for (part_index, count) in checkpoint.deleted.part_counts.iter().enumerate() {
                next_deleted_number += 1;
                let name = format!("deleted-{next_deleted_number}.ndjson");
                renames.push((
                    staged_part_name(&record.id, FileKind::Deleted, unit_index, part_index + 1),
                    name.clone(),
                ));
                files.push(ExportedFile {
                    kind: FileKind::Deleted,
                    type_name: "Bundle".to_owned(),
                    name,
                    count: *count,
                });
            }
        }
        for (staged, final_name) in renames {
            let final_path = final_file_name(&record.id, &final_name);
            if job.files.exists_blocking(&staged)? || !job.files.exists_blocking(&final_path)? {
                job.files.rename_blocking(&staged, &final_path)?;
            }
        }
        if !record.request.ignored_under_lenient.is_empty() {
            let lines: Vec<String> = record
                .request
                .ignored_under_lenient
                .iter()
                .map(|problem| {
                    OperationOutcome::single(
                        IssueSeverity::Warning,
                        IssueKind::NotSupported,
                        format!("ignored: {problem}"),
                    )
                    .to_json()
                    .to_string()
                })
                .collect();
            let name = "error-1.ndjson".to_owned();
            job.files.put_blocking(
                &final_file_name(&record.id, &name),
                Bytes::from(lines.join("\n") + "\n"),
            )?;
            files.push(ExportedFile {
                kind: FileKind::Error,
                type_name: "OperationOutcome".to_owned(),
                name,
                count: lines.len() as u64,
            });
        }
        {
            let mut current = job.record();
            current.files = files;
            current.state = JobState::Completed {
                completed_at: Instant::now(),
            };
            current.save(&self.store)?;
        }
        self.store
            .job_delete_prefix(&format!("unit/{}/", record.id))?;
        self.store.scratch_clear(&record.id)?;
        job.touch();
        tracing::info!(job = %record.id, exported = job.exported.load(Ordering::Relaxed), "export completed");
        Ok(())
    }

    /// Waits for a cancelled or failed job's tasks to stop, then removes its files,
    /// scratch set and (for cancelled jobs) records.
    fn cleanup_cancelled(&self, job: &JobRuntime) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while job.active_tasks.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let job_id = job.record().id.clone();
        if let Err(error) = job.files.delete_prefix_blocking(&job_id) {
            tracing::warn!(job = %job_id, %error, "could not delete an export's files");
        }
        if let Err(error) = self.store.scratch_clear(&job_id) {
            tracing::warn!(job = %job_id, %error, "could not clear an export's scratch set");
        }
        let still_listed = self.lock_jobs().contains_key(&job_id);
        let cleanup = if still_listed {
            self.store.job_delete_prefix(&format!("unit/{job_id}/"))
        } else {
            JobRecord::delete(&self.store, &job_id)
        };
        if let Err(error) = cleanup {
            tracing::warn!(job = %job_id, %error, "could not delete an export's records");
        }
    }

    /// Fails jobs that stopped making progress and expires finished ones.
    fn watch(&self) {
        let now = Instant::now();
        let jobs: Vec<(String, Arc<JobRuntime>)> = self
            .lock_jobs()
            .iter()
            .map(|(id, job)| (id.clone(), Arc::clone(job)))
            .collect();
        for (job_id, job) in jobs {
            let finished_at = match job.record().state {
                JobState::Completed { completed_at } => Some(completed_at),
                JobState::Failed { failed_at, .. } => Some(failed_at),
                _ => None,
            };
            match finished_at {
                Some(finished_at) => {
                    if add_duration(finished_at, self.settings.retention) <= now {
                        tracing::info!(job = %job_id, "export expired; removing its files");
                        self.lock_jobs().remove(&job_id);
                        let _ = self.tasks.send(Task::Cleanup(job));
                    }
                }
                None => {
                    let waiting_for_a_worker = job.active_tasks.load(Ordering::SeqCst) == 0;
                    let idle = job.idle_for();
                    if !waiting_for_a_worker && idle > self.settings.job_timeout {
                        self.fail_job(
                            &job,
                            500,
                            format!(
                                "export made no progress for {:.1}s (the limit is {:.1}s) and was stopped",
                                idle.as_secs_f64(),
                                self.settings.job_timeout.as_secs_f64()
                            ),
                        );
                        let _ = self.tasks.send(Task::Cleanup(job));
                    }
                }
            }
        }
    }
}

fn worker_loop(shared: &EngineShared, tasks: &Receiver<Task>) {
    while let Ok(task) = tasks.recv() {
        if !shared.run_task(task) {
            return;
        }
    }
}

fn watchdog_loop(shared: &EngineShared) {
    while !shared.stopping.load(Ordering::SeqCst) {
        shared.watch();
        let _ = shared
            .watchdog_wakeup
            .1
            .recv_timeout(Duration::from_millis(200));
    }
}
