//! Bulk Data exports to real object storage: moto (S3) and Azurite (Azure Blob), as
//! started by `.ci/run`. Every test that needs a storage server is ignored, with the
//! reason, when the build did not see its environment variables (build.rs).

mod support;

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirlog::config::{AppSettings, StorageSettings};
use fhirlog::export::ExportSettings;
use fhirlog::load::{LoadOptions, OnError, load};
use fhirlog::sink::{ContainerName, StorageUrl};
use fhirlog::store::{Store, StoreOptions};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::bulk::{BulkClient, Completion, Downloads, EXPORT_DEADLINE, KickOffRequest, Polling};
use support::{
    FhirClient, Reply, ServerProcess, TestApp, fhirlog_command, free_local_port, spawn_app_on_store,
};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GROUP_ID: &str = "storage-export-group";
const GROUP_MEMBER_COUNT: usize = 4;

#[derive(Clone, Debug)]
enum StorageBackend {
    MotoS3 { endpoint: String },
    Azurite { blob_url: String },
}

impl StorageBackend {
    fn moto_from_environment() -> Option<StorageBackend> {
        let endpoint = std::env::var("FHIRLOG_TEST_S3_ENDPOINT").ok()?;
        std::env::var("AWS_ACCESS_KEY_ID").ok()?;
        std::env::var("AWS_SECRET_ACCESS_KEY").ok()?;
        Some(StorageBackend::MotoS3 {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
        })
    }

    fn azurite_from_environment() -> Option<StorageBackend> {
        let blob_url = std::env::var("AZURITE_BLOB_STORAGE_URL").ok()?;
        Some(StorageBackend::Azurite {
            blob_url: blob_url.trim_end_matches('/').to_owned(),
        })
    }

    fn label(&self) -> &'static str {
        match self {
            StorageBackend::MotoS3 { .. } => "moto S3",
            StorageBackend::Azurite { .. } => "Azurite",
        }
    }

    /// The storage server's own base URL (where signed URLs must point).
    fn server_url(&self) -> &str {
        match self {
            StorageBackend::MotoS3 { endpoint } => endpoint,
            StorageBackend::Azurite { blob_url } => blob_url,
        }
    }

    fn server_address(&self) -> SocketAddr {
        let authority = self
            .server_url()
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("{} is not an http:// URL", self.server_url()))
            .split('/')
            .next()
            .unwrap_or_default();
        authority
            .to_socket_addrs()
            .unwrap_or_else(|error| panic!("resolving {authority}: {error}"))
            .next()
            .unwrap_or_else(|| panic!("{authority} resolves to no address"))
    }

    /// The storage URL of this backend with `default_container` as its default.
    fn storage_url(&self, default_container: &str) -> StorageUrl {
        let default_container =
            ContainerName::parse(default_container).expect("a valid container name");
        match self {
            StorageBackend::MotoS3 { endpoint } => StorageUrl::S3 {
                bucket: default_container,
                endpoint: Some(endpoint.clone()),
                region: "us-east-1".to_owned(),
                allow_http: true,
            },
            StorageBackend::Azurite { .. } => StorageUrl::Azure {
                container: default_container,
                account: None,
                emulator: true,
            },
        }
    }

    /// Where a server exporting to this backend writes.
    fn storage(&self, default_container: &str, create_containers: bool) -> StorageSettings {
        StorageSettings {
            url: self.storage_url(default_container),
            create_containers,
            signed_url_ttl: None,
        }
    }

    /// `--storage` and the extra environment for `fhirlog serve` reaching this backend
    /// through `endpoint_url` (the backend itself or a proxy in front of it).
    fn serve_storage(
        &self,
        container: &str,
        endpoint_url: &str,
    ) -> (String, Vec<(String, String)>) {
        match self {
            StorageBackend::MotoS3 { .. } => (
                format!(
                    "s3://{container}?endpoint={endpoint_url}&region=us-east-1&allow_http=true"
                ),
                Vec::new(),
            ),
            StorageBackend::Azurite { .. } => (
                format!("az://{container}?emulator=true"),
                vec![(
                    "AZURITE_BLOB_STORAGE_URL".to_owned(),
                    endpoint_url.to_owned(),
                )],
            ),
        }
    }
}

/// moto, as `.ci/run` starts it; the tests that call this are ignored unless the build saw
/// its variables (build.rs).
fn moto_backend() -> StorageBackend {
    StorageBackend::moto_from_environment().expect(
        "set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (a running moto_server)",
    )
}

/// Azurite, as `.ci/run` starts it; see [`moto_backend`].
fn azurite_backend() -> StorageBackend {
    StorageBackend::azurite_from_environment()
        .expect("set AZURITE_BLOB_STORAGE_URL (a running azurite-blob)")
}

fn unique_container_name(purpose: &str) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{purpose}-{}", &suffix[..16])
}

fn sample_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample")
}

fn sample_path(file_name: &str) -> PathBuf {
    sample_directory().join(file_name)
}

/// Patients and their Conditions: a few thousand resources, enough for several parts.
fn small_sample_paths() -> Vec<PathBuf> {
    vec![
        sample_path("Patient.ndjson.gz"),
        sample_path("Condition.ndjson.gz"),
    ]
}

fn open_store_loading(data_dir: &TempDir, paths: Vec<PathBuf>) -> (Store, u64) {
    let store = Store::open(data_dir.path(), &StoreOptions::default()).expect("opening the store");
    let summary = load(
        &store,
        &LoadOptions {
            paths,
            on_error: OnError::Abort,
            max_json_depth: fhirlog::fhir::canonical::DEFAULT_MAX_JSON_DEPTH,
            show_progress: false,
            max_document_bytes: fhirlog::load::DEFAULT_MAX_DOCUMENT_BYTES,
            local_base: fhirlog::fhir::LocalBase::relative_only(),
        },
    )
    .expect("loading the sample data");
    (store, summary.written())
}

fn first_sample_patient_ids(count: usize) -> Vec<String> {
    let file = File::open(sample_path("Patient.ndjson.gz")).expect("opening the sample patients");
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .expect("reading the sample patients");
    text.lines()
        .take(count)
        .map(|line| {
            let patient: Value = serde_json::from_str(line).expect("a sample patient is JSON");
            patient["id"]
                .as_str()
                .expect("a sample patient has an id")
                .to_owned()
        })
        .collect()
}

fn export_settings(max_resources_per_file: u64) -> ExportSettings {
    ExportSettings {
        workers: 2,
        max_resources_per_file,
        job_timeout: Duration::from_secs(120),
        max_jobs: 16,
        retention: Duration::from_secs(3600),
        destination_timeout: Duration::from_secs(20),
        ..ExportSettings::default()
    }
}

/// Servers in this process, each started by the shared harness over one shared store
/// with its own destination; dropping them shuts every server down.
struct InProcessExportServers {
    clients: Vec<BulkClient>,
    _apps: Vec<TestApp>,
}

/// Starts every server before any export is submitted: an engine resumes the unfinished
/// jobs it finds in the store, so a later one would adopt the others' jobs.
fn start_export_servers(
    store: &Store,
    storages: Vec<StorageSettings>,
    settings: &ExportSettings,
) -> InProcessExportServers {
    let apps: Vec<TestApp> = storages
        .into_iter()
        .map(|storage| {
            let mut app_settings = AppSettings::local(store.data_dir());
            app_settings.exports = settings.clone();
            app_settings.storage = storage;
            spawn_app_on_store(store.clone(), app_settings)
        })
        .collect();
    InProcessExportServers {
        clients: apps
            .iter()
            .map(|app| BulkClient::new(&app.base_url))
            .collect(),
        _apps: apps,
    }
}

/// The small sample in a fresh store, served by one server per spec. Fields drop in
/// order: the servers (and with them the store), then its directory.
struct ExportFixture {
    servers: InProcessExportServers,
    _data_dir: TempDir,
}

impl ExportFixture {
    fn start_over_small_sample(
        storages: Vec<StorageSettings>,
        max_resources_per_file: u64,
    ) -> ExportFixture {
        let data_dir = TempDir::new().expect("creating a data directory");
        let (store, _) = open_store_loading(&data_dir, small_sample_paths());
        let servers =
            start_export_servers(&store, storages, &export_settings(max_resources_per_file));
        ExportFixture {
            servers,
            _data_dir: data_dir,
        }
    }

    fn client(&self, index: usize) -> &BulkClient {
        &self.servers.clients[index]
    }
}

fn job_id_of(status_url: &str) -> String {
    status_url
        .rsplit('/')
        .next()
        .expect("a status URL ends in the job id")
        .to_owned()
}

/// `server_log` from the first line that names `job_id` on, for failure messages (the
/// storage client's own retry lines do not name the job).
fn server_log_since_job(server_log: &str, job_id: &str) -> String {
    server_log
        .lines()
        .skip_while(|line| !line.contains(job_id))
        .collect::<Vec<_>>()
        .join("\n")
}

struct DownloadedFile {
    kind: String,
    resource_type: String,
    count: u64,
    name: String,
    bytes: Vec<u8>,
}

struct DownloadedExport {
    transaction_time: String,
    files: Vec<DownloadedFile>,
}

impl DownloadedExport {
    fn listing(&self) -> Vec<(String, String, u64, String)> {
        self.files
            .iter()
            .map(|file| {
                (
                    file.kind.clone(),
                    file.resource_type.clone(),
                    file.count,
                    file.name.clone(),
                )
            })
            .collect()
    }

    fn total_output_count(&self) -> u64 {
        self.files
            .iter()
            .filter(|file| file.kind == "output")
            .map(|file| file.count)
            .sum()
    }

    fn output_file_count_of(&self, resource_type: &str) -> usize {
        self.files
            .iter()
            .filter(|file| file.kind == "output" && file.resource_type == resource_type)
            .count()
    }
}

fn file_name_of(url: &str) -> String {
    url.split('?')
        .next()
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn manifest_items(manifest: &Value) -> Vec<(String, Value)> {
    ["output", "deleted", "error"]
        .into_iter()
        .flat_map(|kind| {
            manifest[kind]
                .as_array()
                .unwrap_or_else(|| panic!("manifest has no {kind} array: {manifest}"))
                .iter()
                .map(move |item| (kind.to_owned(), item.clone()))
        })
        .collect()
}

/// Every file of a completed export, downloaded by the shared bulk client from the URL
/// its manifest gives, with each file's bytes and name kept for comparison.
fn download_export(client: &BulkClient, completion: Completion) -> DownloadedExport {
    let export = client.download(completion, Downloads::PlainOnly);
    let transaction_time = export.transaction_time();
    let files = [
        ("output", &export.output),
        ("deleted", &export.deleted),
        ("error", &export.error),
    ]
    .into_iter()
    .flat_map(|(kind, files)| {
        files.iter().map(move |file| {
            let mut bytes = file.lines.join("\n").into_bytes();
            if !bytes.is_empty() {
                bytes.push(b'\n');
            }
            DownloadedFile {
                kind: kind.to_owned(),
                resource_type: file.type_name.clone(),
                count: file.count,
                name: file_name_of(&file.url),
                bytes,
            }
        })
    })
    .collect();
    DownloadedExport {
        transaction_time,
        files,
    }
}

fn wait_for_manifest(client: &BulkClient, status_url: &str) -> Completion {
    client.poll_until_complete(status_url, Polling::Eagerly)
}

fn assert_urls_are_server_downloads(manifest: &Value, client: &BulkClient, status_url: &str) {
    let prefix = format!(
        "{}/$export-file/{}/",
        client.base_url,
        job_id_of(status_url)
    );
    for (_, item) in manifest_items(manifest) {
        let url = item["url"].as_str().unwrap_or_default();
        assert!(
            url.starts_with(&prefix),
            "{url} is not a download from the server ({prefix}…)"
        );
    }
}

fn assert_line_counts_match_the_manifest(label: &str, export: &DownloadedExport) {
    for file in &export.files {
        let lines = file.bytes.iter().filter(|byte| **byte == b'\n').count() as u64;
        assert_eq!(
            lines, file.count,
            "{label}: {} has {lines} lines but the manifest says {}",
            file.name, file.count
        );
    }
}

fn assert_exports_are_identical(
    label: &str,
    actual: &DownloadedExport,
    expected: &DownloadedExport,
) {
    assert_eq!(
        actual.transaction_time, expected.transaction_time,
        "{label}: transactionTime differs"
    );
    assert_eq!(
        actual.listing(),
        expected.listing(),
        "{label}: the files (kind, type, count, name) differ"
    );
    for (actual_file, expected_file) in actual.files.iter().zip(&expected.files) {
        assert!(
            actual_file.bytes == expected_file.bytes,
            "{label}: {} differs ({} bytes vs {} bytes expected)",
            actual_file.name,
            actual_file.bytes.len(),
            expected_file.bytes.len()
        );
    }
}

/// Every object name in a container, listed straight from the storage server.
fn object_names_in_container(backend: &StorageBackend, container: &str) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("building a listing runtime");
    let destination = backend
        .storage_url(container)
        .into_destination(false, Duration::from_secs(20));
    let name = ContainerName::parse(container).expect("a valid container name");
    let opened = destination
        .open_container(&name, runtime.handle())
        .unwrap_or_else(|error| panic!("opening {container} on {}: {error}", backend.label()));
    let mut names: Vec<String> = runtime.block_on(async {
        opened
            .objects
            .list(None)
            .map(|meta| {
                meta.unwrap_or_else(|error| panic!("listing {container}: {error}"))
                    .location
                    .to_string()
            })
            .collect()
            .await
    });
    names.sort();
    names
}

/// The container holds exactly the final files of `exports` under `{job id}/`: no
/// staging parts and nothing else.
fn assert_container_holds_exactly(
    backend: &StorageBackend,
    container: &str,
    exports: &[(&str, &DownloadedExport)],
) {
    let mut expected: Vec<String> = exports
        .iter()
        .flat_map(|(job_id, export)| {
            export
                .files
                .iter()
                .map(move |file| format!("{job_id}/{}", file.name))
        })
        .collect();
    expected.sort();
    let actual = object_names_in_container(backend, container);
    let staged: Vec<&String> = actual
        .iter()
        .filter(|name| name.contains("/staging/"))
        .collect();
    assert!(
        staged.is_empty(),
        "{}: staging objects left in {container}: {staged:?}",
        backend.label()
    );
    assert_eq!(
        actual,
        expected,
        "{}: objects in {container}",
        backend.label()
    );
}

fn put_sample_group(client: &FhirClient, member_ids: &[String]) {
    let members: Vec<Value> = member_ids
        .iter()
        .map(|id| json!({"entity": {"reference": format!("Patient/{id}")}}))
        .collect();
    let group = json!({
        "resourceType": "Group",
        "id": GROUP_ID,
        "type": "person",
        "actual": true,
        "member": members,
    });
    let reply = client.put_json(&format!("/Group/{GROUP_ID}"), &group);
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
}

#[test]
#[cfg_attr(
    not(any(fhirlog_test_s3, fhirlog_test_azurite)),
    ignore = "needs moto or Azurite: set FHIRLOG_TEST_S3_ENDPOINT and AWS credentials, or AZURITE_BLOB_STORAGE_URL (.ci/run does)"
)]
fn system_and_group_exports_to_s3_and_azurite_equal_a_local_export_of_the_same_snapshot() {
    let backends: Vec<StorageBackend> = [
        StorageBackend::moto_from_environment(),
        StorageBackend::azurite_from_environment(),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        !backends.is_empty(),
        "set FHIRLOG_TEST_S3_ENDPOINT and AWS credentials, or AZURITE_BLOB_STORAGE_URL"
    );
    let local_root = TempDir::new().expect("creating the local export root");
    let containers: Vec<String> = backends
        .iter()
        .map(|_| unique_container_name("same-snapshot"))
        .collect();
    let mut storages = vec![StorageSettings {
        url: StorageUrl::File {
            root: local_root.path().to_path_buf(),
        },
        create_containers: true,
        signed_url_ttl: None,
    }];
    for (backend, container) in backends.iter().zip(&containers) {
        storages.push(backend.storage(container, true));
    }
    let data_dir = TempDir::new().expect("creating a data directory");
    let (store, loaded) = open_store_loading(&data_dir, vec![sample_directory()]);
    let servers = start_export_servers(&store, storages, &export_settings(2_000));
    let local = &servers.clients[0];
    put_sample_group(
        &local.relative,
        &first_sample_patient_ids(GROUP_MEMBER_COUNT),
    );
    let snapshot_seq = store.high_water_seq().expect("reading the high-water seq");

    let system_path = |container: &str| format!("/$export?_container={container}");
    let group_path = |container: &str| format!("/Group/{GROUP_ID}/$export?_container={container}");
    let local_system_status = local.kick_off(&KickOffRequest::get("/$export"));
    let local_group_status =
        local.kick_off(&KickOffRequest::get(&format!("/Group/{GROUP_ID}/$export")));
    let remote_statuses: Vec<(String, String)> = containers
        .iter()
        .enumerate()
        .map(|(index, container)| {
            let client = &servers.clients[index + 1];
            (
                client.kick_off(&KickOffRequest::get(&system_path(container))),
                client.kick_off(&KickOffRequest::get(&group_path(container))),
            )
        })
        .collect();

    let local_system = download_export(local, wait_for_manifest(local, &local_system_status));
    let local_group = download_export(local, wait_for_manifest(local, &local_group_status));
    assert_line_counts_match_the_manifest("local system export", &local_system);
    assert_line_counts_match_the_manifest("local Group export", &local_group);
    assert_eq!(local_system.total_output_count(), loaded + 1);
    assert!(local_system.output_file_count_of("Observation") >= 10);
    assert!(local_group.output_file_count_of("Observation") >= 2);
    let group_patients = local_group
        .files
        .iter()
        .filter(|file| file.resource_type == "Patient")
        .map(|file| file.count)
        .sum::<u64>();
    assert_eq!(group_patients, GROUP_MEMBER_COUNT as u64);

    for (index, ((backend, container), (system_status, group_status))) in backends
        .iter()
        .zip(&containers)
        .zip(&remote_statuses)
        .enumerate()
    {
        let client = &servers.clients[index + 1];
        let system_completion = wait_for_manifest(client, system_status);
        let group_completion = wait_for_manifest(client, group_status);
        assert_eq!(system_completion.manifest["requiresAccessToken"], false);
        assert_urls_are_server_downloads(&system_completion.manifest, client, system_status);
        assert_urls_are_server_downloads(&group_completion.manifest, client, group_status);
        let system = download_export(client, system_completion);
        let group = download_export(client, group_completion);
        assert_exports_are_identical(
            &format!("{} system export", backend.label()),
            &system,
            &local_system,
        );
        assert_exports_are_identical(
            &format!("{} Group export", backend.label()),
            &group,
            &local_group,
        );
        assert_container_holds_exactly(
            backend,
            container,
            &[
                (job_id_of(system_status).as_str(), &system),
                (job_id_of(group_status).as_str(), &group),
            ],
        );
    }
    assert_eq!(
        store.high_water_seq().expect("reading the high-water seq"),
        snapshot_seq,
        "the store changed while exporting"
    );
    drop(servers);
}

fn assert_missing_container_is_refused_then_created_when_allowed(backend: &StorageBackend) {
    let container = unique_container_name("created-on-demand");
    let fixture = ExportFixture::start_over_small_sample(
        vec![
            backend.storage("fhirlog-exports", true),
            backend.storage("fhirlog-exports", false),
        ],
        500,
    );
    let creating = fixture.client(0);
    let refusing = fixture.client(1);
    let export_path = format!("/$export?_container={container}");

    let refused = refusing.send_kick_off(&KickOffRequest::get(&export_path));
    refused.expect_operation_outcome(StatusCode::BAD_REQUEST, &[&container, "does not exist"]);

    let first_status = creating.kick_off(&KickOffRequest::get(&export_path));
    let first = download_export(creating, wait_for_manifest(creating, &first_status));
    assert_line_counts_match_the_manifest(backend.label(), &first);
    assert!(first.output_file_count_of("Condition") >= 2);

    let second_status = refusing.kick_off(&KickOffRequest::get(&export_path));
    let second = download_export(refusing, wait_for_manifest(refusing, &second_status));
    assert_exports_are_identical(
        &format!(
            "{} second export into the created container",
            backend.label()
        ),
        &second,
        &first,
    );
    let first_job = job_id_of(&first_status);
    let second_job = job_id_of(&second_status);
    assert_ne!(first_job, second_job);
    assert_container_holds_exactly(
        backend,
        &container,
        &[(first_job.as_str(), &first), (second_job.as_str(), &second)],
    );
}

#[test]
#[cfg_attr(
    not(fhirlog_test_s3),
    ignore = "needs moto: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (.ci/run does)"
)]
fn s3_missing_container_is_refused_at_kick_off_and_created_when_allowed() {
    assert_missing_container_is_refused_then_created_when_allowed(&moto_backend());
}

#[test]
#[cfg_attr(
    not(fhirlog_test_azurite),
    ignore = "needs Azurite: set AZURITE_BLOB_STORAGE_URL (.ci/run does)"
)]
fn azurite_missing_container_is_refused_at_kick_off_and_created_when_allowed() {
    assert_missing_container_is_refused_then_created_when_allowed(&azurite_backend());
}

fn assert_signed_urls_download_from_storage_without_credentials(backend: &StorageBackend) {
    let container = unique_container_name("signed-urls");
    let fixture = ExportFixture::start_over_small_sample(
        vec![StorageSettings {
            signed_url_ttl: Some(Duration::from_secs(600)),
            ..backend.storage(&container, true)
        }],
        500,
    );
    let client = fixture.client(0);
    let status_url = client.kick_off(&KickOffRequest::get(&format!(
        "/$export?_container={container}"
    )));
    let job_id = job_id_of(&status_url);
    let completion = wait_for_manifest(client, &status_url);
    let manifest = completion.manifest.clone();
    assert_eq!(manifest["requiresAccessToken"], false, "{manifest}");
    let items = manifest_items(&manifest);
    assert!(items.len() >= 3, "{manifest}");
    let storage_prefix = format!("{}/", backend.server_url());
    for (_, item) in &items {
        let url = item["url"].as_str().expect("a manifest item has a url");
        assert!(
            url.starts_with(&storage_prefix) && !url.starts_with(&client.base_url),
            "{}: {url} does not point at the storage server {storage_prefix}",
            backend.label()
        );
        assert!(
            url.contains(&container) && url.contains(&job_id),
            "{url} does not name the container and the job folder"
        );
    }
    let signed = download_export(client, completion);
    assert_line_counts_match_the_manifest(backend.label(), &signed);
    for file in &signed.files {
        let streamed = client.fetch_ndjson(&format!(
            "{}/$export-file/{job_id}/{}",
            client.base_url, file.name
        ));
        assert!(
            streamed == file.bytes,
            "{}: {} from the signed URL ({} bytes) differs from the server download ({} bytes)",
            backend.label(),
            file.name,
            file.bytes.len(),
            streamed.len()
        );
    }
}

#[test]
#[cfg_attr(
    not(fhirlog_test_s3),
    ignore = "needs moto: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (.ci/run does)"
)]
fn s3_signed_manifest_urls_point_at_storage_and_download_without_credentials() {
    assert_signed_urls_download_from_storage_without_credentials(&moto_backend());
}

#[test]
#[cfg_attr(
    not(fhirlog_test_azurite),
    ignore = "needs Azurite: set AZURITE_BLOB_STORAGE_URL (.ci/run does)"
)]
fn azurite_signed_manifest_urls_point_at_storage_and_download_without_credentials() {
    assert_signed_urls_download_from_storage_without_credentials(&azurite_backend());
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyMode {
    Forward,
    /// Accept and close at once, without an answer.
    Refuse,
    /// Answer every request `403 Forbidden` with an S3 `AccessDenied` body.
    AnswerForbidden,
}

/// A TCP proxy in front of a storage server whose behaviour can be switched; a switch
/// closes every open connection so pooled ones cannot bypass it.
struct FaultInjectingProxy {
    address: SocketAddr,
    mode: Arc<tokio::sync::watch::Sender<ProxyMode>>,
    runtime: Option<tokio::runtime::Runtime>,
}

const FORBIDDEN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>fhirlog-test-proxy</RequestId></Error>";

impl FaultInjectingProxy {
    fn start(upstream: SocketAddr) -> FaultInjectingProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building the proxy runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the proxy");
        let address = listener.local_addr().expect("the proxy address");
        let (mode_sender, _) = tokio::sync::watch::channel(ProxyMode::Forward);
        let mode = Arc::new(mode_sender);
        let accepting_mode = Arc::clone(&mode);
        runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((connection, _)) => {
                        tokio::spawn(serve_proxied_connection(
                            connection,
                            upstream,
                            accepting_mode.subscribe(),
                        ));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        FaultInjectingProxy {
            address,
            mode,
            runtime: Some(runtime),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_if_modified(|current| {
            let changed = *current != mode;
            *current = mode;
            changed
        });
    }
}

impl Drop for FaultInjectingProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve_proxied_connection(
    mut connection: TcpStream,
    upstream: SocketAddr,
    mut mode: tokio::sync::watch::Receiver<ProxyMode>,
) {
    let current = *mode.borrow_and_update();
    match current {
        ProxyMode::Forward => {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut connection, &mut server) => {}
                _ = mode.changed() => {}
            }
        }
        ProxyMode::Refuse => close_after_draining(connection).await,
        ProxyMode::AnswerForbidden => {
            if read_request_head_and_body(&mut connection).await {
                let response = format!(
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{FORBIDDEN_BODY}",
                    FORBIDDEN_BODY.len()
                );
                let _ = connection.write_all(response.as_bytes()).await;
            }
            close_after_draining(connection).await;
        }
    }
}

/// Sends FIN and reads until the peer closes, so the peer sees a clean close rather
/// than a reset.
async fn close_after_draining(mut connection: TcpStream) {
    let _ = connection.shutdown().await;
    let mut buffer = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connection
            .read(&mut buffer)
            .await
            .is_ok_and(|read| read > 0)
        {}
    })
    .await;
}

/// Reads one request's head and its `Content-Length` body; false when the peer closed.
async fn read_request_head_and_body(connection: &mut TcpStream) -> bool {
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let head_end = loop {
        if let Some(position) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break position + 4;
        }
        match connection.read(&mut buffer).await {
            Ok(0) | Err(_) => return false,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let body_length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let mut body_received = received.len() - head_end;
    while body_received < body_length {
        match connection.read(&mut buffer).await {
            Ok(0) | Err(_) => return false,
            Ok(read) => body_received += read,
        }
    }
    true
}

/// `fhirlog serve` as a child process with extra arguments and environment; dropping it
/// kills the child.
/// The status names the container and the kind of failure; the storage server's own
/// words (`logged_cause`) and its endpoint are only in the server log.
fn assert_failed_status_names_container_and_error(
    reply: &Reply,
    container: &str,
    error_fragment: &str,
    logged_cause: &str,
    server_log: &str,
) {
    assert!(
        reply.status.is_server_error(),
        "expected a 5xx failure, got {}: {}\nserver log:\n{server_log}",
        reply.status,
        reply.text
    );
    reply.expect_operation_outcome(reply.status, &[container, error_fragment]);
    for leaked in [logged_cause, "http://", "127.0.0.1"] {
        assert!(
            !reply.text.contains(leaked),
            "the failed status shows '{leaked}': {}",
            reply.text
        );
    }
    assert!(
        server_log.contains(logged_cause),
        "the server log does not have the cause '{logged_cause}':\n{server_log}"
    );
}

/// `fhirlog serve` over the small sample, exporting to a fresh default container of
/// `backend` reached through `proxy`.
struct ServerBehindProxy {
    server: ServerProcess,
    container: String,
    _work_dir: TempDir,
}

fn serve_behind_proxy(
    backend: &StorageBackend,
    proxy: &FaultInjectingProxy,
    destination_timeout: Duration,
) -> ServerBehindProxy {
    let container = unique_container_name("through-proxy");
    let work_dir = TempDir::new().expect("creating a work directory");
    let (storage, environment) = backend.serve_storage(&container, &proxy.url());
    let mut arguments: Vec<String> = [
        "--storage",
        storage.as_str(),
        "--create-containers",
        "--destination-timeout",
        &format!("{}s", destination_timeout.as_secs()),
        "--workers",
        "2",
        "--max-resources-per-file",
        "500",
        "--load",
    ]
    .iter()
    .map(|argument| argument.to_string())
    .collect();
    arguments.extend(
        small_sample_paths()
            .iter()
            .map(|path| path.display().to_string()),
    );
    ServerBehindProxy {
        server: ServerProcess::start_with_environment(
            &work_dir.path().join("data"),
            &arguments.iter().map(String::as_str).collect::<Vec<_>>(),
            &environment,
        ),
        container,
        _work_dir: work_dir,
    }
}

/// The last attempt's backoff sleep may end after the destination timeout: it is at
/// most about the time already spent retrying.
fn latest_failure_for(destination_timeout: Duration) -> Duration {
    destination_timeout * 2 + Duration::from_secs(2)
}

fn assert_storage_failures_end_the_export_and_never_leave_it_in_progress(backend: &StorageBackend) {
    let destination_timeout = Duration::from_secs(3);
    let proxy = FaultInjectingProxy::start(backend.server_address());
    let behind_proxy = serve_behind_proxy(backend, &proxy, destination_timeout);
    let client = &BulkClient::new(&behind_proxy.server.base_url);
    let container = behind_proxy.container.as_str();
    let label = backend.label();

    let opening_status = client.kick_off(&KickOffRequest::get("/$export"));
    let opening = download_export(client, wait_for_manifest(client, &opening_status));
    assert!(opening.output_file_count_of("Condition") >= 2);

    proxy.set_mode(ProxyMode::Refuse);
    let refused_status = client.kick_off(&KickOffRequest::get("/$export"));
    let (refused_reply, refused_after) =
        client.poll_until_finished(&refused_status, latest_failure_for(destination_timeout) * 2);
    assert_failed_status_names_container_and_error(
        &refused_reply,
        container,
        "did not answer",
        "error sending request",
        &behind_proxy.server.log(),
    );
    assert!(
        refused_after <= latest_failure_for(destination_timeout),
        "{label}: the export failed only after {refused_after:?} with a destination timeout of {destination_timeout:?}"
    );

    proxy.set_mode(ProxyMode::AnswerForbidden);
    let forbidden_status = client.kick_off(&KickOffRequest::get("/$export"));
    let (forbidden_reply, forbidden_after) = client.poll_until_finished(
        &forbidden_status,
        latest_failure_for(destination_timeout) * 2,
    );
    assert_failed_status_names_container_and_error(
        &forbidden_reply,
        container,
        "denied access",
        "403 Forbidden",
        &behind_proxy.server.log(),
    );
    let forbidden_job = job_id_of(&forbidden_status);
    let server_log = behind_proxy.server.log();
    let retries_of_forbidden_job: Vec<&str> = server_log
        .lines()
        .filter(|line| line.contains(&forbidden_job) && line.contains("retrying"))
        .collect();
    assert!(
        retries_of_forbidden_job.is_empty(),
        "{label}: a 403 is permanent, yet the export retried it:\n{}",
        retries_of_forbidden_job.join("\n")
    );
    assert!(
        forbidden_after <= latest_failure_for(destination_timeout),
        "{label}: a 403 failed the export only after {forbidden_after:?} (destination timeout {destination_timeout:?})"
    );

    proxy.set_mode(ProxyMode::Forward);
    let after_outages_status = client.kick_off(&KickOffRequest::get("/$export"));
    let after_outages = download_export(client, wait_for_manifest(client, &after_outages_status));
    assert_exports_are_identical(
        &format!("{label} export after the outages"),
        &after_outages,
        &opening,
    );
    for (status_url, expected) in [
        (&opening_status, StatusCode::OK),
        (&refused_status, refused_reply.status),
        (&forbidden_status, forbidden_reply.status),
        (&after_outages_status, StatusCode::OK),
    ] {
        let reply = client.status(status_url);
        assert_eq!(
            reply.status, expected,
            "{label}: {status_url} changed state: {}",
            reply.text
        );
    }
    let log = behind_proxy.server.log();
    assert!(
        !log.contains("panicked"),
        "{label}: the server panicked:\n{log}"
    );
}

#[test]
#[cfg_attr(
    not(fhirlog_test_s3),
    ignore = "needs moto: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (.ci/run does)"
)]
fn s3_outages_and_denials_fail_the_export_in_time_and_never_leave_it_in_progress() {
    assert_storage_failures_end_the_export_and_never_leave_it_in_progress(&moto_backend());
}

#[test]
#[cfg_attr(
    not(fhirlog_test_azurite),
    ignore = "needs Azurite: set AZURITE_BLOB_STORAGE_URL (.ci/run does)"
)]
fn azurite_outages_and_denials_fail_the_export_in_time_and_never_leave_it_in_progress() {
    assert_storage_failures_end_the_export_and_never_leave_it_in_progress(&azurite_backend());
}

const OUTAGE_ROUNDS: usize = 5;

fn assert_exports_outlive_one_second_outages(backend: &StorageBackend) {
    let destination_timeout = Duration::from_secs(10);
    let proxy = FaultInjectingProxy::start(backend.server_address());
    let behind_proxy = serve_behind_proxy(backend, &proxy, destination_timeout);
    let client = &BulkClient::new(&behind_proxy.server.base_url);
    let label = backend.label();

    let normal_status = client.kick_off(&KickOffRequest::get("/$export"));
    let normal = download_export(client, wait_for_manifest(client, &normal_status));
    for round in 1..=OUTAGE_ROUNDS {
        proxy.set_mode(ProxyMode::Refuse);
        let status_url = client.kick_off(&KickOffRequest::get("/$export"));
        std::thread::sleep(Duration::from_secs(1));
        proxy.set_mode(ProxyMode::Forward);
        let (reply, _) = client.poll_until_finished(&status_url, EXPORT_DEADLINE);
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{label}: outage {round} of {OUTAGE_ROUNDS} (1 s, destination timeout {destination_timeout:?}) failed the export: {}\nthe server's log since its kick-off:\n{}",
            reply.text,
            server_log_since_job(&behind_proxy.server.log(), &job_id_of(&status_url))
        );
        assert_exports_are_identical(
            &format!("{label} export that outlived outage {round}"),
            &download_export(client, Completion::of_manifest(&status_url, reply.json())),
            &normal,
        );
    }
}

#[test]
#[cfg_attr(
    not(fhirlog_test_s3),
    ignore = "needs moto: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (.ci/run does)"
)]
fn s3_exports_outlive_one_second_storage_outages_well_within_the_destination_timeout() {
    assert_exports_outlive_one_second_outages(&moto_backend());
}

#[test]
#[cfg_attr(
    not(fhirlog_test_azurite),
    ignore = "needs Azurite: set AZURITE_BLOB_STORAGE_URL (.ci/run does)"
)]
fn azurite_exports_outlive_one_second_storage_outages_well_within_the_destination_timeout() {
    assert_exports_outlive_one_second_outages(&azurite_backend());
}

struct FinishedServe {
    status: ExitStatus,
    stderr: String,
    elapsed: Duration,
}

/// Runs `fhirlog serve` expecting it to exit by itself within `limit`.
fn run_serve_expecting_exit(
    arguments: &[&str],
    environment: &[(String, String)],
    limit: Duration,
) -> FinishedServe {
    let work_dir = TempDir::new().expect("creating a work directory");
    let stderr_path = work_dir.path().join("stderr.log");
    let started = Instant::now();
    let mut child = fhirlog_command()
        .arg("serve")
        .arg("--data-dir")
        .arg(work_dir.path().join("data"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_local_port()))
        .args(arguments)
        .envs(environment.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).expect("creating the stderr file"))
        .spawn()
        .expect("starting fhirlog serve");
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling fhirlog serve") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fhirlog serve {arguments:?} was still running after {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    FinishedServe {
        status,
        elapsed: started.elapsed(),
        stderr: std::fs::read_to_string(&stderr_path).expect("reading stderr"),
    }
}

fn assert_refused_to_start(finished: &FinishedServe, fragments: &[&str]) {
    assert!(
        !finished.status.success(),
        "fhirlog serve succeeded; stderr:\n{}",
        finished.stderr
    );
    for forbidden in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(
            !finished.stderr.contains(forbidden),
            "stderr shows a panic:\n{}",
            finished.stderr
        );
    }
    let matching: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|line| {
            line.starts_with("fhirlog: ")
                && fragments.iter().all(|fragment| line.contains(fragment))
        })
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one 'fhirlog: ' error line mentioning {fragments:?}; stderr:\n{}",
        finished.stderr
    );
}

/// The refusal is the whole of stderr: one non-empty line.
fn assert_stderr_is_one_line(finished: &FinishedServe) {
    assert_eq!(
        finished
            .stderr
            .lines()
            .filter(|line| !line.trim().is_empty())
            .count(),
        1,
        "stderr:\n{}",
        finished.stderr
    );
}

#[test]
#[cfg_attr(
    not(fhirlog_test_s3),
    ignore = "needs moto: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (.ci/run does)"
)]
fn serve_refuses_to_start_when_the_default_s3_bucket_does_not_exist() {
    let StorageBackend::MotoS3 { endpoint } = moto_backend() else {
        unreachable!("moto_backend is S3");
    };
    let bucket = unique_container_name("missing-bucket");
    let storage = format!("s3://{bucket}?endpoint={endpoint}&allow_http=true");
    let finished = run_serve_expecting_exit(&["--storage", &storage], &[], Duration::from_secs(30));
    assert_refused_to_start(&finished, &[&bucket, "does not exist"]);
    assert_stderr_is_one_line(&finished);
}

#[test]
#[cfg_attr(
    not(fhirlog_test_azurite),
    ignore = "needs Azurite: set AZURITE_BLOB_STORAGE_URL (.ci/run does)"
)]
fn serve_refuses_to_start_when_the_default_azurite_container_does_not_exist() {
    azurite_backend();
    let container = unique_container_name("missing-container");
    let storage = format!("az://{container}?emulator=true");
    let finished = run_serve_expecting_exit(&["--storage", &storage], &[], Duration::from_secs(30));
    assert_refused_to_start(&finished, &[&container, "does not exist"]);
    assert_stderr_is_one_line(&finished);
}

#[test]
#[cfg_attr(
    not(fhirlog_test_s3),
    ignore = "needs moto: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (.ci/run does)"
)]
fn serve_gives_up_on_unreachable_s3_storage_within_the_destination_timeout() {
    moto_backend();
    let storage = "s3://unreachable-bucket?endpoint=http://127.0.0.1:1&allow_http=true";
    let finished = run_serve_expecting_exit(
        &["--storage", storage, "--destination-timeout", "2s"],
        &[],
        Duration::from_secs(20),
    );
    assert_refused_to_start(
        &finished,
        &["s3 at http://127.0.0.1:1", "unreachable-bucket"],
    );
    assert!(
        finished.elapsed < Duration::from_secs(10),
        "gave up only after {:?}",
        finished.elapsed
    );
}

#[test]
fn serve_rejects_malformed_storage_urls_naming_the_problem() {
    for (storage, problem) in [
        ("s3://Bad_Bucket", "not a valid container name"),
        ("gs://exports", "unknown scheme 'gs'"),
        (
            "s3://exports?endpont=http://127.0.0.1:9000",
            "unknown option 'endpont'",
        ),
        ("az://exports", "account"),
        ("exports", "expected file:///path"),
        (
            "s3://exports?allow_http=yes",
            "allow_http must be true or false",
        ),
    ] {
        let finished =
            run_serve_expecting_exit(&["--storage", storage], &[], Duration::from_secs(30));
        assert_refused_to_start(&finished, &[storage, problem]);
    }
}

/// `GET url` with `headers` through the harness's raw client: status, headers, body bytes.
fn get_with_headers(
    http: &FhirClient,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let reply = http.get_raw(url, headers);
    (reply.status, reply.headers, reply.body)
}

fn header_text<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Ranged downloads of a file the server reads from `backend`, then the same download
/// while the storage refuses connections: a 503 within seconds, not the destination
/// timeout, and ranges work again once the storage is back.
fn assert_downloads_are_ranged_and_fail_fast_on_dead_storage(backend: &StorageBackend) {
    let destination_timeout = Duration::from_secs(60);
    let proxy = FaultInjectingProxy::start(backend.server_address());
    let behind_proxy = serve_behind_proxy(backend, &proxy, destination_timeout);
    let client = &BulkClient::new(&behind_proxy.server.base_url);
    let label = backend.label();
    let status_url = client.kick_off(&KickOffRequest::get("/$export"));
    let completion = wait_for_manifest(client, &status_url);
    assert_urls_are_server_downloads(&completion.manifest, client, &status_url);
    let http = &client.absolute;
    let url = manifest_items(&completion.manifest)
        .into_iter()
        .filter(|(kind, _)| kind == "output")
        .map(|(_, item)| item["url"].as_str().expect("a file url").to_owned())
        .max_by_key(|url| client.fetch_ndjson(url).len())
        .expect("an output file");

    let (status, headers, whole) = get_with_headers(http, &url, &[]);
    assert_eq!(status, StatusCode::OK, "{label}: GET {url}");
    assert_eq!(header_text(&headers, "accept-ranges"), Some("bytes"));
    let entity_tag = header_text(&headers, "etag").expect("an ETag").to_owned();
    assert!(
        entity_tag.starts_with('"'),
        "{label}: weak ETag {entity_tag}"
    );
    let size = whole.len();
    assert!(size > 1_000, "{label}: {url} has only {size} bytes");

    let (status, headers, tail) = get_with_headers(
        http,
        &url,
        &[("Range", "bytes=500-"), ("If-Range", &entity_tag)],
    );
    assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{label}");
    assert_eq!(
        header_text(&headers, "content-range"),
        Some(format!("bytes 500-{}/{size}", size - 1).as_str())
    );
    assert_eq!(header_text(&headers, "etag"), Some(entity_tag.as_str()));
    assert_eq!(tail, &whole[500..], "{label}: the resumed tail");
    let (status, _, head) = get_with_headers(http, &url, &[("Range", "bytes=0-99")]);
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(head, &whole[..100]);
    let (status, _, last) = get_with_headers(http, &url, &[("Range", "bytes=-10")]);
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(last, &whole[size - 10..]);
    let (status, headers, _) =
        get_with_headers(http, &url, &[("Range", &format!("bytes={size}-"))]);
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{label}");
    assert_eq!(
        header_text(&headers, "content-range"),
        Some(format!("bytes */{size}").as_str())
    );
    let (status, _, full) = get_with_headers(
        http,
        &url,
        &[("Range", "bytes=0-99"), ("If-Range", "\"stale\"")],
    );
    assert_eq!(status, StatusCode::OK, "{label}: a stale If-Range");
    assert_eq!(full, whole);

    proxy.set_mode(ProxyMode::Refuse);
    let started = Instant::now();
    let (status, headers, body) = get_with_headers(http, &url, &[("Range", "bytes=0-99")]);
    let answered_after = started.elapsed();
    println!("{label}: a download from dead storage answered {status} after {answered_after:?}");
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{label}: a download from dead storage: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(header_text(&headers, "retry-after").is_some());
    let outcome: Value = serde_json::from_slice(&body).expect("an OperationOutcome");
    let diagnostics = outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default();
    assert!(
        diagnostics.contains(&behind_proxy.container) && diagnostics.len() < 300,
        "{label}: {diagnostics}"
    );
    assert!(
        answered_after < destination_timeout / 6,
        "{label}: the download answered only after {answered_after:?} (destination timeout {destination_timeout:?})"
    );

    proxy.set_mode(ProxyMode::Forward);
    let (status, _, again) = get_with_headers(http, &url, &[("Range", "bytes=500-")]);
    assert_eq!(
        status,
        StatusCode::PARTIAL_CONTENT,
        "{label}: after the outage"
    );
    assert_eq!(again, &whole[500..]);
}

#[test]
#[cfg_attr(
    not(fhirlog_test_s3),
    ignore = "needs moto: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (.ci/run does)"
)]
fn s3_downloads_are_ranged_and_answer_503_at_once_while_storage_is_down() {
    assert_downloads_are_ranged_and_fail_fast_on_dead_storage(&moto_backend());
}

#[test]
#[cfg_attr(
    not(fhirlog_test_azurite),
    ignore = "needs Azurite: set AZURITE_BLOB_STORAGE_URL (.ci/run does)"
)]
fn azurite_downloads_are_ranged_and_answer_503_at_once_while_storage_is_down() {
    assert_downloads_are_ranged_and_fail_fast_on_dead_storage(&azurite_backend());
}

/// `fhirlog serve` against storage on a closed port exits within seconds with a short
/// refusal line naming the container and the refused connection once.
fn assert_serve_gives_up_at_once_on_a_closed_port(storage: &str, environment: &[(String, String)]) {
    let finished = run_serve_expecting_exit(
        &["--storage", storage, "--destination-timeout", "120s"],
        environment,
        Duration::from_secs(60),
    );
    assert_refused_to_start(&finished, &["'fail-fast'", "unreachable"]);
    let refusal = finished
        .stderr
        .lines()
        .find(|line| line.starts_with("fhirlog: "))
        .expect("a refusal line");
    assert_eq!(
        refusal.matches("Connection refused").count(),
        1,
        "the cause is not named exactly once: {refusal}"
    );
    assert!(refusal.chars().count() < 400, "a long refusal: {refusal}");
    assert!(
        finished.elapsed < Duration::from_secs(10),
        "gave up only after {:?}",
        finished.elapsed
    );
}

#[test]
fn serve_gives_up_on_s3_at_a_closed_port_within_seconds_with_a_short_refusal() {
    let endpoint = format!("http://127.0.0.1:{}", free_local_port());
    assert_serve_gives_up_at_once_on_a_closed_port(
        &format!("s3://fail-fast?endpoint={endpoint}&allow_http=true"),
        &[
            ("AWS_ACCESS_KEY_ID".to_owned(), "fail-fast".to_owned()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), "fail-fast".to_owned()),
        ],
    );
}

#[test]
fn serve_gives_up_on_azure_at_a_closed_port_within_seconds_with_a_short_refusal() {
    assert_serve_gives_up_at_once_on_a_closed_port(
        "az://fail-fast?emulator=true",
        &[(
            "AZURITE_BLOB_STORAGE_URL".to_owned(),
            format!("http://127.0.0.1:{}", free_local_port()),
        )],
    );
}
