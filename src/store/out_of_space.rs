//! A store whose write fails (its disk full, most often): fjall then refuses every write
//! until the database is reopened. From the first failure writes are refused at once, the
//! disk is probed for free space every [`PROBE_INTERVAL`], and once there is room the
//! committer closes the database, cuts the failed writes out of its journal and reopens it
//! in-process ([`super::committer`]). Reads keep using the open database meanwhile.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::StoreError;

/// How often a store that refuses writes checks whether its disk has room again.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Bytes the probe writes and fsyncs: a disk with less room than this would fail the
/// next commits again at once.
const PROBE_BYTES: usize = 1 << 20;

/// The probe file, in the data directory next to fjall's folder (never inside it).
const PROBE_FILE_NAME: &str = ".fhirlog-space-probe";

/// Exit status when the store cannot be reopened in-process (EX_TEMPFAIL: restarting
/// fhirlog once the disk has room recovers it).
const EXIT_STORE_UNRECOVERABLE: i32 = 75;

/// Whether `error` or one of its causes is an I/O error saying the disk (or the user's
/// quota on it) is full.
pub(super) fn is_out_of_space(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io_error) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io_error.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Writes and fsyncs [`PROBE_BYTES`] next to the store, then removes them: `Ok` when the
/// disk takes durable writes again.
pub(super) fn probe_free_space(data_dir: &Path) -> std::io::Result<()> {
    let path = data_dir.join(PROBE_FILE_NAME);
    let written = std::fs::File::create(&path).and_then(|mut file| {
        file.write_all(&vec![0; PROBE_BYTES])?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    written
}

/// A write whose caller was told it failed, as fjall journals it: its journal batch is
/// the first at or after `min_batch_seqno` holding this key in this keyspace. Cut from the
/// journal before the database is reopened, so it cannot come back on replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FailedWrite {
    pub keyspace_id: u64,
    pub key: Vec<u8>,
    pub min_batch_seqno: u64,
}

/// Whether the store takes writes, shared by every handle, the committer and the readers.
#[derive(Default)]
pub(super) struct WriteHealth {
    /// From a failed write until the database is reopened.
    failed: AtomicBool,
    /// Whether the failure, or the latest probe since, found the disk full.
    disk_full: AtomicBool,
    /// While the committer waits for readers to let go of the database to reopen it.
    reopening: AtomicBool,
    failed_writes: Mutex<Vec<FailedWrite>>,
}

impl WriteHealth {
    /// The error to refuse a write with, while a failure is not yet repaired.
    pub fn refusal(&self) -> Option<StoreError> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        Some(if self.disk_full.load(Ordering::SeqCst) {
            StoreError::OutOfSpace
        } else {
            StoreError::Recovering
        })
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Records a failed write (fjall is poisoned from now on) and returns the error for
    /// its caller. A failure that does not say why (fjall's `Poisoned`) is classified by
    /// probing the disk at once.
    pub fn note_failure(
        &self,
        data_dir: &Path,
        error: fjall::Error,
        failed_write: Option<FailedWrite>,
    ) -> StoreError {
        if let Some(failed_write) = failed_write {
            lock(&self.failed_writes).push(failed_write);
        }
        let out_of_space = is_out_of_space(&error);
        let first = !self.failed.swap(true, Ordering::SeqCst);
        if first {
            tracing::error!(%error, "a store write failed; writes are refused until it is repaired");
        }
        if out_of_space {
            self.disk_full.store(true, Ordering::SeqCst);
        } else if matches!(error, fjall::Error::Poisoned) && !self.disk_full.load(Ordering::SeqCst)
        {
            self.note_probe(&probe_free_space(data_dir));
        }
        match error {
            _ if out_of_space => StoreError::OutOfSpace,
            fjall::Error::Poisoned => self.refusal().unwrap_or(StoreError::Recovering),
            other => StoreError::Storage(other),
        }
    }

    /// Records what a probe of the disk found.
    pub fn note_probe(&self, probed: &std::io::Result<()>) {
        let full = probed
            .as_ref()
            .is_err_and(|error| is_out_of_space(error as &(dyn std::error::Error + 'static)));
        self.disk_full.store(full, Ordering::SeqCst);
    }

    pub fn is_reopening(&self) -> bool {
        self.reopening.load(Ordering::SeqCst)
    }

    pub fn set_reopening(&self, reopening: bool) {
        self.reopening.store(reopening, Ordering::SeqCst);
    }

    pub fn take_failed_writes(&self) -> Vec<FailedWrite> {
        std::mem::take(&mut lock(&self.failed_writes))
    }

    /// The database was reopened: writes are taken again.
    pub fn clear(&self) {
        self.disk_full.store(false, Ordering::SeqCst);
        self.failed.store(false, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends the process with one line on stderr when the store cannot be reopened in-process,
/// rather than refusing writes forever. Restarting fhirlog once the disk has room recovers
/// the store (a write refused before is not replayed).
pub(super) fn exit_unrecoverable(reason: &dyn std::fmt::Display) -> ! {
    eprintln!(
        "fhirlog: a store write failed (disk full?) and the store could not be reopened \
         in-process: {reason}; exiting with status {EXIT_STORE_UNRECOVERABLE}, restart \
         fhirlog once the disk has room"
    );
    std::process::exit(EXIT_STORE_UNRECOVERABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_recognised_through_fjalls_error_chain() {
        let full = || std::io::Error::from_raw_os_error(28);
        assert!(is_out_of_space(&fjall::Error::Io(full())));
        assert!(is_out_of_space(&fjall::Error::Storage(
            fjall::LsmError::Io(full())
        )));
        assert!(is_out_of_space(&fjall::Error::Io(
            std::io::Error::from_raw_os_error(122)
        )));
        assert!(!is_out_of_space(&fjall::Error::Io(
            std::io::Error::from_raw_os_error(5)
        )));
        assert!(!is_out_of_space(&fjall::Error::Poisoned));
    }

    #[test]
    fn a_failure_refuses_writes_until_cleared_and_says_whether_the_disk_is_full() {
        let directory = tempfile::tempdir().unwrap();
        let health = WriteHealth::default();
        assert!(health.refusal().is_none());
        let error = health.note_failure(
            directory.path(),
            fjall::Error::Io(std::io::Error::from_raw_os_error(28)),
            None,
        );
        assert!(matches!(error, StoreError::OutOfSpace), "{error}");
        assert!(matches!(health.refusal(), Some(StoreError::OutOfSpace)));
        health.note_probe(&probe_free_space(directory.path()));
        assert!(matches!(health.refusal(), Some(StoreError::Recovering)));
        health.clear();
        assert!(health.refusal().is_none());
        assert!(!directory.path().join(PROBE_FILE_NAME).exists());
    }
}
