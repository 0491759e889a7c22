//! `fhirlog export`: one export without HTTP, written straight into a local folder.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::engine::JobStatus;
use super::files;
use super::manifest::{FileUrls, manifest};
use super::request::ExportRequest;
use super::settings::ExportSettings;
use crate::app::ExportServices;
use crate::config::StorageSettings;
use crate::sink::{ContainerName, StorageUrl};
use crate::store::Store;

/// The hidden folder inside `--out` the engine writes under; removed when the export ends.
pub const WORKING_FOLDER: &str = ".fhirlog-export-work";
/// The manifest written next to the files.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Runs one export to completion with a progress bar, moves its files straight into
/// `out` (refusing an `out` that already holds export files unless `force`), writes
/// `out/manifest.json` and returns the manifest, whose file URLs are `file://` paths in
/// `out`. Every file and `out` itself are fsynced before the manifest is written.
pub fn run_export(
    store: Store,
    request: ExportRequest,
    out: &Path,
    force: bool,
    settings: ExportSettings,
) -> anyhow::Result<Value> {
    let out = prepare_output_folder(out, force)?;
    let working = out.join(WORKING_FOLDER);
    remove_folder_if_present(&working)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let storage = StorageSettings {
        url: StorageUrl::File {
            root: working.clone(),
        },
        create_containers: true,
        signed_url_ttl: None,
    };
    let container = request
        .container
        .clone()
        .unwrap_or_else(ContainerName::default_container);
    let services = ExportServices::start(store, &storage, settings, runtime.handle().clone())?;
    let engine = services.exports;
    let job_id = engine.submit(request, "fhirlog export".to_owned())?;
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(200));
    let finished = engine.wait(&job_id, |text| progress.set_message(text.to_string()))?;
    progress.finish_and_clear();
    let record = match finished {
        JobStatus::Completed { record, .. } => record,
        JobStatus::Failed { message, .. } => anyhow::bail!("export failed: {message}"),
        JobStatus::InProgress { .. } => anyhow::bail!("export stopped before it finished"),
    };
    let job_folder = working.join(container.as_str());
    // The engine made every file durable before completing the job; a move within one
    // file system changes only names, which the fsync of `out` makes durable.
    for file in &record.files {
        let staged = job_folder.join(files::final_object(&record.id, &file.name));
        let placed = out.join(&file.name);
        std::fs::rename(&staged, &placed)
            .with_context(|| format!("moving {} to {}", staged.display(), placed.display()))?;
    }
    sync_file(&out)?;
    let prefix = format!("file://{}", out.display());
    let manifest = manifest(&record, FileUrls::UnderPrefix(&prefix), false);
    write_durably(
        &working.join(MANIFEST_FILE),
        &out.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    engine.cancel(&job_id)?;
    drop(engine);
    drop(runtime);
    remove_folder_if_present(&working)?;
    Ok(manifest)
}

/// Creates `out` if needed and resolves it; a folder already holding `*.ndjson` or
/// `manifest.json` is refused, or with `force` emptied of those files.
fn prepare_output_folder(out: &Path, force: bool) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let mut export_files = Vec::new();
    for entry in std::fs::read_dir(&out).with_context(|| format!("listing {}", out.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", out.display()))?
            .path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if path.is_file() && (name.ends_with(".ndjson") || name == MANIFEST_FILE) {
            export_files.push(path);
        }
    }
    export_files.sort();
    if let Some(first) = export_files.first() {
        if !force {
            anyhow::bail!(
                "{} already holds export files ({} and {} more); pass --force to replace them or choose another --out",
                out.display(),
                first.file_name().unwrap_or_default().to_string_lossy(),
                export_files.len() - 1
            );
        }
        for path in &export_files {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(out)
}

fn remove_folder_if_present(folder: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(folder) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", folder.display()))
        }
        _ => Ok(()),
    }
}

/// Flushes a file or a folder (its entries) to disk.
fn sync_file(path: &Path) -> anyhow::Result<()> {
    File::open(path)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// Writes `bytes` to `temporary`, syncs it, renames it to `target` and syncs the folder.
fn write_durably(temporary: &Path, target: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(temporary, bytes).with_context(|| format!("writing {}", temporary.display()))?;
    sync_file(temporary)?;
    std::fs::rename(temporary, target)
        .with_context(|| format!("moving {} to {}", temporary.display(), target.display()))?;
    sync_file(target.parent().unwrap_or(Path::new("/")))
}
