//! One behavioural suite for every [`Destination`]; each backend's test calls
//! [`run_destination_conformance_suite`].

#![cfg(test)]

use bytes::Bytes;

use super::{ContainerName, ContainerStore, Destination, SinkError};

pub fn run_destination_conformance_suite(
    destination: &dyn Destination,
    runtime: &tokio::runtime::Runtime,
) {
    let missing = ContainerName::parse("never-created").unwrap();
    let container = ContainerName::parse("conformance").unwrap();
    let store = ContainerStore::new(
        container.clone(),
        destination
            .open_container(&container)
            .expect("existing or creatable container"),
        runtime.handle().clone(),
    );

    store
        .put_blocking("job-1/staging/a.ndjson", Bytes::from_static(b"{\"a\":1}\n"))
        .unwrap();
    store
        .put_blocking("job-1/staging/b.ndjson", Bytes::from_static(b"{\"b\":2}\n"))
        .unwrap();
    store
        .put_blocking("job-2/c.ndjson", Bytes::from_static(b"c\n"))
        .unwrap();
    assert_eq!(
        store.list_blocking("job-1").unwrap(),
        vec![
            "job-1/staging/a.ndjson".to_owned(),
            "job-1/staging/b.ndjson".to_owned()
        ]
    );
    assert!(store.exists_blocking("job-1/staging/a.ndjson").unwrap());
    assert!(!store.exists_blocking("job-1/nothing.ndjson").unwrap());

    store
        .put_blocking("job-1/staging/a.ndjson", Bytes::from_static(b"replaced\n"))
        .unwrap();
    store
        .rename_blocking("job-1/staging/a.ndjson", "job-1/A-1.ndjson")
        .unwrap();
    assert!(!store.exists_blocking("job-1/staging/a.ndjson").unwrap());
    let renamed = runtime
        .block_on(store.get_bytes("job-1/A-1.ndjson"))
        .unwrap();
    assert_eq!(&renamed[..], b"replaced\n");

    assert!(matches!(
        runtime.block_on(store.get_bytes("job-1/absent.ndjson")),
        Err(SinkError::NotFound(_))
    ));

    store.delete_prefix_blocking("job-1").unwrap();
    assert!(store.list_blocking("job-1").unwrap().is_empty());
    assert_eq!(
        store.list_blocking("job-2").unwrap(),
        vec!["job-2/c.ndjson".to_owned()]
    );
    store.delete_prefix_blocking("job-2").unwrap();

    match destination.open_container(&missing) {
        Err(SinkError::ContainerMissing { container, .. }) => {
            assert_eq!(container, "never-created")
        }
        Ok(_) => {}
        Err(other) => panic!("unexpected error for a missing container: {other}"),
    }
}

fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn memory_destination_conforms() {
    let destination = super::MemoryDestination::new(true);
    run_destination_conformance_suite(&destination, &test_runtime());
    let strict = super::MemoryDestination::new(false);
    assert!(matches!(
        strict.open_container(&ContainerName::parse("absent").unwrap()),
        Err(SinkError::ContainerMissing { .. })
    ));
}

#[test]
fn local_destination_conforms() {
    let root = tempfile::tempdir().unwrap();
    let destination = super::LocalDestination::new(root.path().to_path_buf(), true);
    run_destination_conformance_suite(&destination, &test_runtime());
    let strict = super::LocalDestination::new(root.path().to_path_buf(), false);
    assert!(matches!(
        strict.open_container(&ContainerName::parse("absent").unwrap()),
        Err(SinkError::ContainerMissing { .. })
    ));
}
