//! The watchdog: fails jobs that stopped making progress for `--job-timeout` and expires
//! finished ones after `--retention`.

use std::sync::Arc;
use std::time::Duration;

use super::error::{ExportError, ExportErrorKind};
use super::job::JobState;
use super::registry::{JobHandle, JobRegistry};
use crate::fhir::Instant;
use crate::store::Store;

/// `instant + duration`, saturating instead of wrapping.
pub fn add_duration(instant: Instant, duration: Duration) -> Instant {
    let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
    Instant::from_micros_since_epoch(instant.micros_since_epoch().saturating_add(micros))
}

/// One look at every job: fails those that made no progress for `job_timeout` and
/// removes from the registry those finished longer than `retention` ago. Returns the jobs
/// whose files and records need cleaning up.
pub fn inspect(
    store: &Store,
    registry: &JobRegistry,
    job_timeout: Duration,
    retention: Duration,
) -> Vec<Arc<JobHandle>> {
    let now = Instant::now();
    let mut to_clean_up = Vec::new();
    for job in registry.all() {
        let finished_at = match job.record().state {
            JobState::Completed { completed_at } => Some(completed_at),
            JobState::Failed { failed_at, .. } => Some(failed_at),
            _ => None,
        };
        match finished_at {
            Some(finished_at) => {
                if add_duration(finished_at, retention) <= now {
                    tracing::info!(job = %job.id(), "export expired; removing its files");
                    registry.remove(job.id());
                    to_clean_up.push(job);
                }
            }
            None => {
                let idle = job.idle_for();
                if job.has_active_tasks() && idle > job_timeout {
                    let error = ExportError::new(
                        ExportErrorKind::TimedOut,
                        format!(
                            "export made no progress for {:.1}s (the limit is {:.1}s) and was stopped",
                            idle.as_secs_f64(),
                            job_timeout.as_secs_f64()
                        ),
                    );
                    if job.fail(store, &error) {
                        to_clean_up.push(job);
                    }
                }
            }
        }
    }
    to_clean_up
}
