//! Durability checked where SIGKILL cannot: the server runs under `strace`, which records
//! every fsync with the path it syncs and every response the server writes. An
//! acknowledged write must have fsynced the store before its 201 left the server, and
//! every file a manifest lists, and the folder holding them, must be fsynced before the
//! manifest is served.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::bulk::{BulkClient, KickOffRequest, Polling};
use support::{FhirClient, free_local_port};

/// `fhirlog serve` under `strace -f`, its trace written to a file.
struct TracedServer {
    child: Child,
    trace_path: PathBuf,
    client: FhirClient,
}

impl TracedServer {
    fn start(data_dir: &Path, trace_path: &Path) -> TracedServer {
        let port = free_local_port();
        let child = Command::new("strace")
            .args(["-f", "-y", "-tt", "-s", "96", "-o"])
            .arg(trace_path)
            .args([
                "-e",
                "trace=fsync,fdatasync,write,writev,sendto,sendmsg",
                env!("CARGO_BIN_EXE_fhirlog"),
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting fhirlog serve under strace (apt-get install strace)");
        let client = FhirClient::with_timeout(
            &format!("http://127.0.0.1:{port}/fhir"),
            Duration::from_secs(30),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client.is_serving() {
            assert!(Instant::now() < deadline, "the traced server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        TracedServer {
            child,
            trace_path: trace_path.to_owned(),
            client,
        }
    }

    /// Stops the server (strace's child) and returns the trace lines in time order.
    fn stop(mut self) -> Vec<String> {
        let _ = Command::new("pkill")
            .args(["-TERM", "-P"])
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.trace_path).expect("reading the trace");
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort_by(|first, second| timestamp_of(first).cmp(timestamp_of(second)));
        lines
    }
}

impl Drop for TracedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `PID HH:MM:SS.micros syscall(…)`: the time field sorts as text.
fn timestamp_of(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or_default()
}

fn is_sync(line: &str) -> bool {
    line.contains(" fsync(") || line.contains(" fdatasync(")
}

/// The path an fsync line syncs: `fsync(12</a/b>) = 0` → `/a/b`.
fn synced_path(line: &str) -> Option<&str> {
    let start = line.find('<')? + 1;
    let end = start + line[start..].find('>')?;
    Some(&line[start..end])
}

fn position_of_response(lines: &[String], after: usize, status_line: &str) -> usize {
    lines
        .iter()
        .enumerate()
        .skip(after)
        .find(|(_, line)| !is_sync(line) && line.contains(status_line))
        .map(|(index, _)| index)
        .unwrap_or_else(|| panic!("no response '{status_line}' in the trace after line {after}"))
}

#[test]
#[cfg_attr(
    not(fhirlog_test_root),
    ignore = "runs the server under strace with ptrace rights: needs root; CI runs as root"
)]
fn writes_and_export_files_are_fsynced_before_they_are_acknowledged() {
    let work = tempfile::tempdir().expect("a work folder");
    let data_dir = work.path().join("data");
    let server = TracedServer::start(&data_dir, &work.path().join("trace.txt"));
    let created = server.client.put_json(
        "/Patient/traced",
        &json!({"resourceType": "Patient", "id": "traced"}),
    );
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let bulk = BulkClient::new(&server.client.base_url);
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export?_type=Patient"));
    let manifest = bulk
        .poll_until_complete(&status_url, Polling::Eagerly)
        .manifest;
    let job_id = status_url.rsplit('/').next().expect("a job id").to_owned();
    let lines = server.stop();

    let store_dir = data_dir.display().to_string();
    let created_at = position_of_response(&lines, 0, "HTTP/1.1 201");
    let previous_response = lines[..created_at]
        .iter()
        .rposition(|line| !is_sync(line) && line.contains("HTTP/1.1 "))
        .unwrap_or(0);
    assert!(
        lines[previous_response..created_at]
            .iter()
            .any(|line| is_sync(line)
                && synced_path(line).is_some_and(|path| path.starts_with(&store_dir))),
        "no fsync of the store between the PUT and its 201:\n{}",
        lines[previous_response..=created_at].join("\n")
    );

    let accepted_at = position_of_response(&lines, created_at, "HTTP/1.1 202");
    let manifest_at = position_of_response(&lines, accepted_at, "HTTP/1.1 200");
    let synced_before_manifest: Vec<&str> = lines[accepted_at..manifest_at]
        .iter()
        .filter(|line| is_sync(line))
        .filter_map(|line| synced_path(line))
        .collect();
    let items = manifest["output"].as_array().expect("manifest output");
    assert!(!items.is_empty(), "{manifest}");
    for item in items {
        let url = item["url"].as_str().expect("a file URL");
        let file_name = url.rsplit('/').next().expect("a file name");
        let suffix = format!("/{job_id}/{file_name}");
        assert!(
            synced_before_manifest
                .iter()
                .any(|path| path.ends_with(&suffix)),
            "{file_name} was not fsynced before the manifest was served; synced: {synced_before_manifest:?}"
        );
    }
    let folder_suffix = format!("/{job_id}");
    assert!(
        synced_before_manifest
            .iter()
            .any(|path| path.ends_with(&folder_suffix)),
        "the job folder was not fsynced before the manifest was served; synced: {synced_before_manifest:?}"
    );
}
