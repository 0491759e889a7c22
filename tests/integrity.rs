//! Integrity of the store under faults the other suites cannot provoke: a journal fsync
//! that hangs or fails (an `LD_PRELOAD` library built here gates `fsync`/`fdatasync` of
//! fjall's `.jnl` files), a full commit queue, and a `fhirlog rebuild` killed with SIGKILL.
//!
//! The fsync scenarios run in a child process (this test binary again, running one ignored
//! `child_*` test) because the library must be preloaded when the process starts.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant as WallClock};

use fhirlog::fhir::canonical::{DEFAULT_MAX_JSON_DEPTH, ParsedResource};
use fhirlog::fhir::{LocalBase, ResourceId, ResourceType};
use fhirlog::store::{
    PreparedResource, Store, StoreError, StoreOptions, StoredVersion, UnchangedContent,
    WriteOperation, WriteOutcome,
};

/// The directory holding the gate's control files; set only in child processes.
const GATE_DIRECTORY_VARIABLE: &str = "FHIRLOG_FSYNC_GATE_DIR";
/// While this file exists in the gate directory, journal fsyncs wait.
const HOLD_FILE: &str = "hold";
/// Created by the gate while a journal fsync is waiting.
const HELD_FILE: &str = "held";
/// While this file exists in the gate directory, the next journal fsync fails with EIO and
/// removes it (a transient disk error), so the store's repair that follows can succeed.
const FAIL_FILE: &str = "fail";

/// Longest bounded wait for a condition another thread or process brings about.
const CONDITION_TIMEOUT: Duration = Duration::from_secs(60);

const FSYNC_GATE_SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int is_journal(int fd) {
    char link[64];
    char target[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, target, sizeof target - 1);
    if (length < 5) return 0;
    target[length] = 0;
    return strcmp(target + length - 4, ".jnl") == 0;
}

static int control_file_exists(const char *directory, const char *name) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", directory, name);
    return access(path, F_OK) == 0;
}

static int gate(int fd) {
    const char *directory = getenv("FHIRLOG_FSYNC_GATE_DIR");
    if (directory == NULL || !is_journal(fd)) return 0;
    if (control_file_exists(directory, "hold")) {
        char held[PATH_MAX];
        snprintf(held, sizeof held, "%s/held", directory);
        close(open(held, O_CREAT | O_WRONLY, 0644));
        while (control_file_exists(directory, "hold")) usleep(1000);
        unlink(held);
    }
    if (control_file_exists(directory, "fail")) {
        char fail[PATH_MAX];
        snprintf(fail, sizeof fail, "%s/fail", directory);
        unlink(fail);
        errno = EIO;
        return -1;
    }
    return 0;
}

int fsync(int fd) {
    static int (*real_fsync)(int);
    if (gate(fd) != 0) return -1;
    if (real_fsync == NULL) real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real_fsync(fd);
}

int fdatasync(int fd) {
    static int (*real_fdatasync)(int);
    if (gate(fd) != 0) return -1;
    if (real_fdatasync == NULL) real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real_fdatasync(fd);
}
"#;

fn wait_until(description: &str, mut condition: impl FnMut() -> bool) {
    let started = WallClock::now();
    while !condition() {
        assert!(
            started.elapsed() < CONDITION_TIMEOUT,
            "timed out waiting until {description}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Compiles the fsync gate into `directory` with the system C compiler.
fn build_fsync_gate(directory: &Path) -> PathBuf {
    let source = directory.join("fsync_gate.c");
    let library = directory.join("libfsync_gate.so");
    std::fs::write(&source, FSYNC_GATE_SOURCE).expect("writing the gate's source");
    let compiled = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("running cc (a C compiler is needed to build the fsync gate)");
    assert!(
        compiled.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    library
}

/// Runs the ignored test `child_test_name` of this binary, alone in its own process.
fn run_child(child_test_name: &str, configure: impl FnOnce(&mut Command)) {
    let mut command = Command::new(std::env::current_exe().expect("this test binary's path"));
    command
        .args([
            "--exact",
            child_test_name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(Stdio::null());
    configure(&mut command);
    let output = command
        .output()
        .expect("running this test binary as a child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{child_test_name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs the ignored test `child_test_name` of this binary with the fsync gate preloaded.
fn run_child_under_fsync_gate(child_test_name: &str) {
    let workspace = tempfile::tempdir().expect("creating a temporary directory");
    let library = build_fsync_gate(workspace.path());
    let gate_directory = workspace.path().join("gate");
    std::fs::create_dir(&gate_directory).expect("creating the gate directory");
    run_child(child_test_name, |command| {
        command
            .env("LD_PRELOAD", &library)
            .env(GATE_DIRECTORY_VARIABLE, &gate_directory);
    });
}

fn gate_control_file(name: &str) -> PathBuf {
    let directory = std::env::var_os(GATE_DIRECTORY_VARIABLE)
        .expect("child tests run only through their parent test, under the fsync gate");
    Path::new(&directory).join(name)
}

fn patient(id: &str, family_name: &str) -> WriteOperation {
    let text = format!(
        r#"{{"resourceType":"Patient","id":"{id}","name":[{{"family":"{family_name}"}}]}}"#
    );
    let parsed = ParsedResource::parse_bytes(text.as_bytes(), DEFAULT_MAX_JSON_DEPTH)
        .expect("a valid Patient");
    let id = parsed.id.clone().expect("the Patient has an id");
    WriteOperation::Update {
        resource: PreparedResource::new(
            parsed.resource_type,
            id,
            parsed.json,
            &LocalBase::relative_only(),
        ),
        expected_version: None,
        unchanged: UnchangedContent::NewVersion,
    }
}

fn resource_id(text: &str) -> ResourceId {
    ResourceId::parse(text).expect("a valid id")
}

fn read_patient(store: &Store, id: &str) -> Option<StoredVersion> {
    store
        .read_current(ResourceType::PATIENT, &resource_id(id))
        .expect("reading a Patient")
}

fn seq_of(outcomes: &[WriteOutcome]) -> u64 {
    match &outcomes[0] {
        WriteOutcome::Created { version } | WriteOutcome::Updated { version } => version.seq,
        other => panic!("expected a new version, got {other:?}"),
    }
}

#[test]
fn a_write_is_invisible_until_its_journal_fsync_returns() {
    run_child_under_fsync_gate("child_a_write_is_invisible_while_its_fsync_is_pending");
}

#[test]
#[ignore = "a child of a_write_is_invisible_until_its_journal_fsync_returns, which runs it under the fsync gate"]
fn child_a_write_is_invisible_while_its_fsync_is_pending() {
    let directory = tempfile::tempdir().expect("creating a temporary directory");
    let store = Store::open(directory.path(), &StoreOptions::default()).expect("opening");
    store.commit(vec![patient("p0", "Before")]).expect("p0");
    let hold = gate_control_file(HOLD_FILE);
    std::fs::write(&hold, b"").expect("closing the gate");
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || store.commit(vec![patient("p1", "Pending")]))
    };
    wait_until("the write's journal fsync is held", || {
        gate_control_file(HELD_FILE).exists()
    });
    assert_eq!(
        read_patient(&store, "p1"),
        None,
        "a read saw a write whose journal fsync had not returned"
    );
    assert_eq!(store.high_water_seq().expect("high-water seq"), 1);
    std::fs::remove_file(&hold).expect("opening the gate");
    let outcomes = writer
        .join()
        .expect("the writer thread")
        .expect("the held write succeeds once its fsync returns");
    assert_eq!(seq_of(&outcomes), 2);
    assert!(read_patient(&store, "p1").is_some());
}

#[test]
fn a_write_whose_journal_fsync_fails_never_becomes_visible() {
    run_child_under_fsync_gate("child_a_write_whose_fsync_fails_never_becomes_visible");
}

#[test]
#[ignore = "a child of a_write_whose_journal_fsync_fails_never_becomes_visible, which runs it under the fsync gate"]
fn child_a_write_whose_fsync_fails_never_becomes_visible() {
    let directory = tempfile::tempdir().expect("creating a temporary directory");
    let first_seq = {
        let store = Store::open(directory.path(), &StoreOptions::default()).expect("opening");
        let first_seq = seq_of(&store.commit(vec![patient("p0", "Before")]).expect("p0"));
        let fail = gate_control_file(FAIL_FILE);
        std::fs::write(&fail, b"").expect("making fsyncs fail");
        let failed = store.commit(vec![patient("p1", "Failed")]);
        assert!(matches!(failed, Err(StoreError::Storage(_))), "{failed:?}");
        assert_eq!(
            read_patient(&store, "p1"),
            None,
            "a write whose fsync failed is visible"
        );
        assert_eq!(store.high_water_seq().expect("high-water seq"), first_seq);
        assert!(!fail.exists(), "the gate failed exactly one journal fsync");
        first_seq
    };
    let reopened = Store::open(directory.path(), &StoreOptions::default()).expect("reopening");
    let before_reopen = read_patient(&reopened, "p0").expect("p0 survives");
    assert_eq!(before_reopen.seq, first_seq);
    let next_seq = seq_of(&reopened.commit(vec![patient("p2", "After")]).expect("p2"));
    assert!(next_seq > first_seq);
    if let Some(replayed) = read_patient(&reopened, "p1") {
        assert_ne!(replayed.seq, next_seq, "a seq was used twice");
        assert!(replayed.body.expect("a body").contains("Failed"));
    }
    assert_eq!(read_patient(&reopened, "p0"), Some(before_reopen));
}

#[test]
fn writers_wait_while_the_commit_queue_is_full_and_every_write_lands() {
    run_child_under_fsync_gate("child_writers_wait_while_the_commit_queue_is_full");
}

#[test]
fn a_group_staged_on_a_write_whose_fsync_fails_is_refused_and_the_store_recovers() {
    run_child_under_fsync_gate("child_a_group_staged_on_a_write_whose_fsync_fails_is_refused");
}

/// The committer stages a group while the applier commits the one before; when that commit
/// fails, the group staged on top of it (an If-Match on the failed write's version) must
/// not land either, and the store must take writes again once it has repaired itself.
#[test]
#[ignore = "a child of a_group_staged_on_a_write_whose_fsync_fails_is_refused_and_the_store_recovers, which runs it under the fsync gate"]
fn child_a_group_staged_on_a_write_whose_fsync_fails_is_refused() {
    let HeldCommitter {
        _directory,
        store,
        hold,
        stuck_writer,
    } = HeldCommitter::start(StoreOptions::default().max_queued_commits);
    let WriteOperation::Update {
        resource,
        unchanged,
        ..
    } = patient("stuck", "On top")
    else {
        unreachable!("patient() builds an update")
    };
    let staged_on_top = store.submit(vec![WriteOperation::Update {
        resource,
        expected_version: Some(1),
        unchanged,
    }]);
    wait_until("the committer took the write on top", || {
        store.queued_commits() == 0
    });
    std::fs::write(gate_control_file(FAIL_FILE), b"").expect("making the held fsync fail");
    std::fs::remove_file(&hold).expect("opening the gate");
    let failed = stuck_writer.join().expect("the stuck writer's thread");
    assert!(matches!(failed, Err(StoreError::Storage(_))), "{failed:?}");
    let on_top = staged_on_top.wait();
    assert!(
        matches!(on_top, Err(StoreError::Recovering | StoreError::Storage(_))),
        "a write staged on a failed one was answered {on_top:?}"
    );
    assert_eq!(read_patient(&store, "stuck"), None);
    let mut after = store.commit(vec![patient("p2", "After")]);
    let started = WallClock::now();
    while matches!(after, Err(StoreError::Recovering)) && started.elapsed() < CONDITION_TIMEOUT {
        std::thread::sleep(Duration::from_millis(10));
        after = store.commit(vec![patient("p2", "After")]);
    }
    after.expect("the store takes writes again after repairing itself");
    assert_eq!(read_patient(&store, "stuck"), None);
}

/// A store whose committer is held inside the journal fsync of one write (under the fsync
/// gate), with a commit queue of `queue_capacity`; removing `hold` lets it go on.
struct HeldCommitter {
    _directory: tempfile::TempDir,
    store: Store,
    hold: PathBuf,
    stuck_writer: std::thread::JoinHandle<Result<Vec<WriteOutcome>, StoreError>>,
}

impl HeldCommitter {
    fn start(queue_capacity: usize) -> HeldCommitter {
        let directory = tempfile::tempdir().expect("creating a temporary directory");
        let options = StoreOptions {
            max_queued_commits: queue_capacity,
            ..StoreOptions::default()
        };
        let store = Store::open(directory.path(), &options).expect("opening");
        let hold = gate_control_file(HOLD_FILE);
        std::fs::write(&hold, b"").expect("closing the gate");
        let stuck_writer = {
            let store = store.clone();
            std::thread::spawn(move || store.commit(vec![patient("stuck", "Stuck")]))
        };
        wait_until("the committer is held in a journal fsync", || {
            gate_control_file(HELD_FILE).exists()
        });
        HeldCommitter {
            _directory: directory,
            store,
            hold,
            stuck_writer,
        }
    }
}

#[test]
#[ignore = "a child of writers_wait_while_the_commit_queue_is_full_and_every_write_lands, which runs it under the fsync gate"]
fn child_writers_wait_while_the_commit_queue_is_full() {
    const QUEUE_CAPACITY: usize = 4;
    const QUEUED_WRITES: usize = 10;
    const STAGED_WRITES: usize = 2;
    let HeldCommitter {
        _directory,
        store,
        hold,
        stuck_writer,
    } = HeldCommitter::start(QUEUE_CAPACITY);
    // While the held group is applied the committer stages two more: one waits for the
    // applier in the channel between them, the other in the committer's hands. Neither is
    // in the queue.
    let staged: Vec<_> = (0..STAGED_WRITES)
        .map(|index| {
            let pending = store.submit(vec![patient(&format!("staged{index}"), "Staged")]);
            wait_until("the committer took the staged write", || {
                store.queued_commits() == 0
            });
            pending
        })
        .collect();
    let submitted = Arc::new(AtomicUsize::new(0));
    let submitter = {
        let store = store.clone();
        let submitted = Arc::clone(&submitted);
        std::thread::spawn(move || {
            (0..QUEUED_WRITES)
                .map(|index| {
                    let pending = store.submit(vec![patient(&format!("q{index}"), "Queued")]);
                    submitted.fetch_add(1, Ordering::SeqCst);
                    pending
                })
                .collect::<Vec<_>>()
        })
    };
    wait_until("the queue is full", || {
        submitted.load(Ordering::SeqCst) >= QUEUE_CAPACITY
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        submitted.load(Ordering::SeqCst),
        QUEUE_CAPACITY,
        "a submit returned although the commit queue was full"
    );
    std::fs::remove_file(&hold).expect("opening the gate");
    stuck_writer
        .join()
        .expect("the stuck writer's thread")
        .expect("the stuck write lands");
    for pending in staged {
        pending.wait().expect("a staged write lands");
    }
    for pending in submitter.join().expect("the submitter thread") {
        pending.wait().expect("a queued write lands");
    }
    for index in 0..QUEUED_WRITES {
        assert!(read_patient(&store, &format!("q{index}")).is_some());
    }
    assert_eq!(
        store.high_water_seq().expect("high-water seq"),
        (1 + STAGED_WRITES + QUEUED_WRITES) as u64
    );
}

/// Every version of every Patient `p{index}`, by (id, version).
fn every_version(store: &Store, patients: usize) -> BTreeMap<(String, u64), StoredVersion> {
    let mut versions = BTreeMap::new();
    for index in 0..patients {
        let id = format!("p{index}");
        for version in store
            .history(ResourceType::PATIENT, &resource_id(&id))
            .expect("reading a history")
        {
            versions.insert((id.clone(), version.version), version);
        }
    }
    versions
}

/// What process `process_id` has written so far (`wchar` in `/proc/PID/io`): a rebuild
/// writes nothing while it opens the store, then its batches.
fn bytes_written_by(process_id: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{process_id}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("wchar: "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

fn fhirlog(arguments: &[&OsStr]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhirlog"));
    command
        .args(arguments)
        .env_remove("FHIRLOG_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

fn wait_for_exit_within_timeout(mut child: Child, what: &str) -> Output {
    let started = WallClock::now();
    loop {
        if child.try_wait().expect("polling a child").is_some() {
            return child
                .wait_with_output()
                .expect("collecting a child's output");
        }
        if started.elapsed() > CONDITION_TIMEOUT {
            let _ = child.kill();
            let output = child
                .wait_with_output()
                .expect("collecting a child's output");
            panic!(
                "{what} was still running after {CONDITION_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_rebuild_killed_midway_is_refused_by_serve_and_finished_by_rebuild() {
    const PATIENTS: usize = 6_000;
    const VERSIONS: usize = 5;
    const PATIENTS_PER_COMMIT: usize = 500;
    /// About half of the first of three rebuild batches of this store.
    const REBUILD_BYTES_BEFORE_KILL: u64 = 1 << 20;
    let workspace = tempfile::tempdir().expect("creating a temporary directory");
    let data_dir = workspace.path().join("data");
    let before = {
        let store = Store::open(&data_dir, &StoreOptions::default()).expect("opening");
        for version in 0..VERSIONS {
            for first in (0..PATIENTS).step_by(PATIENTS_PER_COMMIT) {
                let operations = (first..first + PATIENTS_PER_COMMIT)
                    .map(|index| patient(&format!("p{index}"), &format!("V{version}")))
                    .collect();
                store.commit(operations).expect("committing a chunk");
            }
        }
        every_version(&store, PATIENTS)
    };
    assert_eq!(before.len(), PATIENTS * VERSIONS);
    let newest_seq_before = before
        .values()
        .map(|version| version.seq)
        .max()
        .unwrap_or(0);

    let mut rebuild = fhirlog(&[
        OsStr::new("rebuild"),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting fhirlog rebuild");
    wait_until("the rebuild has written a few batches", || {
        bytes_written_by(rebuild.id()) >= REBUILD_BYTES_BEFORE_KILL
            || rebuild.try_wait().expect("polling the rebuild").is_some()
    });
    assert!(
        rebuild.try_wait().expect("polling the rebuild").is_none(),
        "the rebuild finished before it could be killed; make the store bigger"
    );
    rebuild.kill().expect("SIGKILL to the rebuild");
    rebuild.wait().expect("reaping the rebuild");

    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("finding a free port")
        .to_string();
    let serve = fhirlog(&[
        OsStr::new("serve"),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
        OsStr::new("--listen"),
        OsStr::new(&listen),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting fhirlog serve");
    let refused = wait_for_exit_within_timeout(serve, "serve on a half-rebuilt store");
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "serve started: {refusal}");
    assert_eq!(refusal.trim().lines().count(), 1, "{refusal}");
    assert!(
        refusal.contains("half-rebuilt") && refusal.contains("fhirlog rebuild"),
        "{refusal}"
    );

    let repaired = wait_for_exit_within_timeout(
        fhirlog(&[
            OsStr::new("rebuild"),
            OsStr::new("--data-dir"),
            data_dir.as_os_str(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fhirlog rebuild again"),
        "the second rebuild",
    );
    assert!(
        repaired.status.success(),
        "{}",
        String::from_utf8_lossy(&repaired.stderr)
    );

    let store = Store::open(&data_dir, &StoreOptions::default()).expect("opening after repair");
    assert_eq!(every_version(&store, PATIENTS), before);
    for first in (0..PATIENTS).step_by(PATIENTS_PER_COMMIT) {
        let operations = (first..first + PATIENTS_PER_COMMIT)
            .map(|index| patient(&format!("p{index}"), "After"))
            .collect();
        let outcomes = store.commit(operations).expect("writing after the repair");
        for outcome in &outcomes {
            assert!(seq_of(std::slice::from_ref(outcome)) > newest_seq_before);
        }
    }
    let after = every_version(&store, PATIENTS);
    assert_eq!(after.len(), PATIENTS * (VERSIONS + 1));
    for (key, version) in &before {
        assert_eq!(after.get(key), Some(version), "{key:?} changed");
    }
}

/// Peak resident memory of this process so far (`VmHWM` in `/proc/self/status`).
fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .expect("a VmHWM line");
    kilobytes * 1024
}

fn gzip_member(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).expect("compressing in memory");
    encoder.finish().expect("compressing in memory")
}

#[test]
fn a_gzip_line_that_inflates_past_the_cap_is_refused_without_inflating_it() {
    run_child(
        "child_a_gzip_line_that_inflates_past_the_cap_is_refused",
        |_| {},
    );
}

#[test]
#[ignore = "a child of a_gzip_line_that_inflates_past_the_cap_is_refused_without_inflating_it, which runs it alone so that its peak memory is its own"]
fn child_a_gzip_line_that_inflates_past_the_cap_is_refused() {
    use fhirlog::load::{LoadOptions, OnError, ProblemLocation, load};
    const CAP: usize = 1 << 20;
    const INFLATED_MEBIBYTES: usize = 512;
    let inputs = tempfile::tempdir().expect("creating a temporary directory");
    let bomb = inputs.path().join("Patient.ndjson.gz");
    let mut compressed = gzip_member(
        br#"{"resourceType":"Patient","id":"before"}
{"resourceType":"Patient","id":"bomb","gender":""#,
    );
    let one_mebibyte_member = gzip_member(&vec![b'a'; 1 << 20]);
    for _ in 0..INFLATED_MEBIBYTES {
        compressed.extend_from_slice(&one_mebibyte_member);
    }
    compressed.extend_from_slice(&gzip_member(
        br#""}
{"resourceType":"Patient","id":"after"}
"#,
    ));
    assert!(compressed.len() < 4 << 20);
    std::fs::write(&bomb, &compressed).expect("writing the gzip file");
    let data = tempfile::tempdir().expect("creating a temporary directory");
    let store = Store::open(data.path(), &StoreOptions::default()).expect("opening");

    let summary = load(
        &store,
        &LoadOptions {
            paths: vec![bomb.clone()],
            on_error: OnError::Skip,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            show_progress: false,
            max_document_bytes: CAP,
            local_base: LocalBase::relative_only(),
        },
    )
    .expect("loading with --on-error skip");

    assert_eq!(summary.written(), 1, "only the line before the bomb");
    assert_eq!(summary.skipped.len(), 1, "{:?}", summary.skipped);
    assert_eq!(summary.skipped[0].location, ProblemLocation::Line(2));
    assert!(
        summary.skipped[0]
            .reason
            .contains("longer than the limit of 1048576 bytes"),
        "{}",
        summary.skipped[0]
    );
    let peak = peak_resident_bytes();
    assert!(
        peak < ((INFLATED_MEBIBYTES as u64) << 20) / 2,
        "peak RSS {peak} bytes while the line inflates to {INFLATED_MEBIBYTES} MiB"
    );
}

#[test]
fn async_writers_never_block_a_runtime_thread_on_a_full_commit_queue() {
    run_child_under_fsync_gate("child_async_writers_wait_without_blocking_the_runtime");
}

#[test]
#[ignore = "a child of async_writers_never_block_a_runtime_thread_on_a_full_commit_queue, which runs it under the fsync gate"]
fn child_async_writers_wait_without_blocking_the_runtime() {
    const QUEUE_CAPACITY: usize = 2;
    const WRITES: usize = 8;
    const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(20);
    let HeldCommitter {
        _directory,
        store,
        hold,
        stuck_writer,
    } = HeldCommitter::start(QUEUE_CAPACITY);
    let submits_returned = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let submits_returned = Arc::clone(&submits_returned);
        let hold = hold.clone();
        std::thread::spawn(move || {
            let started = WallClock::now();
            while !submits_returned.load(Ordering::SeqCst) {
                if started.elapsed() > WATCHDOG_TIMEOUT {
                    std::fs::remove_file(&hold).expect("opening the gate");
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        })
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let pending: Vec<_> = runtime.block_on(async {
        (0..WRITES)
            .map(|index| store.submit(vec![patient(&format!("a{index}"), "Async")]))
            .collect()
    });
    submits_returned.store(true, Ordering::SeqCst);
    assert!(
        !watchdog.join().expect("the watchdog thread"),
        "submit blocked the runtime thread until the watchdog opened the gate"
    );
    std::fs::remove_file(&hold).expect("opening the gate");
    let outcomes = runtime.block_on(async {
        let mut outcomes = Vec::new();
        for commit in pending {
            outcomes.push(commit.wait_async().await);
        }
        outcomes
    });
    for outcome in outcomes {
        outcome.expect("an async write lands");
    }
    stuck_writer
        .join()
        .expect("the stuck writer's thread")
        .expect("the stuck write lands");
    for index in 0..WRITES {
        assert!(read_patient(&store, &format!("a{index}")).is_some());
    }
}
