//! The finalizer: names the staged parts `{Type}-{n}.ndjson` in unit order, writes the
//! error file, makes every listed file durable, and only then completes the job. Safe to
//! repeat after a crash. Also the clean-up of jobs that were cancelled, failed or expired.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use super::error::ExportError;
use super::files;
use super::job::{
    ExportedFile, FileKind, JobRecord, MissingReason, UnitCheckpoint, delete_checkpoints,
    delete_missing_references, load_missing_references,
};
use super::registry::JobHandle;
use crate::fhir::ResourceType;
use crate::fhir::outcome::{IssueKind, IssueSeverity, OperationOutcome};
use crate::sink::ContainerStore;
use crate::store::Store;

/// Completes `job`: every output, deleted and error file exists under its final name and
/// is durable before the Completed state is saved.
pub fn finalize(
    store: &Store,
    container: &ContainerStore,
    job: &JobHandle,
) -> Result<(), ExportError> {
    let record = job.record().clone();
    if record.is_finished() {
        return Ok(());
    }
    let mut exported_files = Vec::new();
    let mut renames = Vec::new();
    let mut next_output_number: HashMap<ResourceType, usize> = HashMap::new();
    let mut next_deleted_number = 0usize;
    for (unit_index, unit) in record.units.iter().enumerate() {
        let checkpoint = match job.finished_unit(unit_index) {
            Some(checkpoint) => checkpoint,
            None => UnitCheckpoint::load(store, &record.id, unit_index)?,
        };
        for (part_index, part) in checkpoint.output.parts.iter().enumerate() {
            let number = next_output_number.entry(unit.resource_type).or_insert(0);
            *number += 1;
            let name = files::output_file_name(unit.resource_type, *number);
            renames.push((
                files::staged_part(&record.id, FileKind::Output, unit_index, part_index + 1),
                name.clone(),
            ));
            exported_files.push(ExportedFile {
                kind: FileKind::Output,
                type_name: unit.resource_type.to_string(),
                name,
                count: part.resources,
                bytes: part.bytes,
            });
        }
        for (part_index, part) in checkpoint.deleted.parts.iter().enumerate() {
            next_deleted_number += 1;
            let name = files::deleted_file_name(next_deleted_number);
            renames.push((
                files::staged_part(&record.id, FileKind::Deleted, unit_index, part_index + 1),
                name.clone(),
            ));
            exported_files.push(ExportedFile {
                kind: FileKind::Deleted,
                type_name: "Bundle".to_owned(),
                name,
                count: part.resources,
                bytes: part.bytes,
            });
        }
    }
    for (staged, final_name) in renames {
        if job.should_stop() {
            return Err(ExportError::cancelled());
        }
        let final_object = files::final_object(&record.id, &final_name);
        if container.exists_blocking(&staged)? || !container.exists_blocking(&final_object)? {
            container.rename_blocking(&staged, &final_object)?;
        }
        job.touch();
    }
    if let Some(error_file) = write_error_file(store, container, &record)? {
        exported_files.push(error_file);
    }
    let final_objects: Vec<String> = exported_files
        .iter()
        .map(|file| files::final_object(&record.id, &file.name))
        .collect();
    job.touch();
    container.make_durable_blocking(&final_objects)?;
    job.touch();
    job.complete(store, exported_files)?;
    delete_checkpoints(store, &record.id)?;
    delete_missing_references(store, &record.id)?;
    store.scratch_clear(&record.id)?;
    job.touch();
    tracing::info!(job = %record.id, exported = job.resources_exported(), "export completed");
    Ok(())
}

/// Writes the warnings, if any: parameters ignored under lenient handling, then referenced
/// resources missing at the snapshot, once each.
fn write_error_file(
    store: &Store,
    container: &ContainerStore,
    record: &JobRecord,
) -> Result<Option<ExportedFile>, ExportError> {
    let missing_references = load_missing_references(store, &record.id)?;
    if record.request.ignored_under_lenient.is_empty() && missing_references.is_empty() {
        return Ok(None);
    }
    let ignored = record.request.ignored_under_lenient.iter().map(|problem| {
        OperationOutcome::single(
            IssueSeverity::Warning,
            IssueKind::NotSupported,
            format!("ignored: {problem}"),
        )
    });
    let missing = missing_references.iter().map(|missing| {
        let (why, kind) = match missing.reason {
            MissingReason::Absent => ("did not exist", IssueKind::NotFound),
            MissingReason::Deleted => ("was deleted", IssueKind::Deleted),
        };
        OperationOutcome::single(
            IssueSeverity::Warning,
            kind,
            format!(
                "{} is referenced by exported resources but {why} at the export's snapshot; it is not in the export",
                missing.reference
            ),
        )
    });
    let lines: Vec<String> = ignored
        .chain(missing)
        .map(|outcome| outcome.to_json().to_string())
        .collect();
    let contents = Bytes::from(lines.join("\n") + "\n");
    let bytes = contents.len() as u64;
    container.put_blocking(
        &files::final_object(&record.id, files::ERROR_FILE_NAME),
        contents,
    )?;
    Ok(Some(ExportedFile {
        kind: FileKind::Error,
        type_name: "OperationOutcome".to_owned(),
        name: files::ERROR_FILE_NAME.to_owned(),
        count: lines.len() as u64,
        bytes,
    }))
}

/// Whether clean-up removes the job's record too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordAfterCleanup {
    /// A failed job keeps its record, so its status stays readable until it expires.
    Keep,
    /// An expired job disappears (a cancelled one was already deleted by the cancel).
    Delete,
}

/// Removes a halted or expired job's files, scratch set and checkpoints once its tasks
/// have stopped (waiting at most `patience` for them).
pub fn clean_up(
    store: &Store,
    container: Option<&ContainerStore>,
    job: &JobHandle,
    record: RecordAfterCleanup,
    patience: Duration,
) {
    let deadline = std::time::Instant::now() + patience;
    while job.has_active_tasks() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if job.has_active_tasks() {
        tracing::warn!(job = %job.id(), "an export's tasks are still running; leaving its files in place");
        return;
    }
    if let Some(container) = container
        && let Err(error) = container.delete_prefix_blocking(files::job_folder(job.id()))
    {
        tracing::warn!(job = %job.id(), %error, "could not delete an export's files");
    }
    if let Err(error) = store.scratch_clear(job.id()) {
        tracing::warn!(job = %job.id(), %error, "could not clear an export's scratch set");
    }
    let deleted = match record {
        RecordAfterCleanup::Keep => delete_checkpoints(store, job.id())
            .and_then(|()| delete_missing_references(store, job.id())),
        RecordAfterCleanup::Delete => JobRecord::delete(store, job.id()),
    };
    if let Err(error) = deleted {
        tracing::warn!(job = %job.id(), %error, "could not delete an export's records");
    }
}
