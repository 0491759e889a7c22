//! `fhirlog export`: the same engine without HTTP, writing under a local directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::engine::{ExportEngine, JobStatus};
use super::manifest::{FileUrls, manifest};
use super::request::ExportRequest;
use super::settings::ExportSettings;
use crate::sink::{ContainerName, LocalDestination};
use crate::store::Store;

/// Runs one export to completion with a progress bar and returns its manifest, whose
/// file URLs are `file://` paths under `out`.
pub fn run_export(
    store: Store,
    request: ExportRequest,
    out: &Path,
    settings: ExportSettings,
) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let container = request
        .container
        .clone()
        .unwrap_or_else(ContainerName::default_container);
    let destination = LocalDestination::new(out.clone(), true);
    let engine = ExportEngine::start(
        store,
        Arc::new(destination),
        settings,
        runtime.handle().clone(),
    )?;
    let job_id = engine.submit(request, "fhirlog export".to_owned())?;
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(200));
    let finished = engine.wait(&job_id, |text| progress.set_message(text.to_string()))?;
    progress.finish_and_clear();
    let result = match finished {
        JobStatus::Completed { record, .. } => {
            let folder = out.join(container.as_str()).join(&record.id);
            let prefix = format!("file://{}", folder.display());
            Ok(manifest(&record, FileUrls::UnderPrefix(&prefix), false))
        }
        JobStatus::Failed { message, .. } => Err(anyhow::anyhow!("export failed: {message}")),
        JobStatus::InProgress { .. } => Err(anyhow::anyhow!("export stopped before it finished")),
    };
    drop(engine);
    result
}
