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
