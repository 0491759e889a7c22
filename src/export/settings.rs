//! How the export engine runs: worker count, file size, limits and timeouts.

use std::time::Duration;

use crate::fhir::LocalBase;

/// Engine settings; see `fhirlog serve --help`.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub workers: usize,
    pub max_resources_per_file: u64,
    pub job_timeout: Duration,
    pub max_jobs: usize,
    pub retention: Duration,
    /// How long a failing destination is retried before the job fails.
    pub destination_timeout: Duration,
    /// Most completed exports kept at once; more kick-offs get 429 until one is deleted
    /// or expires.
    pub max_retained_exports: usize,
    /// Most bytes of completed exports kept at once (`None`: no limit); more kick-offs
    /// get 507 until an export is deleted or expires.
    pub max_export_bytes: Option<u64>,
    /// Most queued or running exports of one client (under `--auth token` or `smart`).
    pub max_jobs_per_client: usize,
    /// Most completed exports of one client kept at once.
    pub max_retained_exports_per_client: usize,
    /// Which absolute references name resources of this server: Group members and
    /// referenced resources are looked up only for these and relative references. The app
    /// root sets it from the server's public base URL.
    pub local_base: LocalBase,
    /// `--include-referenced`: Patient and Group exports include the resources their
    /// records reference (`includeAssociatedData=_referenced`) unless the kick-off names
    /// other associated data.
    pub include_referenced: bool,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            workers: std::thread::available_parallelism().map_or(2, |count| count.get()),
            max_resources_per_file: 5_000,
            job_timeout: Duration::from_secs(600),
            max_jobs: 16,
            retention: Duration::from_secs(24 * 3600),
            destination_timeout: Duration::from_secs(120),
            max_retained_exports: 100,
            max_export_bytes: None,
            max_jobs_per_client: 4,
            max_retained_exports_per_client: 25,
            local_base: LocalBase::relative_only(),
            include_referenced: false,
        }
    }
}
