//! Crash safety and the command line: the real `fhirlog` binary as a child process,
//! killed with SIGKILL mid-ingest, stopped with SIGTERM, and run as `load`, `rebuild`
//! and `gen`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fhirlog::config::RequestLimits;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{
    FhirClient, ServerProcess, fhirlog_command, free_local_port, run_fhirlog,
    spawn_app_in_data_dir, spawn_app_with_limits,
};
use tempfile::TempDir;

const WRITER_THREAD_COUNT: usize = 6;
const MINIMUM_INGEST_TIME: Duration = Duration::from_millis(1500);
const MAXIMUM_INGEST_TIME: Duration = Duration::from_secs(20);
const MINIMUM_ACKNOWLEDGED_WRITES_PER_CYCLE: usize = 2000;
const VERIFIER_THREAD_COUNT: usize = 4;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn patient(id: &str, family_name: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family_name}]})
}

fn family_name(resource: &Value) -> String {
    resource["name"][0]["family"]
        .as_str()
        .unwrap_or_else(|| panic!("resource has no name[0].family: {resource}"))
        .to_owned()
}

/// What the client was told: the id was written at `version` with `family_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AcknowledgedWrite {
    version: u64,
    family_name: String,
}

#[derive(Default)]
struct IngestResult {
    acknowledged: HashMap<String, AcknowledgedWrite>,
    /// Ids whose last write got no answer because the server was killed.
    in_flight_when_killed: Vec<String>,
}

/// Writers PUT as fast as they can: new ids, and in later cycles updates of ids
/// acknowledged earlier. The server is killed with SIGKILL while they are still writing.
fn ingest_then_kill_hard(
    server: &mut ServerProcess,
    cycle: usize,
    earlier: &HashMap<String, AcknowledgedWrite>,
) -> IngestResult {
    let killed = Arc::new(AtomicBool::new(false));
    let acknowledged_count = Arc::new(AtomicUsize::new(0));
    let mut ids_to_update: Vec<(String, u64)> = earlier
        .iter()
        .map(|(id, write)| (id.clone(), write.version))
        .collect();
    ids_to_update.sort();
    let writers: Vec<_> = (0..WRITER_THREAD_COUNT)
        .map(|writer_number| {
            let client = FhirClient::with_timeout(&server.base_url, Duration::from_secs(30));
            let killed = Arc::clone(&killed);
            let acknowledged_count = Arc::clone(&acknowledged_count);
            let updates: Vec<(String, u64)> = ids_to_update
                .iter()
                .skip(writer_number)
                .step_by(WRITER_THREAD_COUNT)
                .cloned()
                .collect();
            std::thread::spawn(move || {
                write_until_killed(
                    &client,
                    cycle,
                    writer_number,
                    updates,
                    &killed,
                    &acknowledged_count,
                )
            })
        })
        .collect();

    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let elapsed = started.elapsed();
        let finished_writers = writers.iter().filter(|writer| writer.is_finished()).count();
        assert_eq!(
            finished_writers,
            0,
            "a writer stopped before the kill; server log:\n{}",
            server.log()
        );
        if elapsed >= MAXIMUM_INGEST_TIME {
            break;
        }
        if elapsed >= MINIMUM_INGEST_TIME
            && acknowledged_count.load(Ordering::SeqCst) >= MINIMUM_ACKNOWLEDGED_WRITES_PER_CYCLE
        {
            break;
        }
    }
    killed.store(true, Ordering::SeqCst);
    server.kill_hard();

    let mut result = IngestResult::default();
    for writer in writers {
        let outcome = writer.join().expect("a writer thread panicked");
        result.acknowledged.extend(outcome.acknowledged);
        result.in_flight_when_killed.extend(outcome.in_flight);
    }
    result
}

struct WriterOutcome {
    acknowledged: Vec<(String, AcknowledgedWrite)>,
    in_flight: Option<String>,
}

fn write_until_killed(
    client: &FhirClient,
    cycle: usize,
    writer_number: usize,
    updates: Vec<(String, u64)>,
    killed: &AtomicBool,
    acknowledged_count: &AtomicUsize,
) -> WriterOutcome {
    let mut acknowledged = Vec::new();
    let mut pending_updates = updates.into_iter();
    for write_number in 0.. {
        let update = if write_number % 3 == 0 {
            pending_updates.next()
        } else {
            None
        };
        let (id, expected_version) = match update {
            Some((id, earlier_version)) => (id, earlier_version + 1),
            None => (format!("durable-{cycle}-{writer_number}-{write_number}"), 1),
        };
        let family = format!("cycle-{cycle}-writer-{writer_number}-write-{write_number}");
        let answer = client.try_send(
            reqwest::Method::PUT,
            &format!("/Patient/{id}"),
            &[("Content-Type", support::FHIR_JSON)],
            Some(patient(&id, &family).to_string().into()),
        );
        match answer {
            Ok(reply) if reply.status.is_success() => {
                assert_eq!(
                    reply.etag_version(),
                    expected_version,
                    "{id}: {}",
                    reply.text
                );
                acknowledged.push((
                    id,
                    AcknowledgedWrite {
                        version: expected_version,
                        family_name: family,
                    },
                ));
                acknowledged_count.fetch_add(1, Ordering::SeqCst);
            }
            Ok(reply) => {
                assert!(
                    killed.load(Ordering::SeqCst),
                    "{id} got {} before the kill: {}",
                    reply.status,
                    reply.text
                );
                return WriterOutcome {
                    acknowledged,
                    in_flight: Some(id),
                };
            }
            Err(error) => {
                assert!(
                    killed.load(Ordering::SeqCst),
                    "{id} got no answer before the kill: {error}"
                );
                return WriterOutcome {
                    acknowledged,
                    in_flight: Some(id),
                };
            }
        }
    }
    unreachable!("the write loop only ends when the server is killed")
}

/// Every acknowledged write is readable at its acknowledged version with its content; a
/// newer version exists only for a write that was in flight at the kill.
fn assert_every_acknowledged_write_is_durable(
    server: &ServerProcess,
    acknowledged: &HashMap<String, AcknowledgedWrite>,
    in_flight_when_killed: &[String],
) {
    let mut ids: Vec<(String, AcknowledgedWrite)> = acknowledged
        .iter()
        .map(|(id, write)| (id.clone(), write.clone()))
        .collect();
    ids.sort_by(|left, right| left.0.cmp(&right.0));
    let in_flight: Arc<Vec<String>> = Arc::new(in_flight_when_killed.to_vec());
    let verifiers: Vec<_> = (0..VERIFIER_THREAD_COUNT)
        .map(|verifier_number| {
            let client = server.client.clone();
            let in_flight = Arc::clone(&in_flight);
            let share: Vec<(String, AcknowledgedWrite)> = ids
                .iter()
                .skip(verifier_number)
                .step_by(VERIFIER_THREAD_COUNT)
                .cloned()
                .collect();
            std::thread::spawn(move || {
                for (id, write) in share {
                    let current = client.get(&format!("/Patient/{id}"));
                    assert_eq!(
                        current.status,
                        StatusCode::OK,
                        "acknowledged {id} is lost: {}",
                        current.text
                    );
                    let current_version = current.etag_version();
                    if current_version == write.version {
                        assert_eq!(family_name(&current.json()), write.family_name, "{id}");
                        continue;
                    }
                    assert!(
                        current_version == write.version + 1 && in_flight.contains(&id),
                        "{id} was acknowledged at version {} but is at version {current_version}",
                        write.version
                    );
                    let acknowledged_version =
                        client.get(&format!("/Patient/{id}/_history/{}", write.version));
                    assert_eq!(acknowledged_version.status, StatusCode::OK, "{id}");
                    assert_eq!(
                        family_name(&acknowledged_version.json()),
                        write.family_name,
                        "{id}"
                    );
                }
            })
        })
        .collect();
    for verifier in verifiers {
        verifier.join().expect("a verifier thread panicked");
    }
}

fn assert_log_has_no_errors(server: &ServerProcess) {
    let log = server.log();
    for alarming in ["panicked", "ERROR", "corrupt"] {
        assert!(
            !log.contains(alarming),
            "server log mentions '{alarming}':\n{log}"
        );
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_mid_ingest_and_a_restart() {
    let workspace = TempDir::new().expect("a temporary folder");
    let data_dir = workspace.path().join("data");
    let mut all_acknowledged: HashMap<String, AcknowledgedWrite> = HashMap::new();
    let mut total_acknowledged_writes = 0;

    for cycle in 0..2 {
        let mut server = ServerProcess::start(&data_dir);
        assert_log_has_no_errors(&server);
        let result = ingest_then_kill_hard(&mut server, cycle, &all_acknowledged);
        assert!(
            result.acknowledged.len() >= MINIMUM_ACKNOWLEDGED_WRITES_PER_CYCLE,
            "only {} writes were acknowledged in cycle {cycle}",
            result.acknowledged.len()
        );
        total_acknowledged_writes += result.acknowledged.len();
        all_acknowledged.extend(result.acknowledged);

        let restarted = ServerProcess::start(&data_dir);
        assert_every_acknowledged_write_is_durable(
            &restarted,
            &all_acknowledged,
            &result.in_flight_when_killed,
        );
        assert_log_has_no_errors(&restarted);
        drop(restarted);
    }

    let mut final_server = ServerProcess::start(&data_dir);
    let (sample_id, sample_write) = all_acknowledged
        .iter()
        .min_by(|left, right| left.0.cmp(right.0))
        .expect("some write was acknowledged");
    let current_version = final_server
        .client
        .get(&format!("/Patient/{sample_id}"))
        .etag_version();
    assert!(current_version >= sample_write.version);
    let next = final_server.client.put_json(
        &format!("/Patient/{sample_id}"),
        &patient(sample_id, "After"),
    );
    assert_eq!(next.status, StatusCode::OK, "{}", next.text);
    assert_eq!(next.etag_version(), current_version + 1);
    let created = final_server
        .client
        .post_json("/Patient", &patient("ignored", "Created after crashes"));
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert!(total_acknowledged_writes >= 2 * MINIMUM_ACKNOWLEDGED_WRITES_PER_CYCLE);
    assert!(final_server.terminate().success());
}

/// Runs the binary with `arguments`, failing the test if it has not exited in time.
fn run_fhirlog_with_timeout(arguments: &[&OsStr]) -> Output {
    let mut child = fhirlog_command()
        .args(arguments)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fhirlog");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait().expect("polling fhirlog").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collecting fhirlog output");
            panic!(
                "fhirlog {arguments:?} did not exit within {COMMAND_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting fhirlog output")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_exits_non_zero_saying_the_data_directory_is_in_use(output: &Output, what: &str) {
    let stderr = stderr_of(output);
    assert!(
        !output.status.success(),
        "{what} succeeded on a held data directory; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("in use"),
        "{what} does not say the data directory is in use:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{what} panicked:\n{stderr}"
    );
}

#[test]
fn commands_on_a_data_directory_held_by_a_running_server_exit_non_zero_saying_it_is_in_use() {
    let workspace = TempDir::new().expect("a temporary folder");
    let data_dir = workspace.path().join("data");
    let mut server = ServerProcess::start(&data_dir);
    server
        .client
        .put_json("/Patient/held", &patient("held", "Held"));
    let input_file = workspace.path().join("Patient.ndjson");
    std::fs::write(
        &input_file,
        format!("{}\n", patient("from-second-loader", "Second")),
    )
    .expect("writing an ndjson file");
    let second_listen_address = format!("127.0.0.1:{}", free_local_port());

    let second_serve = run_fhirlog_with_timeout(&[
        OsStr::new("serve"),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
        OsStr::new("--listen"),
        OsStr::new(&second_listen_address),
    ]);
    assert_exits_non_zero_saying_the_data_directory_is_in_use(&second_serve, "a second serve");

    let second_load = run_fhirlog_with_timeout(&[
        OsStr::new("load"),
        input_file.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ]);
    assert_exits_non_zero_saying_the_data_directory_is_in_use(&second_load, "load");

    let rebuild = run_fhirlog_with_timeout(&[
        OsStr::new("rebuild"),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ]);
    assert_exits_non_zero_saying_the_data_directory_is_in_use(&rebuild, "rebuild");

    assert_eq!(server.client.get("/Patient/held").status, StatusCode::OK);
    assert_eq!(
        server.client.get("/Patient/from-second-loader").status,
        StatusCode::NOT_FOUND
    );
    assert!(server.terminate().success());
}

#[test]
fn sigterm_shuts_the_server_down_gracefully_with_exit_status_0_and_keeps_its_writes() {
    let workspace = TempDir::new().expect("a temporary folder");
    let data_dir = workspace.path().join("data");
    let mut server = ServerProcess::start(&data_dir);
    for family in ["First", "Second"] {
        let reply = server
            .client
            .put_json("/Patient/graceful", &patient("graceful", family));
        assert!(reply.status.is_success(), "{}", reply.text);
    }
    assert!(server.client.is_serving());

    let status = server.terminate();

    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log()
    );
    let log = server.log();
    assert!(
        log.contains("shut down cleanly") && !log.contains("stopping anyway"),
        "the server did not finish its requests within its shutdown grace period:\n{log}"
    );
    assert!(!server.client.is_serving());
    assert_log_has_no_errors(&server);
    let restarted = ServerProcess::start(&data_dir);
    let read = restarted.client.get("/Patient/graceful");
    assert_eq!(read.etag_version(), 2);
    assert_eq!(family_name(&read.json()), "Second");
}

#[test]
fn writes_survive_a_graceful_in_process_restart_on_the_same_data_directory() {
    let first_app = spawn_app_with_limits(RequestLimits::default());
    first_app
        .client
        .put_json("/Patient/restarted", &patient("restarted", "Before"));
    first_app
        .client
        .put_json("/Patient/restarted", &patient("restarted", "Updated"));
    first_app
        .client
        .put_json("/Patient/gone", &patient("gone", "Gone"));
    first_app.client.delete("/Patient/gone");
    let high_water_seq_before_restart = first_app.high_water_seq();
    let data_dir = first_app.shut_down_keeping_data();

    let second_app = spawn_app_in_data_dir(data_dir, RequestLimits::default());

    assert_eq!(second_app.high_water_seq(), high_water_seq_before_restart);
    let read = second_app.client.get("/Patient/restarted");
    assert_eq!(read.etag_version(), 2);
    assert_eq!(family_name(&read.json()), "Updated");
    assert_eq!(
        second_app.client.get("/Patient/gone").status,
        StatusCode::GONE
    );
    let next = second_app
        .client
        .put_json("/Patient/restarted", &patient("restarted", "After"));
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(next.etag_version(), 3);
    assert_eq!(
        second_app.high_water_seq(),
        high_water_seq_before_restart + 1
    );
}

fn write_lines(path: &Path, resources: &[Value]) {
    let text: String = resources
        .iter()
        .map(|resource| format!("{resource}\n"))
        .collect();
    std::fs::write(path, text).expect("writing an ndjson file");
}

fn write_gzipped_lines(path: &Path, resources: &[Value]) {
    let file = std::fs::File::create(path).expect("creating a gzip file");
    let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    for resource in resources {
        writeln!(encoder, "{resource}").expect("writing a gzipped line");
    }
    encoder.finish().expect("finishing the gzip stream");
}

/// The `type written unchanged` rows of a load summary.
fn load_summary_rows(stdout: &str) -> BTreeMap<String, (u64, u64)> {
    stdout
        .lines()
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            match columns.as_slice() {
                [name, written, unchanged] => Some((
                    (*name).to_owned(),
                    (written.parse().ok()?, unchanged.parse().ok()?),
                )),
                _ => None,
            }
        })
        .collect()
}

fn write_small_load_directory(directory: &Path) {
    std::fs::create_dir_all(directory.join("nested")).expect("creating the input folders");
    write_lines(
        &directory.join("Patient.ndjson"),
        &[
            patient("load-p1", "One"),
            patient("load-p2", "Two"),
            patient("load-p3", "Three"),
        ],
    );
    write_lines(
        &directory.join("Observation.ndjson"),
        &[
            json!({"resourceType": "Observation", "id": "load-o1", "status": "final", "code": {},
                   "subject": {"reference": "Patient/load-p1"}}),
            json!({"resourceType": "Observation", "id": "load-o2", "status": "final", "code": {},
                   "subject": {"reference": "Patient/load-p2"}}),
        ],
    );
    write_gzipped_lines(
        &directory.join("nested/Encounter.ndjson.gz"),
        &[
            json!({"resourceType": "Encounter", "id": "load-e1", "status": "finished",
                   "class": {"code": "AMB"}, "subject": {"reference": "Patient/load-p3"}}),
        ],
    );
}

#[test]
fn load_prints_a_per_type_summary_and_loading_the_same_directory_again_writes_nothing() {
    let workspace = TempDir::new().expect("a temporary folder");
    let data_dir = workspace.path().join("data");
    let input_dir = workspace.path().join("input");
    write_small_load_directory(&input_dir);
    let load_arguments = [
        OsStr::new("load"),
        input_dir.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ];

    let first_load = run_fhirlog_with_timeout(&load_arguments);
    assert!(first_load.status.success(), "{}", stderr_of(&first_load));
    let first_rows = load_summary_rows(&stdout_of(&first_load));
    assert_eq!(first_rows.get("Patient"), Some(&(3, 0)), "{first_rows:?}");
    assert_eq!(first_rows.get("Observation"), Some(&(2, 0)));
    assert_eq!(first_rows.get("Encounter"), Some(&(1, 0)));
    assert_eq!(first_rows.get("total"), Some(&(6, 0)));

    let second_load = run_fhirlog_with_timeout(&load_arguments);
    assert!(second_load.status.success(), "{}", stderr_of(&second_load));
    let second_rows = load_summary_rows(&stdout_of(&second_load));
    assert_eq!(second_rows.get("Patient"), Some(&(0, 3)), "{second_rows:?}");
    assert_eq!(second_rows.get("Observation"), Some(&(0, 2)));
    assert_eq!(second_rows.get("Encounter"), Some(&(0, 1)));
    assert_eq!(second_rows.get("total"), Some(&(0, 6)));

    let server = ServerProcess::start(&data_dir);
    for path in [
        "/Patient/load-p1",
        "/Patient/load-p3",
        "/Observation/load-o2",
        "/Encounter/load-e1",
    ] {
        let read = server.client.get(path);
        assert_eq!(read.status, StatusCode::OK, "{path}: {}", read.text);
        assert_eq!(read.etag_version(), 1, "{path} was written twice");
    }
}

#[test]
fn load_of_a_file_with_a_bad_line_2_exits_non_zero_naming_the_file_and_line() {
    let workspace = TempDir::new().expect("a temporary folder");
    let data_dir = workspace.path().join("data");
    let bad_file = workspace.path().join("bad.ndjson");
    std::fs::write(
        &bad_file,
        format!(
            "{}\n{{\"resourceType\":\"Patient\",\"id\":\n{}\n",
            patient("bad-file-line-1", "One"),
            patient("bad-file-line-3", "Three")
        ),
    )
    .expect("writing the bad file");

    let aborted = run_fhirlog_with_timeout(&[
        OsStr::new("load"),
        bad_file.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ]);

    let stderr = stderr_of(&aborted);
    assert!(!aborted.status.success(), "{}", stdout_of(&aborted));
    let expected_location = format!("{}:2:", bad_file.display());
    assert!(
        stderr.contains(&expected_location),
        "stderr does not name {expected_location}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let skipping = run_fhirlog_with_timeout(&[
        OsStr::new("load"),
        bad_file.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
        OsStr::new("--on-error"),
        OsStr::new("skip"),
    ]);
    assert!(skipping.status.success(), "{}", stderr_of(&skipping));
    assert!(
        stderr_of(&skipping).contains(&expected_location),
        "{}",
        stderr_of(&skipping)
    );
    let rows = load_summary_rows(&stdout_of(&skipping));
    assert_eq!(
        rows.get("total"),
        Some(&(2, 0)),
        "the aborted load committed part of its batch: {rows:?}"
    );
}

#[test]
fn rebuild_succeeds_and_every_read_answers_as_before() {
    let workspace = TempDir::new().expect("a temporary folder");
    let data_dir = workspace.path().join("data");
    let mut server = ServerProcess::start(&data_dir);
    let client = server.client.clone();
    for (id, family) in [
        ("r1", "One"),
        ("r1", "OneAgain"),
        ("r2", "Two"),
        ("r3", "Three"),
    ] {
        let reply = client.put_json(&format!("/Patient/{id}"), &patient(id, family));
        assert!(reply.status.is_success(), "{}", reply.text);
    }
    client.put_json(
        "/Observation/r-obs",
        &json!({"resourceType": "Observation", "id": "r-obs", "status": "final", "code": {},
                "subject": {"reference": "Patient/r2"}}),
    );
    assert_eq!(client.delete("/Patient/r3").status, StatusCode::OK);
    let probes = [
        "/Patient/r1",
        "/Patient/r1/_history",
        "/Patient/r1/_history/1",
        "/Patient/r2",
        "/Patient/r3",
        "/Patient/r3/_history",
        "/Observation/r-obs",
        "/Patient/never",
    ];
    let before: Vec<(StatusCode, String)> = probes
        .iter()
        .map(|path| {
            let reply = client.get(path);
            (reply.status, reply.text.replace(&client.base_url, "{base}"))
        })
        .collect();
    assert!(server.terminate().success());

    let rebuild = run_fhirlog(&[
        OsStr::new("rebuild"),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ]);
    assert!(rebuild.status.success(), "{}", stderr_of(&rebuild));
    assert!(
        stdout_of(&rebuild).contains("rebuilt"),
        "{}",
        stdout_of(&rebuild)
    );

    let restarted = ServerProcess::start(&data_dir);
    for (path, (status_before, text_before)) in probes.iter().zip(before) {
        let reply = restarted.client.get(path);
        assert_eq!(reply.status, status_before, "{path}");
        assert_eq!(
            reply.text.replace(&restarted.base_url, "{base}"),
            text_before,
            "{path}"
        );
    }
    let next = restarted
        .client
        .put_json("/Patient/r1", &patient("r1", "AfterRebuild"));
    assert_eq!(next.etag_version(), 3);
}

#[test]
fn gen_with_two_copies_of_the_sample_writes_40_patients() {
    let workspace = TempDir::new().expect("a temporary folder");
    let output_dir = workspace.path().join("generated");
    let sample_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample");

    let generated = run_fhirlog_with_timeout(&[
        OsStr::new("gen"),
        OsStr::new("--from"),
        sample_dir.as_os_str(),
        OsStr::new("--copies"),
        OsStr::new("2"),
        OsStr::new("--out"),
        output_dir.as_os_str(),
    ]);

    assert!(generated.status.success(), "{}", stderr_of(&generated));
    let patients = std::fs::read_to_string(output_dir.join("Patient.ndjson"))
        .expect("gen wrote Patient.ndjson");
    let patient_ids: Vec<String> = patients
        .lines()
        .map(|line| {
            let resource: Value = serde_json::from_str(line).expect("each line is JSON");
            assert_eq!(resource["resourceType"], "Patient");
            resource["id"].as_str().expect("an id").to_owned()
        })
        .collect();
    assert_eq!(patient_ids.len(), 40);
    let distinct_ids: std::collections::BTreeSet<&String> = patient_ids.iter().collect();
    assert_eq!(distinct_ids.len(), 40);
    assert!(
        stdout_of(&generated).contains("40 patients"),
        "{}",
        stdout_of(&generated)
    );
}

#[test]
fn sigterm_exits_within_a_bounded_time_even_while_a_client_stalls_mid_body() {
    let workspace = TempDir::new().expect("a temporary folder");
    let data_dir = workspace.path().join("data");
    let mut server = ServerProcess::start(&data_dir);
    let authority = server
        .base_url
        .trim_start_matches("http://")
        .trim_end_matches("/fhir")
        .to_owned();
    let mut stalled_client =
        std::net::TcpStream::connect(&authority).expect("connecting to the server");
    stalled_client
        .write_all(
            b"PUT /fhir/Patient/stalled HTTP/1.1\r\nHost: fhirlog\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{\"resourceType\"",
        )
        .expect("sending part of a request");
    std::thread::sleep(Duration::from_millis(200));

    let sent = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(server.process_id().to_string())
        .status()
        .expect("running kill -TERM");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if Instant::now() >= deadline {
            break false;
        }
        if let Some(status) = server.try_exit_status() {
            break status.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    drop(stalled_client);
    assert!(
        exited,
        "fhirlog serve was still running (or failed) 15 s after SIGTERM; log:\n{}",
        server.log()
    );
}
