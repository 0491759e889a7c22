//! The scheduler: turns a job's persisted state into work items (decoding each unit's
//! checkpoint once) and feeds them to the workers through a bounded channel. Workers,
//! kick-offs, cancellation and the watchdog talk to it by [`SchedulerMessage`]s.

use std::collections::VecDeque;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Select, Sender};

use super::error::ExportError;
use super::job::{JobState, UnitCheckpoint};
use super::registry::JobHandle;
use super::worker::{UnitAssignment, UnitSettings};
use crate::fhir::LocalBase;
use crate::store::Store;

/// Work a worker thread does.
pub enum WorkItem {
    /// Collect the members' compartments of a Group or `patient=` export, the resources
    /// compartment resources reference under `_referenced`, and the Provenance of the
    /// exported resources.
    Collect(Arc<JobHandle>),
    /// Run one unit.
    Unit(Arc<JobHandle>, Box<UnitAssignment>),
    /// Every unit is done: plan the next stage (after the first pass of a `_referenced`
    /// export), or name the files, make them durable and complete the job.
    Finalize(Arc<JobHandle>),
    /// Remove what a cancelled, failed or expired job left behind, once its tasks stopped.
    Cleanup(Arc<JobHandle>),
}

/// What the scheduler is told.
pub enum SchedulerMessage {
    /// Queue what is left of a job, from its persisted state and checkpoints.
    Schedule(Arc<JobHandle>),
    /// Queue this item as it is.
    Queue(WorkItem),
    /// Stop feeding workers; queued work is dropped (jobs resume at the next start).
    Stop,
}

/// Room in the channel to the workers: enough to keep every worker busy.
pub const WORK_CHANNEL_CAPACITY_PER_WORKER: usize = 2;
/// Room for messages to the scheduler; senders wait briefly when it is full.
pub const SCHEDULER_CHANNEL_CAPACITY: usize = 1024;

/// Runs until told to stop: receives messages and hands queued items to workers as they
/// take them. Dropping `work` at the end tells the workers to exit. `local_base` is this
/// server's base, handed to every unit.
pub fn run_scheduler(
    store: &Store,
    local_base: &LocalBase,
    messages: &Receiver<SchedulerMessage>,
    work: Sender<WorkItem>,
) {
    let mut queue: VecDeque<WorkItem> = VecDeque::new();
    loop {
        let message = if queue.is_empty() {
            match messages.recv() {
                Ok(message) => message,
                Err(_) => return,
            }
        } else {
            let mut select = Select::new();
            let receive_index = select.recv(messages);
            let send_index = select.send(&work);
            let operation = select.select();
            if operation.index() == send_index {
                let item = queue
                    .pop_front()
                    .expect("the send arm is only offered with a queued item");
                if operation.send(&work, item).is_err() {
                    return;
                }
                continue;
            }
            debug_assert_eq!(operation.index(), receive_index);
            match operation.recv(messages) {
                Ok(message) => message,
                Err(_) => return,
            }
        };
        match message {
            SchedulerMessage::Stop => return,
            SchedulerMessage::Queue(item) => queue.push_back(item),
            SchedulerMessage::Schedule(job) => {
                if let Err(error) = queue_remaining(store, local_base, &job, &mut queue) {
                    job.fail(store, &error);
                    queue.push_back(WorkItem::Cleanup(job));
                }
            }
        }
    }
}

/// Queues the work a job still needs, from its state and saved checkpoints.
fn queue_remaining(
    store: &Store,
    local_base: &LocalBase,
    job: &Arc<JobHandle>,
    queue: &mut VecDeque<WorkItem>,
) -> Result<(), ExportError> {
    let (state, units, settings) = {
        let record = job.record();
        let settings = UnitSettings {
            snapshot_through_seq: record.window.through_seq,
            wants_deleted: record.request.since.is_some(),
            max_resources_per_file: record.max_resources_per_file,
            local_base: local_base.clone(),
            collects_references: record.state == JobState::ExportingCompartments,
        };
        (record.state.clone(), record.units.clone(), settings)
    };
    match state {
        JobState::Collecting { .. }
        | JobState::CollectingReferenced { .. }
        | JobState::CollectingDeferredReferenced { .. }
        | JobState::CollectingProvenance { .. } => {
            queue.push_back(WorkItem::Collect(Arc::clone(job)))
        }
        JobState::Exporting | JobState::ExportingCompartments => {
            let mut pending = Vec::new();
            for (unit_index, unit) in units.into_iter().enumerate() {
                let checkpoint = UnitCheckpoint::load(store, job.id(), unit_index)?;
                if checkpoint.done {
                    job.unit_was_done(unit_index, checkpoint);
                } else {
                    pending.push(UnitAssignment {
                        unit_index,
                        unit,
                        checkpoint,
                        settings: settings.clone(),
                    });
                }
            }
            let total = job.record().units.len();
            job.expect_units(total, pending.len());
            if pending.is_empty() {
                queue.push_back(WorkItem::Finalize(Arc::clone(job)));
            }
            for assignment in pending {
                queue.push_back(WorkItem::Unit(Arc::clone(job), Box::new(assignment)));
            }
        }
        JobState::Completed { .. } | JobState::Failed { .. } => {}
    }
    Ok(())
}
