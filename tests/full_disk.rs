//! Full disks. An export folder that runs out of space fails the export within seconds
//! with an OperationOutcome saying so, deletes its parts, and leaves the server serving.
//! A store whose disk fills refuses writes with 507 (never 500) while reads, history,
//! metadata and exports of stored data go on, and takes writes again by itself once
//! space is freed; a refused write never appears, also after a restart; a store that
//! cannot be reopened in-process exits with one line. Needs root to mount a small tmpfs
//! (CI runs as root).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::bulk::{BulkClient, Completion, Downloads, KickOffRequest, key};
use support::{FhirClient, Reply, ServerProcess};

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

    /// A file that fills part of the file system until it is deleted.
    fn filler(&self) -> PathBuf {
        self.mount_point.join("filler")
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

/// Size of the store's file system in the store tests, and of the file that fills part
/// of it until it is deleted to free space (more than the store's 1 MiB probe).
const STORE_FILESYSTEM_SIZE: &str = "8m";
const FILLER_BYTES: usize = 3 << 20;

/// A server whose data directory is a small tmpfs holding a filler file; exports go to a
/// folder outside it. Dropped in field order: the server stops before the unmount.
struct FullStoreDisk {
    server: ServerProcess,
    store_filesystem: SmallFilesystem,
    workspace: tempfile::TempDir,
}

impl FullStoreDisk {
    fn start() -> FullStoreDisk {
        let workspace = tempfile::tempdir().expect("a work folder");
        let store_filesystem =
            SmallFilesystem::mount(&workspace.path().join("data"), STORE_FILESYSTEM_SIZE);
        std::fs::write(store_filesystem.filler(), vec![1u8; FILLER_BYTES]).expect("the filler");
        let server = FullStoreDisk::start_server(workspace.path(), &store_filesystem.mount_point);
        FullStoreDisk {
            server,
            store_filesystem,
            workspace,
        }
    }

    fn start_server(workspace: &Path, data_dir: &Path) -> ServerProcess {
        let exports = workspace.join("exports");
        std::fs::create_dir_all(&exports).expect("the export folder");
        ServerProcess::start_with_arguments(
            data_dir,
            &["--storage", &format!("file://{}", exports.display())],
        )
    }

    fn restart(&mut self) {
        let status = self.server.terminate();
        assert!(status.success(), "the server stopped with {status}");
        self.server =
            FullStoreDisk::start_server(self.workspace.path(), &self.store_filesystem.mount_point);
    }

    /// PUTs Patients of about `body_bytes` each until one is refused; every answer is a
    /// 201 or the 507. Returns the ids stored and the id refused.
    fn fill(&self, prefix: &str, body_bytes: usize) -> (Vec<String>, String) {
        let mut stored = Vec::new();
        for index in 0..100_000 {
            let id = format!("{prefix}{index}");
            let reply = put_patient(&self.server.client, &id, body_bytes);
            match reply.status {
                StatusCode::CREATED => stored.push(id),
                StatusCode::INSUFFICIENT_STORAGE => {
                    assert_store_full_outcome(&reply);
                    return (stored, id);
                }
                other => panic!(
                    "writing {id} on a filling disk answered {other}: {}; server log:\n{}",
                    reply.text,
                    self.server.log()
                ),
            }
        }
        panic!("the store's disk never filled up")
    }

    fn server_root_client(&self) -> FhirClient {
        let root = self
            .server
            .base_url
            .strip_suffix("/fhir")
            .expect("a base URL ending in /fhir");
        FhirClient::with_timeout(root, Duration::from_secs(30))
    }
}

/// PUTs a Patient whose name is about `body_bytes` of text that does not compress, so
/// the disk fills as fast as the bytes written.
fn put_patient(client: &FhirClient, id: &str, body_bytes: usize) -> Reply {
    let mut state = id.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |state, byte| {
        (state ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    });
    let text: String = (0..body_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    client.put_json(
        &format!("/Patient/{id}"),
        &json!({"resourceType": "Patient", "id": id, "name": [{"text": text}]}),
    )
}

fn assert_store_full_outcome(reply: &Reply) {
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    assert!(
        outcome.to_string().contains("disk is full"),
        "the outcome does not say the store's disk is full: {outcome}"
    );
}

/// Ids among `ids` that GET /Patient/{id} finds.
fn readable_patients<'a>(
    client: &FhirClient,
    ids: impl Iterator<Item = &'a String>,
) -> BTreeSet<String> {
    ids.filter(|id| {
        let reply = client.get(&format!("/Patient/{id}"));
        assert!(
            matches!(reply.status, StatusCode::OK | StatusCode::NOT_FOUND),
            "reading {id} answered {}: {}",
            reply.status,
            reply.text
        );
        reply.status == StatusCode::OK
    })
    .cloned()
    .collect()
}

/// Fills the store's disk with writes of `body_bytes`, checks what still works, frees
/// space and measures how long until writes are taken again; then checks that no refused
/// write appears, before and after a restart.
fn store_disk_fills_and_recovers(body_bytes: usize) {
    let mut disk = FullStoreDisk::start();
    let client = disk.server.client.clone();
    put_patient(&client, "before", 10).expect_json(StatusCode::CREATED);
    let (stored, refused_first) = disk.fill("filling-", body_bytes);
    assert!(!stored.is_empty(), "the disk was full before any write");

    let started = Instant::now();
    let refused_again = put_patient(&client, "refused-again", 10);
    assert_eq!(
        refused_again.status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{}",
        refused_again.text
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a write on a full store waited {:?}",
        started.elapsed()
    );
    assert_store_full_outcome(&refused_again);
    let refused = [refused_first, "refused-again".to_owned()];
    client.get("/Patient/before").expect_json(StatusCode::OK);
    client
        .get("/Patient/before/_history")
        .expect_json(StatusCode::OK);
    client.get("/metadata").expect_json(StatusCode::OK);
    let health = disk.server_root_client().get("/healthz");
    assert_eq!(
        health.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        health.text
    );
    let checks = health.json()["checks"].clone();
    assert_eq!(checks["store"]["status"], "fail", "{checks}");
    assert!(
        checks["store"]["output"]
            .to_string()
            .contains("disk is full"),
        "{checks}"
    );
    let bulk = BulkClient::new(&disk.server.base_url);
    let kick_off = bulk.send_kick_off(&KickOffRequest::get("/Patient/$export"));
    assert_eq!(
        kick_off.status,
        StatusCode::INSUFFICIENT_STORAGE,
        "an export kick-off on a full store: {}",
        kick_off.text
    );
    assert_store_full_outcome(&kick_off);

    std::fs::remove_file(disk.store_filesystem.filler()).expect("freeing space");
    let freed = Instant::now();
    loop {
        let reply = put_patient(&client, "after", 10);
        match reply.status {
            StatusCode::CREATED => break,
            StatusCode::INSUFFICIENT_STORAGE | StatusCode::SERVICE_UNAVAILABLE => {
                assert!(
                    freed.elapsed() < Duration::from_secs(10),
                    "writes were still refused {:?} after space was freed: {}; server log:\n{}",
                    freed.elapsed(),
                    reply.text,
                    disk.server.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            other => panic!(
                "a write after space was freed answered {other}: {}",
                reply.text
            ),
        }
    }
    eprintln!(
        "{body_bytes}-byte writes: {} stored until the disk filled; writes taken again {:.2} s after space was freed",
        stored.len(),
        freed.elapsed().as_secs_f64()
    );
    health_passes_soon(&disk);

    let status_url = bulk.kick_off(&KickOffRequest::get("/Patient/$export"));
    let (completion, _) = bulk.poll_until_finished(&status_url, Duration::from_secs(60));
    assert_eq!(completion.status, StatusCode::OK, "{}", completion.text);
    let exported = bulk
        .download(
            Completion::of_manifest(&status_url, completion.json()),
            Downloads::PlainOnly,
        )
        .output_keys();
    for id in stored
        .iter()
        .chain(["before".to_owned(), "after".to_owned()].iter())
    {
        assert!(
            exported.contains(&key("Patient", id)),
            "{id} is missing from the export"
        );
    }
    for id in &refused {
        assert!(
            !exported.contains(&key("Patient", id)),
            "the refused write {id} was exported"
        );
    }

    let all_ids: Vec<String> = stored.iter().chain(refused.iter()).cloned().collect();
    let expected: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(readable_patients(&client, all_ids.iter()), expected);
    disk.restart();
    let client = disk.server.client.clone();
    assert_eq!(readable_patients(&client, all_ids.iter()), expected);
    client.get("/Patient/after").expect_json(StatusCode::OK);
}

fn health_passes_soon(disk: &FullStoreDisk) {
    let operator = disk.server_root_client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = operator.get("/healthz");
        if health.status == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still fails: {}",
            health.text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[cfg_attr(
    not(fhirlog_test_root),
    ignore = "mounting a small tmpfs needs root; CI runs as root"
)]
fn a_store_disk_filled_by_large_writes_refuses_them_with_507_and_recovers_by_itself() {
    store_disk_fills_and_recovers(64 << 10);
}

#[test]
#[cfg_attr(
    not(fhirlog_test_root),
    ignore = "mounting a small tmpfs needs root; CI runs as root"
)]
fn a_store_disk_filled_by_small_writes_refuses_them_with_507_and_recovers_by_itself() {
    store_disk_fills_and_recovers(2 << 10);
}

/// When the store cannot be reopened in-process (here its fjall version file was damaged
/// while the disk was full) the server exits with one line instead of refusing writes
/// forever; a restart once the damage is repaired serves every acknowledged write and no
/// refused one.
#[test]
#[cfg_attr(
    not(fhirlog_test_root),
    ignore = "mounting a small tmpfs needs root; CI runs as root"
)]
fn a_store_that_cannot_be_reopened_in_process_exits_with_one_line() {
    let mut disk = FullStoreDisk::start();
    let (stored, refused) = disk.fill("filling-", 64 << 10);
    let version_file = disk.store_filesystem.mount_point.join("store/version");
    let version = std::fs::read(&version_file).expect("fjall's version file");
    std::fs::write(&version_file, b"damaged").expect("damaging the version file");
    std::fs::remove_file(disk.store_filesystem.filler()).expect("freeing space");

    let status = disk.server.wait_for_exit();
    assert_eq!(status.code(), Some(75), "{}", disk.server.log());
    let log = disk.server.log();
    let exit_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("fhirlog: "))
        .collect();
    assert_eq!(exit_lines.len(), 1, "{log}");
    assert!(
        exit_lines[0].contains("could not be reopened in-process")
            && exit_lines[0].contains("restart fhirlog"),
        "{}",
        exit_lines[0]
    );

    std::fs::write(&version_file, version).expect("repairing the version file");
    disk.server =
        FullStoreDisk::start_server(disk.workspace.path(), &disk.store_filesystem.mount_point);
    let client = disk.server.client.clone();
    let all_ids: Vec<String> = stored.iter().chain([&refused]).cloned().collect();
    assert_eq!(
        readable_patients(&client, all_ids.iter()),
        stored.iter().cloned().collect::<BTreeSet<String>>()
    );
    put_patient(&client, "after-restart", 10).expect_json(StatusCode::CREATED);
}
