//! An export folder that runs out of space fails the export within seconds with an
//! OperationOutcome saying so, deletes its parts, and leaves the server serving. Needs
//! root to mount a small tmpfs (CI runs as root).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::ServerProcess;
use support::bulk::{BulkClient, KickOffRequest};

/// A tmpfs of a few megabytes, unmounted on drop.
struct SmallFilesystem {
    mount_point: PathBuf,
}

impl SmallFilesystem {
    fn mount(mount_point: &Path, size: &str) -> SmallFilesystem {
        std::fs::create_dir_all(mount_point).expect("creating the mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(mount_point)
            .status()
            .expect("running mount");
        assert!(mounted.success(), "mounting a tmpfs needs root");
        SmallFilesystem {
            mount_point: mount_point.to_owned(),
        }
    }

    fn files_below(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut pending = vec![self.mount_point.clone()];
        while let Some(directory) = pending.pop() {
            for entry in std::fs::read_dir(&directory).expect("listing the tmpfs") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        files
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
    }
}

#[test]
#[cfg_attr(
    not(fhirlog_test_root),
    ignore = "mounting a small tmpfs needs root; CI runs as root"
)]
fn an_export_that_fills_its_disk_fails_within_seconds_and_deletes_its_parts() {
    let workspace = tempfile::tempdir().expect("a work folder");
    let exports = SmallFilesystem::mount(&workspace.path().join("exports"), "2m");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample");
    let storage = format!("file://{}", exports.mount_point.display());
    let server = ServerProcess::start_with_arguments(
        &workspace.path().join("store"),
        &[
            "--load",
            sample.to_str().expect("a UTF-8 path"),
            "--storage",
            &storage,
        ],
    );
    let bulk = BulkClient::new(&server.base_url);
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));
    let (failure, _) = bulk.poll_until_finished(&status_url, Duration::from_secs(30));
    assert!(failure.status.is_server_error(), "{}", failure.text);
    let outcome = failure.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    assert!(
        outcome.to_string().contains("space"),
        "the outcome does not say the disk is full: {outcome}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exports.files_below().is_empty() {
        assert!(
            Instant::now() < deadline,
            "parts of the failed export were left: {:?}",
            exports.files_below()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metadata = server.client.get("/metadata");
    assert_eq!(metadata.status, StatusCode::OK);
    bulk.kick_off(&KickOffRequest::get("/$export?_type=Organization"));
}
