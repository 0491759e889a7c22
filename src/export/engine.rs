//! The export engine: wires the stages together — job registry, scheduler, planner,
//! workers, finalizer and watchdog — and answers kick-offs, status polls, cancels and
//! file look-ups. Jobs survive restarts: `start` resumes them from their checkpoints
//! without waiting on their destinations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::error::{ExportError, ExportErrorKind};
use super::files;
use super::finalizer::{self, RecordAfterCleanup};
use super::job::{JobRecord, JobState, load_owner, save_members, save_owner};
use super::planner;
use super::registry::{JobHandle, JobProgress, JobRegistry, OwnerLimits, lock};
use super::request::ExportRequest;
use super::scheduler::{
    SCHEDULER_CHANNEL_CAPACITY, SchedulerMessage, WORK_CHANNEL_CAPACITY_PER_WORKER, WorkItem,
    run_scheduler,
};
use super::settings::ExportSettings;
use super::watchdog::{self, add_duration};
use super::worker::{retrying_transient_failures, run_unit};
use crate::fhir::Instant;
use crate::sink::{ContainerName, ContainerStore, Destination};
use crate::store::Store;

/// How often the watchdog looks at the jobs.
const WATCHDOG_INTERVAL: Duration = Duration::from_millis(200);

/// What a status request sees.
#[derive(Debug, Clone)]
pub enum JobStatus {
    InProgress {
        progress: JobProgress,
    },
    Completed {
        record: Box<JobRecord>,
        expires: Instant,
    },
    Failed {
        kind: ExportErrorKind,
        message: String,
    },
}

struct EngineShared {
    store: Store,
    destination: Arc<dyn Destination>,
    settings: ExportSettings,
    runtime: tokio::runtime::Handle,
    registry: JobRegistry,
    /// Containers already checked (and created if allowed); later exports reuse them.
    containers: Mutex<HashMap<ContainerName, ContainerStore>>,
    scheduler: Sender<SchedulerMessage>,
    stopping: Arc<AtomicBool>,
    /// Wakes the watchdog at shutdown instead of letting it finish its sleep.
    watchdog_wakeup: (Sender<()>, Receiver<()>),
}

/// The running engine; dropping it stops the workers (jobs resume on the next start).
pub struct ExportEngine {
    shared: Arc<EngineShared>,
    threads: Vec<ThreadHandle<()>>,
}

impl ExportEngine {
    /// Starts the scheduler, the workers and the watchdog, and queues every unfinished
    /// persisted job; jobs' containers are attached without contacting their destination,
    /// so a destination that is down does not hold up the start. `runtime` drives the
    /// destination's async I/O.
    pub fn start(
        store: Store,
        destination: Arc<dyn Destination>,
        settings: ExportSettings,
        runtime: tokio::runtime::Handle,
    ) -> Result<ExportEngine, ExportError> {
        let workers = settings.workers.max(1);
        let (scheduler, scheduler_messages) =
            crossbeam_channel::bounded(SCHEDULER_CHANNEL_CAPACITY);
        let (work, work_items) =
            crossbeam_channel::bounded(workers * WORK_CHANNEL_CAPACITY_PER_WORKER);
        let shared = Arc::new(EngineShared {
            store,
            destination,
            settings,
            runtime,
            registry: JobRegistry::default(),
            containers: Mutex::new(HashMap::new()),
            scheduler,
            stopping: Arc::new(AtomicBool::new(false)),
            watchdog_wakeup: crossbeam_channel::bounded(1),
        });
        let mut engine = ExportEngine {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        let scheduler_store = shared.store.clone();
        let scheduler_local_base = shared.settings.local_base.clone();
        engine.spawn("fhirlog-export-scheduler".to_owned(), move || {
            run_scheduler(
                &scheduler_store,
                &scheduler_local_base,
                &scheduler_messages,
                work,
            );
        })?;
        for worker_index in 0..workers {
            let worker_shared = Arc::clone(&shared);
            let items = work_items.clone();
            engine.spawn(format!("fhirlog-export-{worker_index}"), move || {
                while let Ok(item) = items.recv() {
                    worker_shared.work(item);
                }
            })?;
        }
        let watchdog_shared = Arc::clone(&shared);
        engine.spawn("fhirlog-export-watchdog".to_owned(), move || {
            watchdog_shared.watch_until_stopped();
        })?;
        for record in JobRecord::load_all(&shared.store)? {
            let owner = load_owner(&shared.store, &record.id)?;
            let job =
                Arc::new(JobHandle::new(record, Arc::clone(&shared.stopping)).with_owner(owner));
            shared.attach_container(&job);
            shared.registry.insert(Arc::clone(&job));
            if !job.record().is_finished() {
                tracing::info!(job = %job.id(), "resuming export after restart");
            }
            shared.send(SchedulerMessage::Schedule(job));
        }
        Ok(engine)
    }

    fn spawn(
        &mut self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), ExportError> {
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(body)
            .map_err(|error| {
                ExportError::new(
                    ExportErrorKind::Store,
                    format!("could not start the export thread {name}: {error}"),
                )
            })?;
        self.threads.push(thread);
        Ok(())
    }

    /// Accepts a job: opens its container (the destination bounds how long that may
    /// take), fixes its snapshot, resolves members, plans units and persists the job.
    /// No lock is held while the destination or the store is busy. Blocking: call from a
    /// worker or blocking thread.
    pub fn submit(
        &self,
        request: ExportRequest,
        request_url: String,
    ) -> Result<String, ExportError> {
        self.submit_for(request, request_url, None)
    }

    /// [`ExportEngine::submit`] on behalf of `owner`, who alone sees the job afterwards
    /// and whose share of the server (`max_*_per_client`) it counts against.
    pub fn submit_for(
        &self,
        request: ExportRequest,
        request_url: String,
        owner: Option<String>,
    ) -> Result<String, ExportError> {
        let shared = &self.shared;
        let owner_limits = owner.as_deref().map(|owner| OwnerLimits {
            owner,
            max_unfinished: shared.settings.max_jobs_per_client,
            max_retained: shared.settings.max_retained_exports_per_client,
        });
        shared.registry.check_room(
            shared.settings.max_jobs,
            shared.settings.max_retained_exports,
            shared.settings.max_export_bytes,
            owner_limits,
        )?;
        let container_name = request
            .container
            .clone()
            .unwrap_or_else(|| shared.destination.default_container());
        let container = shared.open_container(&container_name)?;
        let request = request.with_default_associated_data(shared.settings.include_referenced);
        let now = Instant::now();
        let plan =
            planner::plan_new_job(&shared.store, &request, now, &shared.settings.local_base)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let record = JobRecord {
            id: id.clone(),
            request,
            request_url,
            container: container_name,
            window: plan.snapshot.window,
            transaction_time: plan.snapshot.transaction_time,
            created_at: now,
            max_resources_per_file: shared.settings.max_resources_per_file.max(1),
            member_count: plan.members.as_ref().map_or(0, Vec::len),
            units: plan.units,
            state: plan.state,
            files: Vec::new(),
        };
        if let Some(members) = &plan.members {
            save_members(&shared.store, &id, members)?;
        }
        if let Some(owner) = &owner {
            save_owner(&shared.store, &id, owner)?;
        }
        record.save(&shared.store)?;
        let job = Arc::new(
            JobHandle::new(record, Arc::clone(&shared.stopping)).with_owner(owner.clone()),
        );
        job.set_container(container);
        if let Err(error) = shared.registry.insert_within_limit(
            Arc::clone(&job),
            shared.settings.max_jobs,
            owner_limits,
        ) {
            JobRecord::delete(&shared.store, &id)?;
            return Err(error);
        }
        shared.send(SchedulerMessage::Schedule(job));
        tracing::info!(job = %id, "export accepted");
        Ok(id)
    }

    /// Opens (creating it when allowed) and keeps the default container: the start-up
    /// check that the destination answers. Bounded by the destination's open timeout.
    pub fn open_default_container(&self) -> Result<(), ExportError> {
        let name = self.shared.destination.default_container();
        self.shared.open_container(&name).map(|_| ())
    }

    /// Whether the destination answers now: its default container is opened afresh
    /// (bounded by the destination's open timeout), bypassing the cache. Blocking.
    pub fn probe_destination(&self) -> Result<(), ExportError> {
        let name = self.shared.destination.default_container();
        self.shared
            .destination
            .open_container(&name, &self.shared.runtime)?;
        Ok(())
    }

    /// Refuses, as if the job did not exist, a `viewer` other than the client that
    /// started it; `None` (no access control) sees every job.
    pub fn check_owner(&self, job_id: &str, viewer: Option<&str>) -> Result<(), ExportError> {
        let job = self.shared.registry.get(job_id)?;
        match viewer {
            Some(viewer) if job.owner() != Some(viewer) => {
                Err(ExportError::not_found(format!("no export job '{job_id}'")))
            }
            _ => Ok(()),
        }
    }

    /// The job's state as held in memory: never waits on storage.
    pub fn status(&self, job_id: &str) -> Result<JobStatus, ExportError> {
        let job = self.shared.registry.get(job_id)?;
        let record = job.record();
        Ok(match &record.state {
            JobState::Completed { completed_at } => JobStatus::Completed {
                expires: add_duration(*completed_at, self.shared.settings.retention),
                record: Box::new(record.clone()),
            },
            JobState::Failed { kind, message, .. } => JobStatus::Failed {
                kind: *kind,
                message: message.clone(),
            },
            _ => {
                drop(record);
                JobStatus::InProgress {
                    progress: job.progress(),
                }
            }
        })
    }

    /// Cancels a job or discards a finished one: its record is deleted durably, it
    /// disappears at once (status 404), and its files are deleted once its workers have
    /// stopped. Blocking (one store write): call from a blocking thread.
    pub fn cancel(&self, job_id: &str) -> Result<(), ExportError> {
        let job = self.shared.registry.get(job_id)?;
        job.cancel(&self.shared.store)?;
        self.shared.registry.remove(job_id);
        self.shared
            .send(SchedulerMessage::Queue(WorkItem::Cleanup(job)));
        Ok(())
    }

    /// Where to read a finished job's file `file_name` from.
    pub fn file(
        &self,
        job_id: &str,
        file_name: &str,
    ) -> Result<(ContainerStore, String), ExportError> {
        let job = self.shared.registry.get(job_id)?;
        {
            let record = job.record();
            if !matches!(record.state, JobState::Completed { .. }) {
                return Err(ExportError::not_found(format!(
                    "export job '{job_id}' has not completed"
                )));
            }
            if !record.files.iter().any(|file| file.name == file_name) {
                return Err(ExportError::not_found(format!(
                    "export job '{job_id}' has no file '{file_name}'"
                )));
            }
        }
        let container = job.container().cloned().ok_or_else(|| {
            ExportError::new(
                ExportErrorKind::DestinationUnavailable,
                format!(
                    "the container '{}' of export job '{job_id}' is not available",
                    job.record().container
                ),
            )
        })?;
        Ok((container, files::final_object(job_id, file_name)))
    }

    /// Blocks until the job is no longer in progress (for the CLI), reporting progress.
    pub fn wait(
        &self,
        job_id: &str,
        mut on_progress: impl FnMut(&JobProgress),
    ) -> Result<JobStatus, ExportError> {
        loop {
            match self.status(job_id)? {
                JobStatus::InProgress { progress } => on_progress(&progress),
                finished => return Ok(finished),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ExportEngine {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.shared.watchdog_wakeup.0.try_send(());
        let _ = self.shared.scheduler.send(SchedulerMessage::Stop);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl EngineShared {
    fn send(&self, message: SchedulerMessage) {
        if self.scheduler.send(message).is_err() {
            tracing::debug!("the export scheduler has stopped; the job resumes at the next start");
        }
    }

    fn open_container(&self, name: &ContainerName) -> Result<ContainerStore, ExportError> {
        if let Some(opened) = lock(&self.containers).get(name).cloned() {
            return Ok(opened);
        }
        let opened = self.destination.open_container(name, &self.runtime)?;
        let container = ContainerStore::new(name.clone(), opened, self.runtime.clone());
        Ok(lock(&self.containers)
            .entry(name.clone())
            .or_insert(container)
            .clone())
    }

    /// Attaches a resumed job's container (no remote call); a job whose container cannot
    /// be attached opens it when a worker first needs it.
    fn attach_container(&self, job: &JobHandle) {
        let name = job.record().container.clone();
        match self.destination.attach_container(&name) {
            Ok(opened) => {
                job.set_container(ContainerStore::new(name, opened, self.runtime.clone()));
            }
            Err(error) => {
                tracing::warn!(job = %job.id(), error = %error.detail(), "cannot attach an export's container")
            }
        }
    }

    /// The job's container, opened now if this run has not yet, retrying a destination
    /// that is down until `--destination-timeout`.
    fn container_of(&self, job: &JobHandle) -> Result<ContainerStore, ExportError> {
        if let Some(container) = job.container() {
            return Ok(container.clone());
        }
        let name = job.record().container.clone();
        let opened = retrying_transient_failures(job, self.settings.destination_timeout, || {
            self.open_container(&name)
        })?;
        Ok(job.set_container(opened).clone())
    }

    fn work(&self, item: WorkItem) {
        let job = match &item {
            WorkItem::Collect(job)
            | WorkItem::Unit(job, _)
            | WorkItem::Finalize(job)
            | WorkItem::Cleanup(job) => Arc::clone(job),
        };
        let outcome = match item {
            WorkItem::Cleanup(job) => {
                self.clean_up(&job);
                Ok(())
            }
            WorkItem::Collect(job) => job
                .run_task(|| planner::run_collection(&self.store, &job, &self.settings.local_base))
                .map(|()| self.send(SchedulerMessage::Schedule(Arc::clone(&job)))),
            WorkItem::Unit(job, mut assignment) => job.run_task(|| {
                let container = self.container_of(&job)?;
                retrying_transient_failures(&job, self.settings.destination_timeout, || {
                    run_unit(&self.store, &container, &job, &mut assignment)
                })?;
                if job.unit_done(assignment.unit_index, assignment.checkpoint.clone()) {
                    self.send(SchedulerMessage::Queue(WorkItem::Finalize(Arc::clone(
                        &job,
                    ))));
                }
                Ok(())
            }),
            WorkItem::Finalize(job) => job.run_task(|| {
                if job.record().state == JobState::ExportingCompartments {
                    planner::finish_stage(
                        &self.store,
                        &job,
                        planner::CollectionStage::CompartmentExport,
                    )?;
                    self.send(SchedulerMessage::Schedule(Arc::clone(&job)));
                    return Ok(());
                }
                let container = self.container_of(&job)?;
                retrying_transient_failures(&job, self.settings.destination_timeout, || {
                    finalizer::finalize(&self.store, &container, &job)
                })
            }),
        };
        match outcome {
            Ok(()) => {}
            Err(error) if error.kind() == ExportErrorKind::Cancelled => {}
            Err(error) => {
                if job.fail(&self.store, &error) {
                    self.send(SchedulerMessage::Queue(WorkItem::Cleanup(job)));
                }
            }
        }
    }

    fn clean_up(&self, job: &JobHandle) {
        let record = if self.registry.contains(job.id()) {
            RecordAfterCleanup::Keep
        } else {
            RecordAfterCleanup::Delete
        };
        let patience = self.settings.destination_timeout + Duration::from_secs(30);
        finalizer::clean_up(&self.store, job.container(), job, record, patience);
    }

    fn watch_until_stopped(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            let to_clean_up = watchdog::inspect(
                &self.store,
                &self.registry,
                self.settings.job_timeout,
                self.settings.retention,
            );
            for job in to_clean_up {
                self.send(SchedulerMessage::Queue(WorkItem::Cleanup(job)));
            }
            let _ = self.watchdog_wakeup.1.recv_timeout(WATCHDOG_INTERVAL);
        }
    }
}
