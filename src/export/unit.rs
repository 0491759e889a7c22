//! Running one work unit: scan its seq range as of the job's snapshot, keep what the
//! export covers, and write parts of at most `max_resources_per_file` lines, saving a
//! checkpoint after every part so a restart resumes exactly where the last part ended.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::json;

use super::job::{
    FileKind, JobRecord, StreamCheckpoint, UnitCheckpoint, UnitSource, staged_part_name,
};
use crate::fhir::ResourceType;
use crate::sink::{ContainerStore, ObjectUpload, SinkError};
use crate::store::{EventView, ScanControl, SeqWindow, Store, StoreError};

/// Events between cancellation checks.
const CANCEL_CHECK_INTERVAL: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("the export was cancelled")]
    Cancelled,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// What a unit needs from its job.
pub struct UnitContext<'a> {
    pub store: &'a Store,
    pub files: &'a ContainerStore,
    pub job: &'a JobRecord,
    pub unit_index: usize,
    pub cancelled: &'a AtomicBool,
    /// Set when the engine shuts down: the unit stops and resumes at the next start.
    pub stopping: &'a AtomicBool,
    pub exported: &'a AtomicU64,
    pub touch_progress: &'a (dyn Fn() + Sync),
}

impl UnitContext<'_> {
    fn should_stop(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.stopping.load(Ordering::Relaxed)
    }
}

struct PartStream {
    kind: FileKind,
    checkpoint: StreamCheckpoint,
    upload: Option<ObjectUpload>,
    count: u64,
    last_seq: u64,
}

impl PartStream {
    fn new(kind: FileKind, checkpoint: StreamCheckpoint) -> PartStream {
        PartStream {
            kind,
            checkpoint,
            upload: None,
            count: 0,
            last_seq: 0,
        }
    }

    /// Streams a line into the current part unless a written part already holds it.
    fn push(
        &mut self,
        context: &UnitContext<'_>,
        seq: u64,
        line: &[u8],
    ) -> Result<bool, UnitError> {
        if seq <= self.checkpoint.resume_after_seq {
            return Ok(false);
        }
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => {
                let part_number = self.checkpoint.part_counts.len() + 1;
                let name =
                    staged_part_name(&context.job.id, self.kind, context.unit_index, part_number);
                self.upload.insert(context.files.begin_upload(&name)?)
            }
        };
        upload.write(line)?;
        upload.write(b"\n")?;
        self.count += 1;
        self.last_seq = seq;
        Ok(true)
    }

    /// Completes the current part, if it has any lines.
    fn flush(&mut self, context: &UnitContext<'_>) -> Result<(), UnitError> {
        let Some(upload) = self.upload.take() else {
            return Ok(());
        };
        if context.should_stop() {
            return Err(UnitError::Cancelled);
        }
        upload.finish()?;
        self.checkpoint.part_counts.push(self.count);
        self.checkpoint.resume_after_seq = self.last_seq;
        self.count = 0;
        Ok(())
    }
}

/// Runs (or resumes) unit `context.unit_index` to completion.
pub fn run_unit(context: &UnitContext<'_>) -> Result<(), UnitError> {
    let unit = &context.job.units[context.unit_index];
    let saved = UnitCheckpoint::load(context.store, &context.job.id, context.unit_index)?;
    if saved.done {
        return Ok(());
    }
    let mut output = PartStream::new(FileKind::Output, saved.output);
    let mut deleted = PartStream::new(FileKind::Deleted, saved.deleted);
    let resume_after = output
        .checkpoint
        .resume_after_seq
        .min(deleted.checkpoint.resume_after_seq)
        .max(unit.seqs.after_seq);
    let window = SeqWindow {
        after_seq: resume_after,
        through_seq: unit.seqs.through_seq,
    };
    let wants_deleted = context.job.request.since.is_some();
    let max_per_file = context.job.max_resources_per_file;
    let mut failure: Option<UnitError> = None;
    let mut visited = 0u64;
    let mut handle_event = |view: &EventView<'_>| -> ScanControl {
        visited += 1;
        if visited.is_multiple_of(CANCEL_CHECK_INTERVAL) {
            (context.touch_progress)();
            if context.should_stop() {
                failure = Some(UnitError::Cancelled);
                return ScanControl::Stop;
            }
        }
        let outcome = keep_event(context, unit.source, view).and_then(|keep| {
            if !keep {
                return Ok(());
            }
            let pushed = if view.deleted {
                if !wants_deleted {
                    return Ok(());
                }
                deleted.push(context, view.seq, deleted_bundle_line(view).as_bytes())?
            } else {
                output.push(context, view.seq, view.body.as_bytes())?
            };
            if pushed {
                context.exported.fetch_add(1, Ordering::Relaxed);
            }
            let stream = if view.deleted {
                &mut deleted
            } else {
                &mut output
            };
            if stream.count >= max_per_file {
                stream.flush(context)?;
                save_checkpoint(context, false, &output, &deleted)?;
                (context.touch_progress)();
            }
            Ok(())
        });
        match outcome {
            Ok(()) => ScanControl::Continue,
            Err(error) => {
                failure = Some(error);
                ScanControl::Stop
            }
        }
    };
    match unit.source {
        UnitSource::AllEvents | UnitSource::CompartmentEvents => {
            context.store.scan_newest_in_window(
                unit.resource_type,
                window,
                context.job.window.through_seq,
                &mut handle_event,
            )?;
        }
        UnitSource::CollectedEvents => {
            context
                .store
                .scratch_scan(&context.job.id, unit.resource_type, window, |seq| {
                    let control = context
                        .store
                        .with_event(unit.resource_type, seq, &mut handle_event)?
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("collected event {seq} is missing"))
                        })?;
                    Ok(control)
                })?;
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    output.flush(context)?;
    deleted.flush(context)?;
    save_checkpoint(context, true, &output, &deleted)?;
    (context.touch_progress)();
    Ok(())
}

fn save_checkpoint(
    context: &UnitContext<'_>,
    done: bool,
    output: &PartStream,
    deleted: &PartStream,
) -> Result<(), UnitError> {
    let checkpoint = UnitCheckpoint {
        done,
        output: output.checkpoint.clone(),
        deleted: deleted.checkpoint.clone(),
    };
    checkpoint.save(context.store, &context.job.id, context.unit_index)?;
    Ok(())
}

/// Whether the unit's source covers this event.
fn keep_event(
    context: &UnitContext<'_>,
    source: UnitSource,
    view: &EventView<'_>,
) -> Result<bool, UnitError> {
    match source {
        UnitSource::AllEvents | UnitSource::CollectedEvents => Ok(true),
        UnitSource::CompartmentEvents => {
            if view.resource_type == ResourceType::PATIENT || !view.compartment_patients.is_empty()
            {
                return Ok(true);
            }
            if !view.deleted {
                return Ok(false);
            }
            last_live_version_had_patients(context.store, view.resource_type, view.id, view.seq)
        }
    }
}

/// For a delete: whether the version it deleted was in some patient's compartment.
pub fn last_live_version_had_patients(
    store: &Store,
    resource_type: ResourceType,
    id: &str,
    delete_seq: u64,
) -> Result<bool, UnitError> {
    for (_, seq) in store.version_seqs(resource_type, id)? {
        if seq >= delete_seq {
            continue;
        }
        let had_patients = store.with_event(resource_type, seq, |earlier| {
            (!earlier.deleted).then_some(!earlier.compartment_patients.is_empty())
        })?;
        if let Some(Some(had_patients)) = had_patients {
            return Ok(had_patients);
        }
    }
    Ok(false)
}

/// One line of a `deleted` file: a transaction Bundle with a DELETE entry.
fn deleted_bundle_line(view: &EventView<'_>) -> String {
    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "meta": {"lastUpdated": view.last_updated.to_fhir_string()},
        "entry": [{"request": {"method": "DELETE", "url": format!("{}/{}", view.resource_type, view.id)}}],
    })
    .to_string()
}
