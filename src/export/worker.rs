//! The worker: runs one work unit — scan its seq range as of the job's snapshot, keep what
//! the export covers, write parts of at most `max_resources_per_file` lines, and save a
//! checkpoint after every part so a restart resumes exactly where the last part ended —
//! retrying transient destination failures from the last checkpoint.

use std::time::Duration;

use serde_json::{Value, json};

use super::error::ExportError;
use super::files;
use super::job::{FileKind, StreamCheckpoint, UnitCheckpoint, UnitSource, WorkUnit, WrittenPart};
use super::referenced::ReferenceCollector;
use super::registry::JobHandle;
use super::request::TypeFilter;
use crate::fhir::{LocalBase, ResourceType};
use crate::search::matching::prefilter::RawBody;
use crate::sink::{ContainerStore, ObjectUpload};
use crate::store::{EventView, ScanControl, SeqWindow, Store, StoreError};

/// Events between cancellation checks.
const CANCEL_CHECK_INTERVAL: u64 = 256;

/// What a unit needs of its job, fixed when the job was planned.
#[derive(Debug, Clone)]
pub struct UnitSettings {
    /// The job's snapshot: newer versions do not count.
    pub snapshot_through_seq: u64,
    /// Deletions are exported (to `deleted` files) only when `_since` was given.
    pub wants_deleted: bool,
    pub max_resources_per_file: u64,
    /// This server's base, for `_typeFilter` reference values and `_referenced` targets.
    pub local_base: LocalBase,
    /// The unit adds what its exported resources reference to the job's scratch set
    /// (`_referenced`, [`super::job::JobState::ExportingCompartments`]).
    pub collects_references: bool,
}

/// One unit of one job, with its checkpoint as last saved.
pub struct UnitAssignment {
    pub unit_index: usize,
    pub unit: WorkUnit,
    pub checkpoint: UnitCheckpoint,
    pub settings: UnitSettings,
}

/// Runs `attempt` again while it fails with transient destination errors, until
/// `destination_timeout` has passed since the first failing attempt began (a destination
/// that hangs counts from when it stopped answering), pausing with backoff.
/// Attempts resume from the last checkpoint, so a retried step writes exactly what one
/// run would. A job counts as alive while it retries: `--destination-timeout`, not
/// `--job-timeout`, ends a retry.
pub fn retrying_transient_failures<T>(
    job: &JobHandle,
    destination_timeout: Duration,
    mut attempt: impl FnMut() -> Result<T, ExportError>,
) -> Result<T, ExportError> {
    let mut failing_since: Option<std::time::Instant> = None;
    let mut pause = Duration::from_millis(100);
    loop {
        let attempt_started = std::time::Instant::now();
        match attempt() {
            Err(error)
                if error.is_transient_destination_failure()
                    && failing_since.get_or_insert(attempt_started).elapsed()
                        < destination_timeout =>
            {
                tracing::warn!(job = %job.id(), error = %error.detail(), "transient storage failure; retrying from the last checkpoint");
                if job.should_stop() {
                    return Err(ExportError::cancelled());
                }
                job.touch();
                std::thread::sleep(pause);
                job.touch();
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            outcome => return outcome,
        }
    }
}

struct PartStream {
    kind: FileKind,
    checkpoint: StreamCheckpoint,
    upload: Option<ObjectUpload>,
    count: u64,
    bytes: u64,
    last_seq: u64,
}

impl PartStream {
    fn new(kind: FileKind, checkpoint: StreamCheckpoint) -> PartStream {
        PartStream {
            kind,
            checkpoint,
            upload: None,
            count: 0,
            bytes: 0,
            last_seq: 0,
        }
    }

    /// Streams a line into the current part unless a written part already holds it.
    fn push(&mut self, unit: &UnitRun<'_>, seq: u64, line: &[u8]) -> Result<bool, ExportError> {
        if seq <= self.checkpoint.resume_after_seq {
            return Ok(false);
        }
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => {
                let part_number = self.checkpoint.parts.len() + 1;
                let name =
                    files::staged_part(unit.job.id(), self.kind, unit.unit_index, part_number);
                self.upload.insert(unit.files.begin_upload(&name)?)
            }
        };
        upload.write(line)?;
        upload.write(b"\n")?;
        self.count += 1;
        self.bytes += line.len() as u64 + 1;
        self.last_seq = seq;
        Ok(true)
    }

    /// Completes the current part, if it has any lines.
    fn flush(&mut self, unit: &UnitRun<'_>) -> Result<(), ExportError> {
        let Some(upload) = self.upload.take() else {
            return Ok(());
        };
        if unit.job.should_stop() {
            return Err(ExportError::cancelled());
        }
        upload.finish()?;
        self.checkpoint.parts.push(WrittenPart {
            resources: self.count,
            bytes: self.bytes,
        });
        self.checkpoint.resume_after_seq = self.last_seq;
        self.count = 0;
        self.bytes = 0;
        Ok(())
    }
}

/// The parts of a unit run that the part streams need.
struct UnitRun<'a> {
    job: &'a JobHandle,
    files: &'a ContainerStore,
    unit_index: usize,
}

/// Runs (or resumes) a unit to completion; `assignment.checkpoint` follows every part
/// written, so a retry after a failure resumes from it.
pub fn run_unit(
    store: &Store,
    files: &ContainerStore,
    job: &JobHandle,
    assignment: &mut UnitAssignment,
) -> Result<(), ExportError> {
    if assignment.checkpoint.done {
        return Ok(());
    }
    let unit = assignment.unit.clone();
    let settings = assignment.settings.clone();
    let run = UnitRun {
        job,
        files,
        unit_index: assignment.unit_index,
    };
    let mut output = PartStream::new(FileKind::Output, assignment.checkpoint.output.clone());
    let mut deleted = PartStream::new(FileKind::Deleted, assignment.checkpoint.deleted.clone());
    let resume_after = if settings.wants_deleted {
        output
            .checkpoint
            .resume_after_seq
            .min(deleted.checkpoint.resume_after_seq)
    } else {
        output.checkpoint.resume_after_seq
    }
    .max(unit.seqs.after_seq);
    let window = SeqWindow {
        after_seq: resume_after,
        through_seq: unit.seqs.through_seq,
    };
    let elements = {
        let record = job.record();
        let elements = &record.request.elements;
        elements
            .applies_to(unit.resource_type)
            .then(|| elements.clone())
    };
    let type_filter = job
        .record()
        .request
        .type_filters
        .filter_for(unit.resource_type, &settings.local_base)
        .map_err(|problem| ExportError::invalid_request(format!("_typeFilter: {problem}")))?;
    let mut references = settings
        .collects_references
        .then(|| ReferenceCollector::new(store, job, &settings.local_base));
    let mut failure: Option<ExportError> = None;
    let mut visited = 0u64;
    let mut handle_event = |view: &EventView<'_>| -> ScanControl {
        visited += 1;
        if visited.is_multiple_of(CANCEL_CHECK_INTERVAL) {
            job.touch();
            if job.should_stop() {
                failure = Some(ExportError::cancelled());
                return ScanControl::Stop;
            }
        }
        let outcome = keep_event(store, unit.source, view).and_then(|keep| {
            if !keep || !passes_type_filter(store, type_filter.as_ref(), view)? {
                return Ok(());
            }
            let pushed = if view.deleted {
                if !settings.wants_deleted {
                    return Ok(());
                }
                deleted.push(&run, view.seq, deleted_bundle_line(view).as_bytes())?
            } else if let Some(elements) = &elements {
                let subset = elements
                    .apply_to_body(view.resource_type, view.body)
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("event {} holds no JSON object", view.seq))
                    })?;
                output.push(&run, view.seq, &subset)?
            } else {
                output.push(&run, view.seq, view.body)?
            };
            if pushed {
                job.count_exported(1);
            }
            if let Some(references) = references.as_mut().filter(|_| !view.deleted) {
                references.note_references_of(view.body);
                if references.is_full() {
                    references.add_pending_to_scratch()?;
                }
            }
            let stream = if view.deleted {
                &mut deleted
            } else {
                &mut output
            };
            if stream.count >= settings.max_resources_per_file {
                stream.flush(&run)?;
                if let Some(references) = &mut references {
                    references.add_pending_to_scratch()?;
                }
                save_checkpoint(store, &run, assignment, false, &output, &deleted)?;
                job.touch();
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
            store.scan_newest_in_window(
                unit.resource_type,
                window,
                settings.snapshot_through_seq,
                &mut handle_event,
            )?;
        }
        UnitSource::CollectedEvents => {
            store.scratch_scan(job.id(), unit.resource_type, window, |seq| {
                let control = store
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
    output.flush(&run)?;
    deleted.flush(&run)?;
    if let Some(references) = &mut references {
        references.add_pending_to_scratch()?;
    }
    save_checkpoint(store, &run, assignment, true, &output, &deleted)?;
    job.touch();
    Ok(())
}

fn save_checkpoint(
    store: &Store,
    run: &UnitRun<'_>,
    assignment: &mut UnitAssignment,
    done: bool,
    output: &PartStream,
    deleted: &PartStream,
) -> Result<(), ExportError> {
    assignment.checkpoint = UnitCheckpoint {
        done,
        output: output.checkpoint.clone(),
        deleted: deleted.checkpoint.clone(),
    };
    match assignment
        .checkpoint
        .save(store, run.job.id(), run.unit_index)
    {
        Err(error) if error.is_passing_refusal() => {
            tracing::warn!(job = %run.job.id(), %error, "a checkpoint was not saved (a restart resumes from an earlier one)");
            Ok(())
        }
        saved => Ok(saved?),
    }
}

/// Whether a version meets its type's `_typeFilter` (always, without one). Only filtered
/// types are parsed. A deletion passes when the version it deleted met the filter, so a
/// `_since` export reports deleting only what a filtered export could have delivered.
fn passes_type_filter(
    store: &Store,
    type_filter: Option<&TypeFilter>,
    view: &EventView<'_>,
) -> Result<bool, ExportError> {
    let Some(type_filter) = type_filter else {
        return Ok(true);
    };
    if !view.deleted {
        return body_meets_type_filter(type_filter, view);
    }
    let deleted_version_met_filter =
        with_version_deleted_by(store, view.resource_type, view.id, view.seq, |earlier| {
            body_meets_type_filter(type_filter, earlier)
        })?;
    deleted_version_met_filter.unwrap_or(Ok(false))
}

/// Whether a live version meets `type_filter`.
pub(super) fn body_meets_type_filter(
    type_filter: &TypeFilter,
    view: &EventView<'_>,
) -> Result<bool, ExportError> {
    if !type_filter.may_match_body(&RawBody::new(view.body)) {
        return Ok(false);
    }
    let resource: Value = serde_json::from_slice(view.body).map_err(|error| {
        StoreError::Corrupt(format!(
            "stored {}/{} at seq {} is not JSON: {error}",
            view.resource_type, view.id, view.seq
        ))
    })?;
    Ok(type_filter.matches(&resource))
}

/// Whether the unit's source covers this event.
fn keep_event(
    store: &Store,
    source: UnitSource,
    view: &EventView<'_>,
) -> Result<bool, ExportError> {
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
            let had_patients =
                with_version_deleted_by(store, view.resource_type, view.id, view.seq, |earlier| {
                    !earlier.compartment_patients.is_empty()
                })?;
            Ok(had_patients == Some(true))
        }
    }
}

/// For a delete: `inspect` applied to the live version it deleted (`None` when there was
/// none).
fn with_version_deleted_by<T>(
    store: &Store,
    resource_type: ResourceType,
    id: &str,
    delete_seq: u64,
    inspect: impl Fn(&EventView<'_>) -> T,
) -> Result<Option<T>, StoreError> {
    for (_, seq) in store.version_seqs(resource_type, id)? {
        if seq >= delete_seq {
            continue;
        }
        let inspected = store.with_event(resource_type, seq, |earlier| {
            (!earlier.deleted).then(|| inspect(earlier))
        })?;
        if let Some(Some(inspected)) = inspected {
            return Ok(Some(inspected));
        }
    }
    Ok(None)
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
