//! One behavioural suite for every [`Destination`]: memory and local always; S3 and Azure
//! against real servers (moto, Azurite) when `.ci/run` or the developer has started them.

#![cfg(test)]

use std::time::Duration;

use bytes::Bytes;

use super::{
    AzureDestination, ContainerName, ContainerStore, Destination, LocalDestination,
    MemoryDestination, S3Destination, SinkError,
};

pub fn run_destination_conformance_suite(
    destination: &dyn Destination,
    runtime: &tokio::runtime::Runtime,
    container_name: &str,
) {
    let handle = runtime.handle();
    let container = ContainerName::parse(container_name).unwrap();
    let store = ContainerStore::new(
        container.clone(),
        destination
            .open_container(&container, handle)
            .expect("existing or creatable container"),
        handle.clone(),
    );
    let prefix = format!("suite-{}", uuid::Uuid::new_v4().simple());

    store
        .put_blocking(
            &format!("{prefix}/staging/a.ndjson"),
            Bytes::from_static(b"{\"a\":1}\n"),
        )
        .unwrap();
    store
        .put_blocking(
            &format!("{prefix}/staging/b.ndjson"),
            Bytes::from_static(b"{\"b\":2}\n"),
        )
        .unwrap();
    store
        .put_blocking(
            &format!("{prefix}-other/c.ndjson"),
            Bytes::from_static(b"c\n"),
        )
        .unwrap();
    assert_eq!(
        store.list_blocking(&prefix).unwrap(),
        vec![
            format!("{prefix}/staging/a.ndjson"),
            format!("{prefix}/staging/b.ndjson")
        ]
    );
    assert!(
        store
            .exists_blocking(&format!("{prefix}/staging/a.ndjson"))
            .unwrap()
    );
    assert!(
        !store
            .exists_blocking(&format!("{prefix}/nothing.ndjson"))
            .unwrap()
    );

    let line = b"{\"resourceType\":\"Observation\",\"id\":\"x\"}\n";
    let lines = 200_000usize;
    let mut upload = store.begin_upload(&format!("{prefix}/big.ndjson")).unwrap();
    for _ in 0..lines {
        upload.write(line).unwrap();
    }
    assert!(
        !store
            .exists_blocking(&format!("{prefix}/big.ndjson"))
            .unwrap(),
        "visible before finish"
    );
    upload.finish().unwrap();
    let total = (line.len() * lines) as u64;
    let tail = runtime
        .block_on(store.get_range(
            &format!("{prefix}/big.ndjson"),
            total - line.len() as u64..total,
        ))
        .unwrap();
    assert_eq!(&tail[..], line);
    let whole = runtime
        .block_on(store.get_bytes(&format!("{prefix}/big.ndjson")))
        .unwrap();
    assert_eq!(whole.len() as u64, total);
    store
        .make_durable_blocking(&[
            format!("{prefix}/big.ndjson"),
            format!("{prefix}/staging/a.ndjson"),
        ])
        .expect("finished objects can be made durable");

    let described = runtime
        .block_on(store.describe_object(&format!("{prefix}/big.ndjson")))
        .unwrap();
    assert_eq!(described.size, total);
    assert!(
        described.entity_tag.starts_with('"') && described.entity_tag.ends_with('"'),
        "{}",
        described.entity_tag
    );
    assert_eq!(
        runtime
            .block_on(store.describe_object(&format!("{prefix}/big.ndjson")))
            .unwrap(),
        described,
        "the description of an unchanged object is stable"
    );
    let middle = total / 2..total / 2 + line.len() as u64 * 3;
    let streamed = runtime.block_on(async {
        let mut stream = store
            .stream_object(&format!("{prefix}/big.ndjson"), Some(middle.clone()))
            .await
            .unwrap();
        let mut bytes = Vec::new();
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        bytes
    });
    assert_eq!(streamed, &whole[middle.start as usize..middle.end as usize]);
    assert!(matches!(
        runtime.block_on(store.describe_object(&format!("{prefix}/absent.ndjson"))),
        Err(SinkError::NotFound(_))
    ));

    let abandoned = store
        .begin_upload(&format!("{prefix}/abandoned.ndjson"))
        .unwrap();
    drop(abandoned);
    assert!(
        !store
            .exists_blocking(&format!("{prefix}/abandoned.ndjson"))
            .unwrap()
    );

    store
        .put_blocking(
            &format!("{prefix}/staging/a.ndjson"),
            Bytes::from_static(b"replaced\n"),
        )
        .unwrap();
    store
        .rename_blocking(
            &format!("{prefix}/staging/a.ndjson"),
            &format!("{prefix}/A-1.ndjson"),
        )
        .unwrap();
    assert!(
        !store
            .exists_blocking(&format!("{prefix}/staging/a.ndjson"))
            .unwrap()
    );
    let renamed = runtime
        .block_on(store.get_bytes(&format!("{prefix}/A-1.ndjson")))
        .unwrap();
    assert_eq!(&renamed[..], b"replaced\n");

    assert!(matches!(
        runtime.block_on(store.get_bytes(&format!("{prefix}/absent.ndjson"))),
        Err(SinkError::NotFound(_))
    ));

    store.delete_prefix_blocking(&prefix).unwrap();
    assert!(store.list_blocking(&prefix).unwrap().is_empty());
    assert_eq!(
        store
            .list_blocking(&format!("{prefix}-other"))
            .unwrap()
            .len(),
        1
    );
    store
        .delete_prefix_blocking(&format!("{prefix}-other"))
        .unwrap();
}

/// A missing container is reported (not created) when creation is off.
fn assert_missing_container_is_reported(
    destination: &dyn Destination,
    runtime: &tokio::runtime::Runtime,
) {
    let absent = ContainerName::parse(&format!(
        "absent-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))
    .unwrap();
    match destination.open_container(&absent, runtime.handle()) {
        Err(SinkError::ContainerMissing { container, .. }) => {
            assert_eq!(container, absent.as_str())
        }
        Err(other) => panic!("unexpected error for a missing container: {other}"),
        Ok(_) => panic!("a missing container was not reported"),
    }
}

/// A store on `destination`'s (created) container `name`.
fn opened_store(
    destination: &dyn Destination,
    runtime: &tokio::runtime::Runtime,
    name: &str,
) -> ContainerStore {
    let container = ContainerName::parse(name).unwrap();
    let opened = destination
        .open_container(&container, runtime.handle())
        .expect("a creatable container");
    ContainerStore::new(container, opened, runtime.handle().clone())
}

fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The moto endpoint, when a server and credentials are available.
pub fn s3_test_endpoint() -> Option<String> {
    let endpoint = std::env::var("FHIRLOG_TEST_S3_ENDPOINT").ok()?;
    std::env::var("AWS_ACCESS_KEY_ID").ok()?;
    std::env::var("AWS_SECRET_ACCESS_KEY").ok()?;
    Some(endpoint)
}

/// Whether an Azurite blob endpoint is configured.
pub fn azurite_available() -> bool {
    std::env::var("AZURITE_BLOB_STORAGE_URL").is_ok()
}

fn s3_destination(endpoint: &str, create_containers: bool) -> S3Destination {
    S3Destination::new(
        ContainerName::parse("fhirlog-exports").unwrap(),
        Some(endpoint.to_owned()),
        "us-east-1".to_owned(),
        true,
        create_containers,
        Duration::from_secs(20),
    )
}

fn azurite_destination(create_containers: bool) -> AzureDestination {
    AzureDestination::new(
        ContainerName::parse("fhirlog-exports").unwrap(),
        None,
        true,
        create_containers,
        Duration::from_secs(20),
    )
}

#[test]
fn memory_destination_conforms() {
    let runtime = test_runtime();
    run_destination_conformance_suite(&MemoryDestination::new(true), &runtime, "conformance");
    assert_missing_container_is_reported(&MemoryDestination::new(false), &runtime);
}

#[test]
fn local_destination_conforms() {
    let root = tempfile::tempdir().unwrap();
    let runtime = test_runtime();
    run_destination_conformance_suite(
        &LocalDestination::new(root.path().to_path_buf(), true),
        &runtime,
        "conformance",
    );
    assert_missing_container_is_reported(
        &LocalDestination::new(root.path().to_path_buf(), false),
        &runtime,
    );
}

#[test]
fn s3_destination_conforms() {
    let Some(endpoint) = s3_test_endpoint() else {
        println!(
            "skipped: set FHIRLOG_TEST_S3_ENDPOINT and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (moto_server) to run"
        );
        return;
    };
    let runtime = test_runtime();
    run_destination_conformance_suite(&s3_destination(&endpoint, true), &runtime, "conformance");
    assert_missing_container_is_reported(&s3_destination(&endpoint, false), &runtime);
}

#[test]
fn azure_destination_conforms() {
    if !azurite_available() {
        println!("skipped: set AZURITE_BLOB_STORAGE_URL (azurite-blob) to run");
        return;
    }
    let runtime = test_runtime();
    run_destination_conformance_suite(&azurite_destination(true), &runtime, "conformance");
    assert_missing_container_is_reported(&azurite_destination(false), &runtime);
}

#[test]
fn local_durability_reports_a_missing_object() {
    let root = tempfile::tempdir().unwrap();
    let runtime = test_runtime();
    let store = opened_store(
        &LocalDestination::new(root.path().to_path_buf(), true),
        &runtime,
        "durable",
    );
    store
        .put_blocking("job/present.ndjson", Bytes::from_static(b"{}\n"))
        .unwrap();
    match store.make_durable_blocking(&[
        "job/present.ndjson".to_owned(),
        "job/missing.ndjson".to_owned(),
    ]) {
        Err(SinkError::NotFound(name)) => assert_eq!(name, "job/missing.ndjson"),
        other => panic!("expected NotFound for the missing object, got {other:?}"),
    }
}

#[test]
fn memory_durability_has_nothing_to_do() {
    let runtime = test_runtime();
    let store = opened_store(&MemoryDestination::new(true), &runtime, "durable");
    store
        .put_blocking("job/a.ndjson", Bytes::from_static(b"{}\n"))
        .unwrap();
    store
        .make_durable_blocking(&["job/a.ndjson".to_owned()])
        .unwrap();
}

/// Runs one `#[ignore]`d test of this binary in a child process with `environment`,
/// under `wrapper` (a command and its arguments) when given.
fn run_child_test(
    test_name: &str,
    environment: &[(&str, String)],
    wrapper: &[String],
) -> std::process::Output {
    let test_binary = std::env::current_exe().unwrap();
    let mut command = match wrapper.split_first() {
        Some((program, arguments)) => {
            let mut command = std::process::Command::new(program);
            command.args(arguments).arg(&test_binary);
            command
        }
        None => std::process::Command::new(&test_binary),
    };
    command
        .args([
            "--exact",
            test_name,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .envs(environment.iter().map(|(name, value)| (name, value)))
        .output()
        .unwrap()
}

const DURABILITY_FOLDER_VARIABLE: &str = "FHIRLOG_TEST_DURABILITY_FOLDER";
const DURABLE_OBJECTS: [&str; 3] = ["job/a.ndjson", "job/deep/b.ndjson", "c.ndjson"];

#[test]
#[ignore = "child of local_durability_fsyncs_each_file_then_its_folders, run under strace"]
fn local_durability_child() {
    let root = std::env::var(DURABILITY_FOLDER_VARIABLE).expect("run by its parent test");
    let runtime = test_runtime();
    let store = opened_store(
        &LocalDestination::new(root.into(), true),
        &runtime,
        "durable",
    );
    for name in DURABLE_OBJECTS {
        let mut upload = store.begin_upload(name).unwrap();
        upload.write(b"{\"resourceType\":\"Patient\"}\n").unwrap();
        upload.finish().unwrap();
    }
    store
        .make_durable_blocking(&DURABLE_OBJECTS.map(str::to_owned))
        .unwrap();
}

/// Paths passed to `fsync`/`fdatasync`, in call order, from `strace -y` output.
fn synced_paths(trace: &str) -> Vec<std::path::PathBuf> {
    trace
        .lines()
        .filter(|line| line.contains("fsync(") || line.contains("fdatasync("))
        .filter_map(|line| {
            let start = line.find('<')? + 1;
            let end = start + line[start..].find('>')?;
            Some(std::path::PathBuf::from(&line[start..end]))
        })
        .collect()
}

#[test]
fn local_durability_fsyncs_each_file_then_its_folders() {
    let strace_present = std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        strace_present,
        "this test traces fsync calls with strace: install it (apt-get install -y strace)"
    );
    let root = tempfile::tempdir().unwrap();
    let trace_path = root.path().join("trace.txt");
    let output = run_child_test(
        "sink::conformance::local_durability_child",
        &[(
            DURABILITY_FOLDER_VARIABLE,
            root.path().display().to_string(),
        )],
        &[
            "strace".to_owned(),
            "-f".to_owned(),
            "-qq".to_owned(),
            "-y".to_owned(),
            "-e".to_owned(),
            "trace=fsync,fdatasync".to_owned(),
            "-e".to_owned(),
            "signal=none".to_owned(),
            "-o".to_owned(),
            trace_path.display().to_string(),
        ],
    );
    assert!(
        output.status.success(),
        "child failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let synced = synced_paths(&std::fs::read_to_string(&trace_path).unwrap());
    let container = std::fs::canonicalize(root.path()).unwrap().join("durable");
    let position = |path: &std::path::Path| {
        synced
            .iter()
            .position(|synced| synced == path)
            .unwrap_or_else(|| panic!("{} was never fsynced; fsynced: {synced:?}", path.display()))
    };
    for name in DURABLE_OBJECTS {
        let file = container.join(name);
        let file_synced_at = position(&file);
        for folder in file.ancestors().skip(1) {
            assert!(
                position(folder) > file_synced_at,
                "{} was fsynced before its file {}",
                folder.display(),
                file.display()
            );
            if folder == container {
                break;
            }
        }
    }
}

const UNREACHABLE_BACKEND_VARIABLE: &str = "FHIRLOG_TEST_UNREACHABLE_BACKEND";
const UNREACHABLE_URL_VARIABLE: &str = "FHIRLOG_TEST_UNREACHABLE_URL";
const EXPECTED_CAUSE_VARIABLE: &str = "FHIRLOG_TEST_EXPECTED_CAUSE";
/// Longest acceptable one-line message for a destination that does not answer.
const SHORT_MESSAGE_CHARS: usize = 300;

#[test]
#[ignore = "child of the *_reports_* unreachable tests, which set its environment"]
fn unreachable_destination_child() {
    let backend = std::env::var(UNREACHABLE_BACKEND_VARIABLE).expect("run by its parent test");
    let url = std::env::var(UNREACHABLE_URL_VARIABLE).expect("run by its parent test");
    let expected_cause = std::env::var(EXPECTED_CAUSE_VARIABLE).expect("run by its parent test");
    let destination: Box<dyn Destination> = match backend.as_str() {
        "s3" => Box::new(s3_destination(&url, true)),
        _ => Box::new(azurite_destination(true)),
    };
    let runtime = test_runtime();
    let container = ContainerName::parse("fail-fast").unwrap();
    let started = std::time::Instant::now();
    let outcome = destination.open_container(&container, runtime.handle());
    let elapsed = started.elapsed();
    let error = match outcome {
        Err(error) => error,
        Ok(_) => panic!("a dead destination opened"),
    };
    let message = error.to_string();
    println!("{backend} answered in {elapsed:?}: {message}");
    assert!(
        matches!(error, SinkError::Unreachable { .. }),
        "not reported as unreachable: {error:?}"
    );
    assert!(error.is_transient());
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(
        message.chars().count() < SHORT_MESSAGE_CHARS && !message.contains('\n'),
        "not one short line: {message}"
    );
    assert!(message.contains("'fail-fast'"), "{message}");
    assert!(message.contains(&destination.describe()), "{message}");
    assert_eq!(
        message.matches(expected_cause.as_str()).count(),
        1,
        "the cause '{expected_cause}' is not named exactly once: {message}"
    );
    assert!(error.detail().len() >= message.len(), "{}", error.detail());
}

/// Opens a container of `backend` whose storage URL is `url` in a child process (the
/// Azure emulator URL comes from the environment) and checks it reports the destination
/// as unreachable, naming `expected_cause` once.
fn assert_open_reports_unreachable(backend: &str, url: &str, expected_cause: &str) {
    let output = run_child_test(
        "sink::conformance::unreachable_destination_child",
        &[
            (UNREACHABLE_BACKEND_VARIABLE, backend.to_owned()),
            (UNREACHABLE_URL_VARIABLE, url.to_owned()),
            (EXPECTED_CAUSE_VARIABLE, expected_cause.to_owned()),
            ("AZURITE_BLOB_STORAGE_URL", url.to_owned()),
            ("AWS_ACCESS_KEY_ID", "fail-fast-test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "fail-fast-test".to_owned()),
        ],
        &[],
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("answered in"),
        "the child ran no check: {printed}"
    );
}

/// The URL of a local port nothing listens on.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn s3_open_container_reports_a_closed_port_as_unreachable_within_seconds() {
    assert_open_reports_unreachable("s3", &closed_port_url(), "Connection refused");
}

#[test]
fn azure_open_container_reports_a_closed_port_as_unreachable_within_seconds() {
    assert_open_reports_unreachable("azure", &closed_port_url(), "Connection refused");
}

#[test]
fn s3_open_container_gives_up_on_a_destination_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    assert_open_reports_unreachable("s3", &url, "no answer within");
    drop(silent);
}

/// A store whose reads go to an S3 endpoint at `url`, with the interactive settings.
fn interactive_s3_store(url: &str, runtime: &tokio::runtime::Runtime) -> ContainerStore {
    let objects = std::sync::Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_client_options(super::interactive_client_options())
            .with_endpoint(url)
            .with_bucket_name("silent")
            .with_region("us-east-1")
            .with_access_key_id("download-test")
            .with_secret_access_key("download-test")
            .with_allow_http(true)
            .with_retry(super::interactive_retry_config())
            .build()
            .unwrap(),
    );
    let opened = super::OpenedContainer {
        objects: objects.clone(),
        interactive_objects: objects,
        signer: None,
        durability: super::Durability::CommittedOnUpload,
        destination: format!("s3 at {url}"),
    };
    ContainerStore::new(
        ContainerName::parse("silent").unwrap(),
        opened,
        runtime.handle().clone(),
    )
}

/// Download reads of a dead destination fail as unreachable within `limit`, naming
/// `expected_cause`.
fn assert_download_reads_fail_fast(url: &str, expected_cause: &str, limit: Duration) {
    let runtime = test_runtime();
    let store = interactive_s3_store(url, &runtime);
    let started = std::time::Instant::now();
    let described = runtime.block_on(store.describe_object("job/Patient-1.ndjson"));
    let streamed = runtime
        .block_on(store.stream_object("job/Patient-1.ndjson", Some(0..10)))
        .map(|_| ());
    let elapsed = started.elapsed();
    for outcome in [described.map(|_| ()), streamed] {
        match outcome {
            Err(error @ SinkError::Unreachable { .. }) => {
                assert!(error.to_string().contains(expected_cause), "{error}")
            }
            other => panic!("expected an unreachable destination, got {other:?}"),
        }
    }
    assert!(elapsed < limit, "two reads took {elapsed:?}");
}

#[test]
fn download_reads_of_a_closed_port_fail_as_unreachable_at_once() {
    assert_download_reads_fail_fast(
        &closed_port_url(),
        "Connection refused",
        Duration::from_secs(5),
    );
}

#[test]
fn download_reads_of_a_destination_that_never_answers_give_up_at_the_deadline() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    assert_download_reads_fail_fast(&url, "no answer within", Duration::from_secs(8));
    drop(silent);
}
