//! Bulk Data exports to real object storage: moto (S3) and Azurite (Azure Blob), as
//! started by `.ci/run`. Every test that needs a storage server skips with a printed
//! reason when its environment variables are absent.

mod support;

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirlog::config::RequestLimits;
use fhirlog::export::{ExportEngine, ExportSettings};
use fhirlog::http::ServerParts;
use fhirlog::load::{LoadOptions, OnError, load};
use fhirlog::sink::{
    AzureDestination, ContainerName, Destination, LocalDestination, S3Destination,
};
use fhirlog::store::{Store, StoreOptions};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{FhirClient, Reply, ServerProcess, fhirlog_command, free_local_port};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EXPORT_KICK_OFF_HEADERS: [(&str, &str); 2] = [
    ("Accept", "application/fhir+json"),
    ("Prefer", "respond-async"),
];
const NDJSON_CONTENT_TYPE: &str = "application/fhir+ndjson";
const EXPORT_COMPLETION_LIMIT: Duration = Duration::from_secs(120);
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(50);
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

    fn destination(
        &self,
        default_container: &str,
        create_containers: bool,
        destination_timeout: Duration,
    ) -> Arc<dyn Destination> {
        let default_container =
            ContainerName::parse(default_container).expect("a valid container name");
        match self {
            StorageBackend::MotoS3 { endpoint } => Arc::new(S3Destination::new(
                default_container,
                Some(endpoint.clone()),
                "us-east-1".to_owned(),
                true,
                create_containers,
                destination_timeout,
            )),
            StorageBackend::Azurite { .. } => Arc::new(AzureDestination::new(
                default_container,
                None,
                true,
                create_containers,
                destination_timeout,
            )),
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

fn moto_or_skip() -> Option<StorageBackend> {
    let backend = StorageBackend::moto_from_environment();
    if backend.is_none() {
        println!(
            "skipped: set FHIRLOG_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (a running moto_server) to run"
        );
    }
    backend
}

fn azurite_or_skip() -> Option<StorageBackend> {
    let backend = StorageBackend::azurite_from_environment();
    if backend.is_none() {
        println!("skipped: set AZURITE_BLOB_STORAGE_URL (a running azurite-blob) to run");
    }
    backend
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
    }
}

struct ExportServerSpec {
    destination: Arc<dyn Destination>,
    signed_url_ttl: Option<Duration>,
}

/// Servers in this process, each with its own export engine and destination over one
/// shared store; dropping them shuts every server down.
struct InProcessExportServers {
    clients: Vec<FhirClient>,
    shutdown_senders: Vec<tokio::sync::oneshot::Sender<()>>,
    server_tasks: Vec<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Starts every engine before any export is submitted: an engine resumes the unfinished
/// jobs it finds in the store, so a later one would adopt the others' jobs.
fn start_export_servers(
    store: &Store,
    specs: Vec<ExportServerSpec>,
    settings: &ExportSettings,
) -> InProcessExportServers {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the server runtime");
    let mut servers = InProcessExportServers {
        clients: Vec::new(),
        shutdown_senders: Vec::new(),
        server_tasks: Vec::new(),
        runtime: None,
    };
    for spec in specs {
        let engine = ExportEngine::start(
            store.clone(),
            spec.destination,
            settings.clone(),
            runtime.handle().clone(),
        )
        .expect("starting an export engine");
        let parts = ServerParts {
            store: store.clone(),
            exports: Arc::new(engine),
            base_url: None,
            limits: RequestLimits::default(),
            signed_url_ttl: spec.signed_url_ttl,
        };
        let (shutdown_sender, shutdown_receiver) = tokio::sync::oneshot::channel::<()>();
        let listen_address: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
        let (bound_address, server) = runtime
            .block_on(fhirlog::http::bind_parts(
                parts,
                listen_address,
                async move {
                    let _ = shutdown_receiver.await;
                },
            ))
            .expect("binding a server to port 0");
        servers.server_tasks.push(runtime.spawn(server));
        servers.shutdown_senders.push(shutdown_sender);
        servers
            .clients
            .push(FhirClient::new(&format!("http://{bound_address}/fhir")));
    }
    servers.runtime = Some(runtime);
    servers
}

impl Drop for InProcessExportServers {
    fn drop(&mut self) {
        for sender in self.shutdown_senders.drain(..) {
            let _ = sender.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            for task in self.server_tasks.drain(..) {
                let joined = runtime.block_on(task);
                if joined.is_err() && !std::thread::panicking() {
                    panic!("an in-process export server panicked");
                }
            }
            runtime.shutdown_timeout(Duration::from_secs(10));
        }
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
        specs: Vec<ExportServerSpec>,
        max_resources_per_file: u64,
    ) -> ExportFixture {
        let data_dir = TempDir::new().expect("creating a data directory");
        let (store, _) = open_store_loading(&data_dir, small_sample_paths());
        let servers = start_export_servers(&store, specs, &export_settings(max_resources_per_file));
        ExportFixture {
            servers,
            _data_dir: data_dir,
        }
    }

    fn client(&self, index: usize) -> &FhirClient {
        &self.servers.clients[index]
    }
}

fn kick_off_export(client: &FhirClient, path: &str) -> Reply {
    client.send(reqwest::Method::GET, path, &EXPORT_KICK_OFF_HEADERS, None)
}

fn accepted_status_url(reply: &Reply) -> String {
    assert_eq!(
        reply.status,
        StatusCode::ACCEPTED,
        "kick-off was not accepted: {}",
        reply.text
    );
    reply.required_header("content-location").to_owned()
}

fn kick_off_accepted(client: &FhirClient, path: &str) -> String {
    accepted_status_url(&kick_off_export(client, path))
}

fn job_id_of(status_url: &str) -> String {
    status_url
        .rsplit('/')
        .next()
        .expect("a status URL ends in the job id")
        .to_owned()
}

fn relative_to_base<'a>(client: &FhirClient, url: &'a str) -> &'a str {
    url.strip_prefix(client.base_url.as_str())
        .unwrap_or_else(|| panic!("{url} is not under {}", client.base_url))
}

/// Polls the status URL until the job is no longer in progress; returns the final reply
/// and how long that took.
fn poll_until_finished(
    client: &FhirClient,
    status_url: &str,
    limit: Duration,
) -> (Reply, Duration) {
    let started = Instant::now();
    loop {
        let reply = client.get(relative_to_base(client, status_url));
        if reply.status != StatusCode::ACCEPTED {
            return (reply, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "{status_url} was still in progress after {limit:?} (X-Progress: {:?})",
            reply.header("x-progress")
        );
        std::thread::sleep(STATUS_POLL_INTERVAL);
    }
}

fn wait_for_manifest(client: &FhirClient, status_url: &str) -> Value {
    let (reply, _) = poll_until_finished(client, status_url, EXPORT_COMPLETION_LIMIT);
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{status_url} did not complete: {}",
        reply.text
    );
    reply.json()
}

fn download_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("building the download client")
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

fn get_ndjson(http: &reqwest::blocking::Client, url: &str) -> Vec<u8> {
    let response = http
        .get(url)
        .send()
        .unwrap_or_else(|error| panic!("GET {url} got no answer: {error}"));
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap_or_default().to_owned());
    assert_eq!(
        content_type.as_deref(),
        Some(NDJSON_CONTENT_TYPE),
        "Content-Type of {url}"
    );
    response
        .bytes()
        .unwrap_or_else(|error| panic!("reading {url}: {error}"))
        .to_vec()
}

/// Downloads every file of a manifest from the URL the manifest gives.
fn download_export(manifest: &Value) -> DownloadedExport {
    let http = download_client();
    let files = manifest_items(manifest)
        .into_iter()
        .map(|(kind, item)| {
            let url = item["url"].as_str().expect("a manifest item has a url");
            DownloadedFile {
                kind,
                resource_type: item["type"].as_str().unwrap_or_default().to_owned(),
                count: item["count"].as_u64().expect("a manifest item has a count"),
                name: file_name_of(url),
                bytes: get_ndjson(&http, url),
            }
        })
        .collect();
    DownloadedExport {
        transaction_time: manifest["transactionTime"]
            .as_str()
            .expect("a manifest has a transactionTime")
            .to_owned(),
        files,
    }
}

fn assert_urls_are_server_downloads(manifest: &Value, client: &FhirClient, status_url: &str) {
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
    let destination = backend.destination(container, false, Duration::from_secs(20));
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
fn system_and_group_exports_to_s3_and_azurite_equal_a_local_export_of_the_same_snapshot() {
    let backends: Vec<StorageBackend> = [moto_or_skip(), azurite_or_skip()]
        .into_iter()
        .flatten()
        .collect();
    if backends.is_empty() {
        return;
    }
    let local_root = TempDir::new().expect("creating the local export root");
    let containers: Vec<String> = backends
        .iter()
        .map(|_| unique_container_name("same-snapshot"))
        .collect();
    let mut specs = vec![ExportServerSpec {
        destination: Arc::new(LocalDestination::new(local_root.path().to_path_buf(), true)),
        signed_url_ttl: None,
    }];
    for (backend, container) in backends.iter().zip(&containers) {
        specs.push(ExportServerSpec {
            destination: backend.destination(container, true, Duration::from_secs(30)),
            signed_url_ttl: None,
        });
    }
    let data_dir = TempDir::new().expect("creating a data directory");
    let (store, loaded) = open_store_loading(&data_dir, vec![sample_directory()]);
    let servers = start_export_servers(&store, specs, &export_settings(2_000));
    let local = &servers.clients[0];
    put_sample_group(local, &first_sample_patient_ids(GROUP_MEMBER_COUNT));
    let snapshot_seq = store.high_water_seq().expect("reading the high-water seq");

    let system_path = |container: &str| format!("/$export?_container={container}");
    let group_path = |container: &str| format!("/Group/{GROUP_ID}/$export?_container={container}");
    let local_system_status = kick_off_accepted(local, "/$export");
    let local_group_status = kick_off_accepted(local, &format!("/Group/{GROUP_ID}/$export"));
    let remote_statuses: Vec<(String, String)> = containers
        .iter()
        .enumerate()
        .map(|(index, container)| {
            let client = &servers.clients[index + 1];
            (
                kick_off_accepted(client, &system_path(container)),
                kick_off_accepted(client, &group_path(container)),
            )
        })
        .collect();

    let local_system = download_export(&wait_for_manifest(local, &local_system_status));
    let local_group = download_export(&wait_for_manifest(local, &local_group_status));
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
        let system_manifest = wait_for_manifest(client, system_status);
        let group_manifest = wait_for_manifest(client, group_status);
        assert_eq!(system_manifest["requiresAccessToken"], false);
        assert_urls_are_server_downloads(&system_manifest, client, system_status);
        assert_urls_are_server_downloads(&group_manifest, client, group_status);
        let system = download_export(&system_manifest);
        let group = download_export(&group_manifest);
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
            ExportServerSpec {
                destination: backend.destination("fhirlog-exports", false, Duration::from_secs(20)),
                signed_url_ttl: None,
            },
            ExportServerSpec {
                destination: backend.destination("fhirlog-exports", true, Duration::from_secs(20)),
                signed_url_ttl: None,
            },
        ],
        500,
    );
    let refusing = fixture.client(0);
    let creating = fixture.client(1);
    let export_path = format!("/$export?_container={container}");

    let refused = kick_off_export(refusing, &export_path);
    refused.expect_operation_outcome(StatusCode::BAD_REQUEST, &[&container, "does not exist"]);

    let first_status = kick_off_accepted(creating, &export_path);
    let first = download_export(&wait_for_manifest(creating, &first_status));
    assert_line_counts_match_the_manifest(backend.label(), &first);
    assert!(first.output_file_count_of("Condition") >= 2);

    let second_status = kick_off_accepted(refusing, &export_path);
    let second = download_export(&wait_for_manifest(refusing, &second_status));
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
fn s3_missing_container_is_refused_at_kick_off_and_created_when_allowed() {
    if let Some(backend) = moto_or_skip() {
        assert_missing_container_is_refused_then_created_when_allowed(&backend);
    }
}

#[test]
fn azurite_missing_container_is_refused_at_kick_off_and_created_when_allowed() {
    if let Some(backend) = azurite_or_skip() {
        assert_missing_container_is_refused_then_created_when_allowed(&backend);
    }
}

fn assert_signed_urls_download_from_storage_without_credentials(backend: &StorageBackend) {
    let container = unique_container_name("signed-urls");
    let fixture = ExportFixture::start_over_small_sample(
        vec![ExportServerSpec {
            destination: backend.destination(&container, true, Duration::from_secs(20)),
            signed_url_ttl: Some(Duration::from_secs(600)),
        }],
        500,
    );
    let client = fixture.client(0);
    let status_url = kick_off_accepted(client, &format!("/$export?_container={container}"));
    let job_id = job_id_of(&status_url);
    let manifest = wait_for_manifest(client, &status_url);
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
    let signed = download_export(&manifest);
    assert_line_counts_match_the_manifest(backend.label(), &signed);
    let http = download_client();
    for file in &signed.files {
        let streamed = get_ndjson(
            &http,
            &client.url(&format!("/$export-file/{job_id}/{}", file.name)),
        );
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
fn s3_signed_manifest_urls_point_at_storage_and_download_without_credentials() {
    if let Some(backend) = moto_or_skip() {
        assert_signed_urls_download_from_storage_without_credentials(&backend);
    }
}

#[test]
fn azurite_signed_manifest_urls_point_at_storage_and_download_without_credentials() {
    if let Some(backend) = azurite_or_skip() {
        assert_signed_urls_download_from_storage_without_credentials(&backend);
    }
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
            while let Ok((connection, _)) = listener.accept().await {
                tokio::spawn(serve_proxied_connection(
                    connection,
                    upstream,
                    accepting_mode.subscribe(),
                ));
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
fn assert_failed_status_names_container_and_error(
    reply: &Reply,
    container: &str,
    error_fragment: &str,
    server_log: &str,
) {
    assert!(
        reply.status.is_server_error(),
        "expected a 5xx failure, got {}: {}\nserver log:\n{server_log}",
        reply.status,
        reply.text
    );
    reply.expect_operation_outcome(reply.status, &[container, error_fragment]);
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
    let client = &behind_proxy.server.client;
    let container = behind_proxy.container.as_str();
    let label = backend.label();

    let opening_status = kick_off_accepted(client, "/$export");
    let opening = download_export(&wait_for_manifest(client, &opening_status));
    assert!(opening.output_file_count_of("Condition") >= 2);

    proxy.set_mode(ProxyMode::Refuse);
    let refused_status = kick_off_accepted(client, "/$export");
    let (refused_reply, refused_after) = poll_until_finished(
        client,
        &refused_status,
        latest_failure_for(destination_timeout) * 2,
    );
    assert_failed_status_names_container_and_error(
        &refused_reply,
        container,
        "error sending request",
        &behind_proxy.server.log(),
    );
    assert!(
        refused_after <= latest_failure_for(destination_timeout),
        "{label}: the export failed only after {refused_after:?} with a destination timeout of {destination_timeout:?}"
    );

    proxy.set_mode(ProxyMode::AnswerForbidden);
    let forbidden_status = kick_off_accepted(client, "/$export");
    let (forbidden_reply, forbidden_after) = poll_until_finished(
        client,
        &forbidden_status,
        latest_failure_for(destination_timeout) * 2,
    );
    assert_failed_status_names_container_and_error(
        &forbidden_reply,
        container,
        "403 Forbidden",
        &behind_proxy.server.log(),
    );
    assert!(
        forbidden_after < destination_timeout / 3,
        "{label}: a 403 failed the export only after {forbidden_after:?} (destination timeout {destination_timeout:?})"
    );

    proxy.set_mode(ProxyMode::Forward);
    let after_outages_status = kick_off_accepted(client, "/$export");
    let after_outages = download_export(&wait_for_manifest(client, &after_outages_status));
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
        let reply = client.get(relative_to_base(client, status_url));
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
fn s3_outages_and_denials_fail_the_export_in_time_and_never_leave_it_in_progress() {
    if let Some(backend) = moto_or_skip() {
        assert_storage_failures_end_the_export_and_never_leave_it_in_progress(&backend);
    }
}

#[test]
fn azurite_outages_and_denials_fail_the_export_in_time_and_never_leave_it_in_progress() {
    if let Some(backend) = azurite_or_skip() {
        assert_storage_failures_end_the_export_and_never_leave_it_in_progress(&backend);
    }
}

const OUTAGE_ROUNDS: usize = 5;

fn assert_exports_outlive_one_second_outages(backend: &StorageBackend) {
    let destination_timeout = Duration::from_secs(10);
    let proxy = FaultInjectingProxy::start(backend.server_address());
    let behind_proxy = serve_behind_proxy(backend, &proxy, destination_timeout);
    let client = &behind_proxy.server.client;
    let label = backend.label();

    let normal_status = kick_off_accepted(client, "/$export");
    let normal = download_export(&wait_for_manifest(client, &normal_status));
    for round in 1..=OUTAGE_ROUNDS {
        proxy.set_mode(ProxyMode::Refuse);
        let status_url = kick_off_accepted(client, "/$export");
        std::thread::sleep(Duration::from_secs(1));
        proxy.set_mode(ProxyMode::Forward);
        let (reply, _) = poll_until_finished(client, &status_url, EXPORT_COMPLETION_LIMIT);
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{label}: outage {round} of {OUTAGE_ROUNDS} (1 s, destination timeout {destination_timeout:?}) failed the export: {}",
            reply.text
        );
        assert_exports_are_identical(
            &format!("{label} export that outlived outage {round}"),
            &download_export(&reply.json()),
            &normal,
        );
    }
}

#[test]
fn s3_exports_outlive_one_second_storage_outages_well_within_the_destination_timeout() {
    if let Some(backend) = moto_or_skip() {
        assert_exports_outlive_one_second_outages(&backend);
    }
}

#[test]
fn azurite_exports_outlive_one_second_storage_outages_well_within_the_destination_timeout() {
    if let Some(backend) = azurite_or_skip() {
        assert_exports_outlive_one_second_outages(&backend);
    }
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
fn serve_refuses_to_start_when_the_default_s3_bucket_does_not_exist() {
    let Some(StorageBackend::MotoS3 { endpoint }) = moto_or_skip() else {
        return;
    };
    let bucket = unique_container_name("missing-bucket");
    let storage = format!("s3://{bucket}?endpoint={endpoint}&allow_http=true");
    let finished = run_serve_expecting_exit(&["--storage", &storage], &[], Duration::from_secs(30));
    assert_refused_to_start(&finished, &[&bucket, "does not exist"]);
    assert_stderr_is_one_line(&finished);
}

#[test]
fn serve_refuses_to_start_when_the_default_azurite_container_does_not_exist() {
    if azurite_or_skip().is_none() {
        return;
    }
    let container = unique_container_name("missing-container");
    let storage = format!("az://{container}?emulator=true");
    let finished = run_serve_expecting_exit(&["--storage", &storage], &[], Duration::from_secs(30));
    assert_refused_to_start(&finished, &[&container, "does not exist"]);
    assert_stderr_is_one_line(&finished);
}

#[test]
fn serve_gives_up_on_unreachable_s3_storage_within_the_destination_timeout() {
    if moto_or_skip().is_none() {
        return;
    }
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
