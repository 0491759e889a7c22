//! Shared helpers for the end-to-end tests: an in-process server on port 0
//! ([`spawn_app`]), the real binary as a child process ([`ServerProcess`]), a small
//! blocking FHIR client, and a seeded random generator.

#![allow(dead_code)]

pub mod bulk;
pub mod fake_s3;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fhirlog::app::App;
use fhirlog::config::{AppSettings, RequestLimits};
use fhirlog::export::{ExportEngine, ExportSettings};
use fhirlog::store::Store;
use reqwest::blocking::{Body, Client};
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tempfile::TempDir;

pub const FHIR_JSON: &str = "application/fhir+json";

const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
const SERVER_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A fhirlog server running in this process on a fresh store, started through the app
/// root ([`App::build`]); dropping it shuts the server down, closes the store and deletes
/// the data directory.
pub struct TestApp {
    pub base_url: String,
    pub client: FhirClient,
    pub store: Store,
    pub exports: Arc<ExportEngine>,
    shutdown_sender: Option<tokio::sync::oneshot::Sender<()>>,
    server_thread: Option<JoinHandle<()>>,
    data_dir: Option<TempDir>,
}

/// An actual `person` Group whose members are these patients.
pub fn person_group(id: &str, members: &[&str]) -> Value {
    let member: Vec<Value> = members
        .iter()
        .map(|patient| serde_json::json!({"entity": {"reference": format!("Patient/{patient}")}}))
        .collect();
    serde_json::json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": member})
}

pub fn spawn_app() -> TestApp {
    spawn_app_with_limits(RequestLimits::default())
}

pub fn spawn_app_with_limits(limits: RequestLimits) -> TestApp {
    let data_dir = TempDir::new().expect("creating a temporary data directory");
    spawn_app_in_data_dir(data_dir, limits)
}

/// Serves the store in `data_dir`, which may hold data from an earlier [`TestApp`].
pub fn spawn_app_in_data_dir(data_dir: TempDir, limits: RequestLimits) -> TestApp {
    let mut settings = AppSettings::local(data_dir.path());
    settings.limits = limits;
    spawn_app_with_settings(data_dir, settings)
}

/// A fresh store served with these export settings (exports go to `{data-dir}/exports`).
pub fn spawn_app_with_export_settings(export_settings: ExportSettings) -> TestApp {
    let data_dir = TempDir::new().expect("creating a temporary data directory");
    spawn_app_in_data_dir_with_export_settings(data_dir, export_settings)
}

/// Serves the store in `data_dir` with these export settings.
pub fn spawn_app_in_data_dir_with_export_settings(
    data_dir: TempDir,
    export_settings: ExportSettings,
) -> TestApp {
    let mut settings = AppSettings::local(data_dir.path());
    settings.exports = export_settings;
    spawn_app_with_settings(data_dir, settings)
}

/// Serves the store in `data_dir` with `settings`.
pub fn spawn_app_with_settings(data_dir: TempDir, settings: AppSettings) -> TestApp {
    spawn_server(Some(data_dir), None, settings)
}

/// Serves an open `store`, which other apps may share, with `settings`; the caller keeps
/// the data directory.
pub fn spawn_app_on_store(store: Store, settings: AppSettings) -> TestApp {
    spawn_server(None, Some(store), settings)
}

/// The one way tests start an in-process server: the app root (`App::build`, or
/// `App::build_on_store` over an open store) on a runtime of its own thread, serving until
/// the [`TestApp`] is dropped.
fn spawn_server(data_dir: Option<TempDir>, store: Option<Store>, settings: AppSettings) -> TestApp {
    let (app_sender, app_receiver) = std::sync::mpsc::channel();
    let (shutdown_sender, shutdown_receiver) = tokio::sync::oneshot::channel::<()>();
    let server_thread = std::thread::Builder::new()
        .name("fhirlog-test-server".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("building the server runtime");
            runtime.block_on(async move {
                let built = match store {
                    Some(store) => App::build_on_store(store, settings).await,
                    None => App::build(settings).await,
                };
                let app = built.expect("building the app");
                app_sender
                    .send((
                        app.base_url().as_str().to_owned(),
                        app.store().clone(),
                        Arc::clone(app.exports()),
                    ))
                    .expect("reporting the built app");
                app.run_until(async move {
                    let _ = shutdown_receiver.await;
                })
                .await;
            });
        })
        .expect("starting the server thread");
    let (base_url, store, exports) = app_receiver
        .recv_timeout(SERVER_START_TIMEOUT)
        .expect("the server reports its base URL");
    TestApp {
        client: FhirClient::new(&base_url),
        base_url,
        store,
        exports,
        shutdown_sender: Some(shutdown_sender),
        server_thread: Some(server_thread),
        data_dir,
    }
}

impl TestApp {
    /// The directory holding the store (and, by default, `exports/`).
    pub fn data_dir(&self) -> &Path {
        self.data_dir
            .as_ref()
            .expect("the data directory is still owned")
            .path()
    }

    /// The seq of the newest event: unchanged exactly when nothing was committed.
    pub fn high_water_seq(&self) -> u64 {
        self.store
            .high_water_seq()
            .expect("reading the store's high-water seq")
    }

    fn stop_server(&mut self) {
        if let Some(shutdown_sender) = self.shutdown_sender.take() {
            let _ = shutdown_sender.send(());
        }
        if let Some(server_thread) = self.server_thread.take() {
            let joined = server_thread.join();
            if joined.is_err() && !std::thread::panicking() {
                panic!("the in-process server thread panicked");
            }
        }
    }

    /// Shuts the server down gracefully and closes the store, keeping the data directory.
    pub fn shut_down_keeping_data(mut self) -> TempDir {
        self.stop_server();
        self.data_dir
            .take()
            .expect("the data directory is still owned")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// One HTTP answer, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|error| {
            panic!(
                "response body (status {}) is not JSON: {error}: {}",
                self.status, self.text
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("a text header value"))
    }

    pub fn required_header(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("response has no {name} header: {self:?}"))
    }

    /// Asserts `status` and a FHIR JSON body, and returns the body.
    pub fn expect_json(&self, status: StatusCode) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        let content_type = self.required_header("content-type");
        assert!(
            content_type.starts_with(FHIR_JSON),
            "content type '{content_type}' is not FHIR JSON"
        );
        self.json()
    }

    /// Asserts `status` and an error OperationOutcome whose diagnostics mention every
    /// fragment (case-insensitively).
    pub fn expect_operation_outcome(&self, status: StatusCode, fragments: &[&str]) {
        let outcome = self.expect_json(status);
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        let issue = &outcome["issue"][0];
        assert_eq!(issue["severity"], "error", "{outcome}");
        assert!(issue["code"].is_string(), "issue has no code: {outcome}");
        let diagnostics = issue["diagnostics"]
            .as_str()
            .unwrap_or_else(|| panic!("issue has no diagnostics: {outcome}"))
            .to_lowercase();
        for fragment in fragments {
            assert!(
                diagnostics.contains(&fragment.to_lowercase()),
                "diagnostics '{diagnostics}' do not mention '{fragment}'"
            );
        }
    }

    /// `W/"n"` → n.
    pub fn etag_version(&self) -> u64 {
        parse_weak_etag(self.required_header("etag"))
    }
}

/// One HTTP answer with its body as raw bytes (for compressed downloads).
#[derive(Debug)]
pub struct RawReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("a text header value"))
    }
}

pub fn parse_weak_etag(etag: &str) -> u64 {
    etag.strip_prefix("W/\"")
        .and_then(|rest| rest.strip_suffix('"'))
        .and_then(|version| version.parse().ok())
        .unwrap_or_else(|| panic!("'{etag}' is not a weak version ETag"))
}

/// A blocking HTTP client bound to one FHIR base URL.
#[derive(Clone)]
pub struct FhirClient {
    pub base_url: String,
    http: Client,
}

impl FhirClient {
    pub fn new(base_url: &str) -> FhirClient {
        FhirClient::with_timeout(base_url, Duration::from_secs(60))
    }

    pub fn with_timeout(base_url: &str, timeout: Duration) -> FhirClient {
        FhirClient {
            base_url: base_url.to_owned(),
            http: Client::builder()
                .timeout(timeout)
                .build()
                .expect("building the HTTP client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Sends a request to `{base}{path}`; `Err` only when no HTTP answer arrived.
    pub fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Body>,
    ) -> reqwest::Result<Reply> {
        let mut request = self.http.request(method, self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send()?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text()?;
        Ok(Reply {
            status,
            headers,
            text,
        })
    }

    pub fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Body>,
    ) -> Reply {
        let description = format!("{method} {path}");
        self.try_send(method, path, headers, body)
            .unwrap_or_else(|error| panic!("{description} got no HTTP answer: {error}"))
    }

    pub fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], None)
    }

    /// `GET {base}{path}` with `headers`, keeping the body as bytes (no decoding at all).
    pub fn get_raw(&self, path: &str, headers: &[(&str, &str)]) -> RawReply {
        let mut request = self.http.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .unwrap_or_else(|error| panic!("GET {path} got no HTTP answer: {error}"));
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .unwrap_or_else(|error| panic!("reading the body of GET {path}: {error}"))
            .to_vec();
        RawReply {
            status,
            headers,
            body,
        }
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, &[], None)
    }

    pub fn put_json(&self, path: &str, resource: &Value) -> Reply {
        self.send_json(Method::PUT, path, &[], resource)
    }

    /// PUTs `resource` at `/{resourceType}/{id}`, asserts it was stored (200 or 201) and
    /// returns the stored body the server answered with.
    pub fn put_resource(&self, resource: &Value) -> Value {
        let path = format!(
            "/{}/{}",
            resource["resourceType"].as_str().expect("a resourceType"),
            resource["id"].as_str().expect("an id")
        );
        let reply = self.put_json(&path, resource);
        assert!(
            reply.status == StatusCode::OK || reply.status == StatusCode::CREATED,
            "PUT {path}: {} {}",
            reply.status,
            reply.text
        );
        reply.json()
    }

    pub fn post_json(&self, path: &str, resource: &Value) -> Reply {
        self.send_json(Method::POST, path, &[], resource)
    }

    pub fn send_json(
        &self,
        method: Method,
        path: &str,
        extra_headers: &[(&str, &str)],
        resource: &Value,
    ) -> Reply {
        self.send_bytes(
            method,
            path,
            extra_headers,
            resource.to_string().into_bytes(),
        )
    }

    /// Sends `body` with `Content-Type: application/fhir+json` and a Content-Length.
    pub fn send_bytes(
        &self,
        method: Method,
        path: &str,
        extra_headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut headers = vec![(CONTENT_TYPE.as_str(), FHIR_JSON)];
        headers.extend_from_slice(extra_headers);
        self.send(method, path, &headers, Some(Body::from(body)))
    }

    /// Whether `GET /metadata` answers 200 right now.
    pub fn is_serving(&self) -> bool {
        self.try_send(Method::GET, "/metadata", &[], None)
            .is_ok_and(|reply| reply.status == StatusCode::OK)
    }
}

/// The real `fhirlog` binary, with no `FHIRLOG_*` settings inherited from the environment.
pub fn fhirlog_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhirlog"));
    for variable in [
        "FHIRLOG_DATA_DIR",
        "FHIRLOG_LISTEN",
        "FHIRLOG_BASE_URL",
        "FHIRLOG_MAX_BODY_BYTES",
        "FHIRLOG_MAX_JSON_DEPTH",
        "FHIRLOG_BODY_TIMEOUT",
        "FHIRLOG_MAX_CONNECTIONS",
        "FHIRLOG_HEADER_TIMEOUT",
        "FHIRLOG_TLS_CERT",
        "FHIRLOG_TLS_KEY",
        "FHIRLOG_AUTH",
        "FHIRLOG_INSECURE",
        "FHIRLOG_TOKENS",
        "FHIRLOG_CLIENTS",
        "FHIRLOG_CONTAINERS",
        "RUST_LOG",
        "RUST_BACKTRACE",
    ] {
        command.env_remove(variable);
    }
    command.stdin(Stdio::null());
    command
}

/// Runs `fhirlog ARGS...` to completion and captures its output.
pub fn run_fhirlog(arguments: &[&std::ffi::OsStr]) -> Output {
    fhirlog_command()
        .args(arguments)
        .output()
        .expect("running the fhirlog binary")
}

/// A port that was free a moment ago.
pub fn free_local_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    listener
        .local_addr()
        .expect("reading the bound address")
        .port()
}

/// `fhirlog serve` running as a child process; dropping it kills the child.
pub struct ServerProcess {
    pub base_url: String,
    pub client: FhirClient,
    pub log_path: PathBuf,
    child: Child,
}

impl ServerProcess {
    /// Starts `fhirlog serve --data-dir DATA_DIR` on a free port and waits until
    /// `/fhir/metadata` answers. Stderr goes to a log file next to the data directory.
    pub fn start(data_dir: &Path) -> ServerProcess {
        ServerProcess::start_on_port(data_dir, free_local_port(), &[])
    }

    /// Like [`ServerProcess::start`], with extra `serve` flags such as
    /// `--max-resources-per-file 500`.
    pub fn start_with_arguments(data_dir: &Path, extra_arguments: &[&str]) -> ServerProcess {
        ServerProcess::start_on_port(data_dir, free_local_port(), extra_arguments)
    }

    /// Like [`ServerProcess::start_with_arguments`] on a chosen port, so a restarted
    /// server keeps the URLs it handed out.
    pub fn start_on_port(data_dir: &Path, port: u16, extra_arguments: &[&str]) -> ServerProcess {
        ServerProcess::start_on_port_with_environment(data_dir, port, extra_arguments, &[])
    }

    /// Restarts the server on a store that holds an interrupted export, and asserts that it
    /// resumed the export.
    pub fn restart_resuming_export(
        data_dir: &Path,
        port: u16,
        extra_arguments: &[&str],
    ) -> ServerProcess {
        let server = ServerProcess::start_on_port(data_dir, port, extra_arguments);
        assert!(
            server.log().contains("resuming export after restart"),
            "the restarted server did not resume the export; its log:\n{}",
            server.log()
        );
        server
    }

    /// Like [`ServerProcess::start_with_arguments`], with extra environment variables
    /// (such as storage credentials or `AZURITE_BLOB_STORAGE_URL`).
    pub fn start_with_environment(
        data_dir: &Path,
        extra_arguments: &[&str],
        environment: &[(String, String)],
    ) -> ServerProcess {
        ServerProcess::start_on_port_with_environment(
            data_dir,
            free_local_port(),
            extra_arguments,
            environment,
        )
    }

    fn start_on_port_with_environment(
        data_dir: &Path,
        port: u16,
        extra_arguments: &[&str],
        environment: &[(String, String)],
    ) -> ServerProcess {
        let log_directory = data_dir
            .parent()
            .expect("the data directory has a parent folder");
        let log_path = log_directory.join(format!("fhirlog-serve-{port}.log"));
        let log_file = File::create(&log_path).expect("creating the server log file");
        let child = fhirlog_command()
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra_arguments)
            .envs(environment.iter().map(|(name, value)| (name, value)))
            .env(
                "RUST_LOG",
                "info,fhirlog::http=warn,fjall=warn,lsm_tree=warn",
            )
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("starting fhirlog serve");
        let base_url = format!("http://127.0.0.1:{port}/fhir");
        let mut server = ServerProcess {
            client: FhirClient::new(&base_url),
            base_url,
            log_path,
            child,
        };
        server.wait_until_serving();
        server
    }

    fn wait_until_serving(&mut self) {
        let probe = FhirClient::with_timeout(&self.base_url, Duration::from_secs(2));
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the server process") {
                panic!(
                    "fhirlog serve exited with {status} before serving; its log:\n{}",
                    self.log()
                );
            }
            if probe.is_serving() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fhirlog serve did not answer /fhir/metadata within {SERVER_START_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn process_id(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL, then reap the child.
    pub fn kill_hard(&mut self) {
        self.child.kill().expect("sending SIGKILL to fhirlog serve");
        self.child.wait().expect("reaping fhirlog serve");
    }

    /// SIGTERM, then wait for the exit status (panics after `SERVER_EXIT_TIMEOUT`).
    pub fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill -TERM");
        assert!(sent.success(), "kill -TERM failed: {sent}");
        self.wait_for_exit()
    }

    /// The exit status if the child has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("polling the server process")
    }

    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + SERVER_EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the server process") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fhirlog serve did not exit within {SERVER_EXIT_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// SplitMix64: a tiny deterministic generator so failures replay from their seed.
pub struct SeededRandom {
    state: u64,
}

impl SeededRandom {
    pub fn new(seed: u64) -> SeededRandom {
        SeededRandom { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }

    /// Uniform-enough in `0..bound`; `bound` must be positive.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    pub fn bytes(&mut self, length: usize) -> Vec<u8> {
        (0..length).map(|_| self.next_u64() as u8).collect()
    }
}
