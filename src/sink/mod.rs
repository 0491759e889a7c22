//! Where export files go: the [`Destination`] trait over `object_store`, with local
//! filesystem (default), in-memory (tests), S3-compatible and Azure Blob implementations,
//! container names that cannot escape, streaming uploads, signed URLs, and blocking
//! helpers for worker threads.

mod azure;
mod conformance;
mod local;
mod memory;
mod s3;
mod storage_url;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

pub use azure::AzureDestination;
pub use local::LocalDestination;
pub use memory::MemoryDestination;
pub use s3::S3Destination;
pub use storage_url::{StorageUrl, StorageUrlError};

/// A bucket/container name under Azure's rules (the strictest): 3–63 characters of
/// lowercase letters, digits and single hyphens, starting and ending with a letter or digit.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ContainerName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a valid container name: use 3-63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit"
)]
pub struct InvalidContainerName(pub String);

impl ContainerName {
    pub const DEFAULT: &'static str = "fhirlog-exports";

    pub fn parse(name: &str) -> Result<ContainerName, InvalidContainerName> {
        let invalid = || InvalidContainerName(name.chars().take(80).collect());
        let allowed = name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
        let edges_alphanumeric = name
            .bytes()
            .next()
            .zip(name.bytes().last())
            .is_some_and(|(first, last)| first != b'-' && last != b'-');
        if !(3..=63).contains(&name.len()) || !allowed || !edges_alphanumeric || name.contains("--")
        {
            return Err(invalid());
        }
        Ok(ContainerName(name.to_owned()))
    }

    pub fn default_container() -> ContainerName {
        ContainerName(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Storage failures, with whether retrying can help. Each message is one short line
/// naming the container and the root cause once; [`SinkError::detail`] has the whole chain
/// for logs.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("container '{container}' does not exist in {destination}")]
    ContainerMissing {
        container: String,
        destination: String,
    },
    #[error("object '{0}' does not exist")]
    NotFound(String),
    /// No answer from the destination: a refused connection, a failed name lookup, a
    /// dropped connection or a timeout.
    #[error("{destination} is unreachable (container '{container}'): {cause}")]
    Unreachable {
        container: String,
        destination: String,
        cause: String,
        detail: Box<str>,
    },
    #[error("storage error in container '{container}' of {destination}: {}", root_cause(.error))]
    Storage {
        container: String,
        destination: String,
        error: Box<object_store::Error>,
    },
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Error texts of failures that retrying cannot fix: rejected credentials or
/// permissions, and missing buckets or containers.
const PERMANENT_FAILURE_MARKERS: [&str; 14] = [
    ACCESS_DENIED_MARKERS[0],
    ACCESS_DENIED_MARKERS[1],
    ACCESS_DENIED_MARKERS[2],
    ACCESS_DENIED_MARKERS[3],
    ACCESS_DENIED_MARKERS[4],
    ACCESS_DENIED_MARKERS[5],
    ACCESS_DENIED_MARKERS[6],
    ACCESS_DENIED_MARKERS[7],
    ACCESS_DENIED_MARKERS[8],
    "NoSuchBucket",
    "ContainerNotFound",
    "InvalidBucketName",
    OUT_OF_SPACE_MARKERS[0],
    OUT_OF_SPACE_MARKERS[1],
];

/// Error texts of rejected credentials or permissions.
const ACCESS_DENIED_MARKERS: [&str; 9] = [
    "401 Unauthorized",
    "403 Forbidden",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "Permission denied",
];

/// Error texts of a file system or quota that ran out of space.
const OUT_OF_SPACE_MARKERS: [&str; 2] = ["No space left on device", "Disk quota exceeded"];

impl SinkError {
    /// Whether trying again later can succeed (timeouts, 5xx, throttling, dropped
    /// connections); a missing container or rejected credentials never will.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::ContainerMissing { .. } | SinkError::NotFound(_) => false,
            SinkError::Unreachable { .. } => true,
            SinkError::Io(error) => !matches!(
                error.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::QuotaExceeded
            ),
            SinkError::Storage { error, .. } => match error.as_ref() {
                object_store::Error::NotFound { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => false,
                other => !error_chain_mentions(other, &PERMANENT_FAILURE_MARKERS),
            },
        }
    }

    /// Whether the destination ran out of space (a full disk or an exhausted quota).
    pub fn is_out_of_space(&self) -> bool {
        match self {
            SinkError::Io(error) => matches!(
                error.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            SinkError::Storage { error, .. } => {
                error_chain_mentions(error.as_ref(), &OUT_OF_SPACE_MARKERS)
            }
            _ => false,
        }
    }

    /// What a client may be told: the container it named and the kind of failure, never
    /// the destination's path, endpoint or account, nor the storage server's words.
    pub fn client_message(&self) -> String {
        match self {
            SinkError::ContainerMissing { container, .. } => {
                format!("container '{container}' does not exist")
            }
            SinkError::NotFound(_) => "the requested export file does not exist".to_owned(),
            SinkError::Unreachable { container, .. } => format!(
                "the export destination did not answer (container '{container}'); try again later"
            ),
            SinkError::Storage { container, .. } if self.is_out_of_space() => {
                format!("the export destination ran out of space (container '{container}')")
            }
            SinkError::Storage {
                container, error, ..
            } if is_access_denied(error) => format!(
                "the export destination denied access (container '{container}'); check the server's credentials"
            ),
            SinkError::Storage { container, .. } => format!(
                "the export destination refused or failed a request (container '{container}'); the server log has the details"
            ),
            SinkError::Io(_) if self.is_out_of_space() => {
                "the export destination ran out of space".to_owned()
            }
            SinkError::Io(_) => {
                "the export destination failed; the server log has the details".to_owned()
            }
        }
    }

    /// The message with every error of the underlying chain, for logs.
    pub fn detail(&self) -> String {
        match self {
            SinkError::Unreachable { detail, .. } => format!("{self} [{detail}]"),
            SinkError::Storage { error, .. } => format!("{self} [{}]", error_chain_text(error)),
            other => other.to_string(),
        }
    }

    /// Classifies an `object_store` failure on `container` of `destination`.
    pub(crate) fn from_object_store(
        container: &str,
        destination: &str,
        error: object_store::Error,
    ) -> Self {
        match error {
            object_store::Error::NotFound { path, .. } => SinkError::NotFound(path),
            error if is_no_answer(&error) => SinkError::Unreachable {
                container: container.to_owned(),
                destination: destination.to_owned(),
                cause: root_cause(&error),
                detail: error_chain_text(&error).into(),
            },
            error => SinkError::Storage {
                container: container.to_owned(),
                destination: destination.to_owned(),
                error: Box::new(error),
            },
        }
    }

    /// Classifies a failure of the HTTP client that creates containers.
    pub(crate) fn from_http_client(
        container: &str,
        destination: &str,
        error: storage_http::Error,
    ) -> Self {
        if is_no_answer(&error) {
            return SinkError::Unreachable {
                container: container.to_owned(),
                destination: destination.to_owned(),
                cause: root_cause(&error),
                detail: error_chain_text(&error).into(),
            };
        }
        SinkError::Storage {
            container: container.to_owned(),
            destination: destination.to_owned(),
            error: Box::new(object_store::Error::Generic {
                store: "container creation",
                source: Box::new(error),
            }),
        }
    }

    /// A failure described by `reason` (missing credentials, a refused creation).
    pub(crate) fn storage_failure(
        container: &str,
        destination: &str,
        store: &'static str,
        reason: String,
    ) -> Self {
        SinkError::Storage {
            container: container.to_owned(),
            destination: destination.to_owned(),
            error: Box::new(object_store::Error::Generic {
                store,
                source: reason.into(),
            }),
        }
    }

    fn no_answer_within(container: &str, destination: &str, deadline: Duration) -> Self {
        let cause = format!("no answer within {} ms", deadline.as_millis());
        SinkError::Unreachable {
            container: container.to_owned(),
            destination: destination.to_owned(),
            detail: cause.as_str().into(),
            cause,
        }
    }
}

/// Longest root cause quoted in a message.
const ROOT_CAUSE_MAX_CHARS: usize = 240;

/// The innermost error of the chain, on one line, led by the HTTP client's own words
/// (without the URL) when the chain has them.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    let mut client_words = None;
    let mut current = Some(error);
    while let Some(level) = current {
        if let Some(client_error) = level.downcast_ref::<storage_http::Error>() {
            let text = client_error.to_string();
            let without_url = text
                .split(" for url (")
                .next()
                .unwrap_or_default()
                .to_owned();
            client_words = Some(without_url);
        }
        innermost = level;
        current = level.source();
    }
    let innermost_text = innermost.to_string();
    let text = match client_words {
        Some(words) if !innermost.is::<storage_http::Error>() => {
            format!("{words}: {innermost_text}")
        }
        _ => innermost_text,
    };
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= ROOT_CAUSE_MAX_CHARS {
        return one_line;
    }
    let mut shortened: String = one_line.chars().take(ROOT_CAUSE_MAX_CHARS).collect();
    shortened.push('…');
    shortened
}

/// Every level of the chain, outermost first.
fn error_chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut levels = Vec::new();
    let mut current = Some(error);
    while let Some(level) = current {
        levels.push(level.to_string());
        current = level.source();
    }
    levels.join(" | caused by: ")
}

/// Whether the chain says the destination never answered: no connection, a dropped
/// connection or a timeout, as opposed to an answer refusing the request. A transport
/// error object_store could not classify (a pooled connection closed as it was picked
/// reads "connection was not ready") is judged by the HTTP client's error beneath it.
fn is_no_answer(error: &(dyn std::error::Error + 'static)) -> bool {
    use object_store::client::HttpErrorKind;
    let mut current = Some(error);
    while let Some(level) = current {
        if let Some(http_error) = level.downcast_ref::<object_store::client::HttpError>() {
            match http_error.kind() {
                HttpErrorKind::Connect
                | HttpErrorKind::Request
                | HttpErrorKind::Timeout
                | HttpErrorKind::Interrupted => return true,
                HttpErrorKind::Decode => return false,
                _ => {}
            }
        }
        if let Some(client_error) = level.downcast_ref::<storage_http::Error>() {
            return client_error.is_connect()
                || client_error.is_timeout()
                || client_error.is_request();
        }
        current = level.source();
    }
    false
}

/// An opened container: its objects, and a URL signer where the backend has one.
pub struct OpenedContainer {
    /// For workers: transient failures are retried until the destination timeout.
    pub objects: Arc<dyn ObjectStore>,
    /// The same objects for requests a client waits on: a dead destination is reported
    /// within about a second instead of being retried.
    pub interactive_objects: Arc<dyn ObjectStore>,
    pub signer: Option<Arc<dyn Signer>>,
    pub durability: Durability,
    /// The destination's description, for messages.
    pub destination: String,
}

/// What makes a finished object durable.
#[derive(Clone)]
pub enum Durability {
    /// Files under a folder: fsync each file, then its folders up to the container's.
    LocalFolder {
        folder: PathBuf,
        files: Arc<LocalFileSystem>,
    },
    /// The object is committed once its upload completed (S3, Azure, memory).
    CommittedOnUpload,
}

/// A backend that hands out one object store per container.
pub trait Destination: Send + Sync + 'static {
    /// Where this destination writes, for messages (no secrets).
    fn describe(&self) -> String;
    /// The container exports use when a request names none.
    fn default_container(&self) -> ContainerName {
        ContainerName::default_container()
    }
    /// The store for `container`; a missing container is created (when the destination
    /// may create containers) or reported as [`SinkError::ContainerMissing`]. Blocking;
    /// returns within [`OPEN_CONTAINER_DEADLINE`] whatever the destination does, with
    /// [`SinkError::Unreachable`] when it did not answer.
    fn open_container(
        &self,
        container: &ContainerName,
        runtime: &tokio::runtime::Handle,
    ) -> Result<OpenedContainer, SinkError>;
    /// The store for a container known to exist (a persisted job's), built without
    /// contacting a remote destination, so a restart never waits on one; a container
    /// deleted meanwhile shows up as failures of the reads and writes that use it.
    fn attach_container(&self, container: &ContainerName) -> Result<OpenedContainer, SinkError>;
}

/// Longest wait for [`Destination::open_container`]: the existence probe and creation.
pub const OPEN_CONTAINER_DEADLINE: Duration = Duration::from_millis(4_500);
/// Longest wait for a destination's first answer to a download.
pub const DOWNLOAD_ANSWER_DEADLINE: Duration = Duration::from_millis(1_500);
/// Connection attempts for requests a client waits on give up after this.
const INTERACTIVE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Whole requests of the existence probe and container creation give up after this.
const PROBE_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The worker and interactive stores of one cloud container.
pub(crate) struct CloudContainerStores<S> {
    pub objects: Arc<S>,
    pub interactive_objects: Arc<dyn ObjectStore>,
}

/// Opens a cloud container: checks it exists, creates it with `create` when allowed
/// (both within [`OPEN_CONTAINER_DEADLINE`]), and hands out the stores with the URL signer.
pub(crate) fn open_checked_container<S: ObjectStore + Signer>(
    stores: CloudContainerStores<S>,
    container: &ContainerName,
    destination: &dyn Destination,
    create_containers: bool,
    runtime: &tokio::runtime::Handle,
    create: impl std::future::Future<Output = Result<(), SinkError>>,
) -> Result<OpenedContainer, SinkError> {
    let description = destination.describe();
    let opening = async {
        let exists = container_exists(stores.interactive_objects.as_ref())
            .await
            .map_err(|error| {
                SinkError::from_object_store(container.as_str(), &description, error)
            })?;
        if exists {
            return Ok(());
        }
        if !create_containers {
            return Err(SinkError::ContainerMissing {
                container: container.to_string(),
                destination: description.clone(),
            });
        }
        create.await
    };
    runtime
        .block_on(async { tokio::time::timeout(OPEN_CONTAINER_DEADLINE, opening).await })
        .unwrap_or_else(|_| {
            Err(SinkError::no_answer_within(
                container.as_str(),
                &description,
                OPEN_CONTAINER_DEADLINE,
            ))
        })?;
    Ok(cloud_container(stores, description))
}

impl<S: ObjectStore> CloudContainerStores<S> {
    /// Builds the worker store (retrying until `destination_timeout`) and the interactive
    /// store (short timeouts) with `build`, which turns client options and a retry policy
    /// into a store; nothing is contacted.
    pub(crate) fn build(
        destination_timeout: Duration,
        build: impl Fn(object_store::ClientOptions, object_store::RetryConfig) -> Result<S, SinkError>,
    ) -> Result<CloudContainerStores<S>, SinkError> {
        Ok(CloudContainerStores {
            objects: Arc::new(build(
                worker_client_options(destination_timeout),
                retry_config(destination_timeout),
            )?),
            interactive_objects: Arc::new(build(
                interactive_client_options(),
                interactive_retry_config(),
            )?),
        })
    }
}

/// A cloud container's stores as an [`OpenedContainer`], signing with the worker store.
pub(crate) fn cloud_container<S: ObjectStore + Signer>(
    stores: CloudContainerStores<S>,
    description: String,
) -> OpenedContainer {
    OpenedContainer {
        objects: stores.objects.clone(),
        interactive_objects: stores.interactive_objects,
        signer: Some(stores.objects),
        durability: Durability::CommittedOnUpload,
        destination: description,
    }
}

/// Whether `objects`' container exists: listing a missing container fails with the
/// service's `NoSuchBucket` / `ContainerNotFound` error code.
pub(crate) async fn container_exists(
    objects: &dyn ObjectStore,
) -> Result<bool, object_store::Error> {
    let probe = ObjectPath::from("fhirlog-container-probe");
    match objects.list_with_delimiter(Some(&probe)).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(error) if error_chain_mentions(&error, &["NoSuchBucket", "ContainerNotFound"]) => {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// Whether any error in the chain displays one of `needles` (object_store keeps the
/// HTTP status and the service's error code only in the text).
fn is_access_denied(error: &object_store::Error) -> bool {
    matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || error_chain_mentions(error, &ACCESS_DENIED_MARKERS)
}

fn error_chain_mentions(error: &(dyn std::error::Error + 'static), needles: &[&str]) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        let text = error.to_string();
        if needles.iter().any(|needle| text.contains(needle)) {
            return true;
        }
        current = error.source();
    }
    false
}

/// Retries with backoff for transient failures (timeouts, 5xx, throttling, refused
/// connections) until `destination_timeout`; permanent ones (403, 404) fail at once.
pub fn retry_config(destination_timeout: Duration) -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 1_000,
        retry_timeout: destination_timeout,
    }
}

/// A short retry budget for requests a client waits on.
pub(crate) fn interactive_retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 2,
        retry_timeout: Duration::from_secs(1),
    }
}

/// Objects are stored as `application/fhir+ndjson`, so signed-URL downloads carry the
/// right Content-Type. Set these before any other option: they replace the client options
/// (`allow_http` included).
pub fn ndjson_client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new().with_default_content_type("application/fhir+ndjson")
}

/// [`ndjson_client_options`] for workers' transfers: a request that hangs gives up within
/// the destination timeout (at least 1 s, at most object_store's usual 30 s), so a
/// destination that stops answering fails the job within that time.
pub(crate) fn worker_client_options(destination_timeout: Duration) -> object_store::ClientOptions {
    let request_timeout =
        destination_timeout.clamp(Duration::from_secs(1), Duration::from_secs(30));
    ndjson_client_options().with_timeout(request_timeout)
}

/// [`ndjson_client_options`] with a short connect timeout, for requests a client waits on
/// (no whole-request timeout: a download's body may take long).
pub(crate) fn interactive_client_options() -> object_store::ClientOptions {
    ndjson_client_options().with_connect_timeout(INTERACTIVE_CONNECT_TIMEOUT)
}

/// The HTTP client for container creation: short connect and request timeouts.
pub(crate) fn probe_http_client(
    container: &ContainerName,
    destination: &str,
) -> Result<storage_http::Client, SinkError> {
    storage_http::Client::builder()
        .connect_timeout(INTERACTIVE_CONNECT_TIMEOUT)
        .timeout(PROBE_REQUEST_TIMEOUT)
        .build()
        .map_err(|error| SinkError::from_http_client(container.as_str(), destination, error))
}

/// One container of a destination, with blocking calls for worker threads (which are
/// not runtime threads) and async ones for HTTP handlers.
#[derive(Clone)]
pub struct ContainerStore {
    container: ContainerName,
    objects: Arc<dyn ObjectStore>,
    interactive_objects: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    durability: Durability,
    destination: Arc<str>,
    runtime: tokio::runtime::Handle,
}

/// What a download needs to know of a stored object before reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub size: u64,
    /// A strong entity tag, quoted, that changes whenever the object is replaced.
    pub entity_tag: String,
    pub last_modified: crate::fhir::Instant,
}

/// An object's bytes (or some of them) as they arrive from the destination.
pub type ObjectByteStream = futures_util::stream::BoxStream<'static, Result<Bytes, SinkError>>;

/// Bytes handed to a multipart upload at a time, and uploads in flight per writer:
/// together they bound an upload's memory whatever the file size.
const UPLOAD_CHUNK_BYTES: usize = 5 * 1024 * 1024;
const UPLOAD_PARTS_IN_FLIGHT: usize = 2;

/// Files fsynced at once when a job's local files are made durable: concurrent fsyncs
/// share the file system's journal commits instead of paying one each.
const PARALLEL_FSYNCS: usize = 16;

/// Chunk buffers kept for reuse once their part is written. A fresh 5 MiB buffer costs a
/// page fault per 4 KiB whenever the allocator has handed a freed one back to the OS:
/// about 9% of a system export's CPU time before buffers were reused.
static SPARE_CHUNK_BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// Enough for every upload in flight on the default worker count; 40 MiB at most.
const SPARE_CHUNK_BUFFERS_KEPT: usize = 8;

fn take_chunk_buffer() -> Vec<u8> {
    SPARE_CHUNK_BUFFERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(UPLOAD_CHUNK_BYTES))
}

/// A chunk handed to object_store; its buffer goes back to [`SPARE_CHUNK_BUFFERS`] when
/// the part has been written and object_store drops it.
struct RecycledChunk(Vec<u8>);

impl AsRef<[u8]> for RecycledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for RecycledChunk {
    fn drop(&mut self) {
        let mut buffer = std::mem::take(&mut self.0);
        if buffer.capacity() != UPLOAD_CHUNK_BYTES {
            return;
        }
        buffer.clear();
        let mut spare = SPARE_CHUNK_BUFFERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if spare.len() < SPARE_CHUNK_BUFFERS_KEPT {
            spare.push(buffer);
        }
    }
}

/// A streaming (multipart/block) upload of one object, fed from a worker thread.
pub struct ObjectUpload {
    writer: Option<WriteMultipart>,
    pending: Vec<u8>,
    store: ContainerStore,
    name: String,
}

impl ObjectUpload {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        if !self.pending.is_empty() && self.pending.len() + bytes.len() > UPLOAD_CHUNK_BYTES {
            let full = std::mem::replace(&mut self.pending, take_chunk_buffer());
            self.hand_over(full)?;
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    fn hand_over(&mut self, chunk: Vec<u8>) -> Result<(), SinkError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        if chunk.is_empty() {
            return Ok(());
        }
        let runtime = self.store.runtime.clone();
        let _context = runtime.enter();
        writer.put(Bytes::from_owner(RecycledChunk(chunk)));
        runtime
            .block_on(writer.wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT))
            .map_err(|error| self.store.storage_error(error))
    }

    /// Completes the object; it becomes visible only now. A local file's write-back to
    /// disk starts at once, in the background, so the fsyncs that later make it durable
    /// (`make_durable_blocking`) find little left to write.
    pub fn finish(mut self) -> Result<(), SinkError> {
        let last = std::mem::take(&mut self.pending);
        self.hand_over(last)?;
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        let runtime = self.store.runtime.clone();
        let _context = runtime.enter();
        runtime
            .block_on(writer.finish())
            .map_err(|error| self.store.storage_error(error))?;
        self.store.start_write_back(&self.name);
        Ok(())
    }
}

impl Drop for ObjectUpload {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            let runtime = self.store.runtime.clone();
            let _context = runtime.enter();
            if let Err(error) = runtime.block_on(writer.abort()) {
                tracing::warn!(object = %self.name, %error, "could not abort an unfinished upload");
            }
        }
    }
}

impl ContainerStore {
    pub fn new(
        container: ContainerName,
        opened: OpenedContainer,
        runtime: tokio::runtime::Handle,
    ) -> ContainerStore {
        ContainerStore {
            container,
            objects: opened.objects,
            interactive_objects: opened.interactive_objects,
            signer: opened.signer,
            durability: opened.durability,
            destination: Arc::from(opened.destination),
            runtime,
        }
    }

    /// Makes these finished objects durable: local files and their folders fsynced
    /// (the files on several threads at once, so the file system commits their
    /// metadata together, then each distinct parent folder up to the container root);
    /// S3/Azure: nothing to do once an upload completed. Blocking.
    pub fn make_durable_blocking(&self, object_names: &[String]) -> Result<(), SinkError> {
        let Durability::LocalFolder { folder, files } = &self.durability else {
            return Ok(());
        };
        let mut file_paths = Vec::with_capacity(object_names.len());
        let mut folders = std::collections::BTreeSet::new();
        for name in object_names {
            let file_path = files
                .path_to_filesystem(&ObjectPath::from(name.as_str()))
                .map_err(|error| self.storage_error(error))?;
            let mut parent = file_path.parent();
            while let Some(directory) = parent {
                if !directory.starts_with(folder) || !folders.insert(directory.to_path_buf()) {
                    break;
                }
                parent = directory.parent();
            }
            file_paths.push((name, file_path));
        }
        let next_file = std::sync::atomic::AtomicUsize::new(0);
        let sync_files = || -> Result<(), SinkError> {
            loop {
                let index = next_file.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, file_path)) = file_paths.get(index) else {
                    return Ok(());
                };
                let file = std::fs::File::open(file_path).map_err(|error| {
                    if error.kind() == std::io::ErrorKind::NotFound {
                        SinkError::NotFound((*name).clone())
                    } else {
                        SinkError::Io(error)
                    }
                })?;
                file.sync_all()?;
            }
        };
        let threads = file_paths.len().clamp(1, PARALLEL_FSYNCS);
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(sync_files)).collect();
            let mut outcome = sync_files();
            for helper in helpers {
                let helper_outcome = helper.join().unwrap_or_else(|_| {
                    Err(SinkError::Io(std::io::Error::other(
                        "an fsync thread panicked",
                    )))
                });
                outcome = outcome.and(helper_outcome);
            }
            outcome
        })?;
        for directory in folders.iter().rev() {
            std::fs::File::open(directory)?.sync_all()?;
        }
        Ok(())
    }

    /// Local files: starts writing a finished file back to disk without waiting for it
    /// (an fsync on a blocking thread whose outcome nobody waits for: durability is
    /// still decided by `make_durable_blocking`). Other destinations: nothing.
    fn start_write_back(&self, name: &str) {
        let Durability::LocalFolder { files, .. } = &self.durability else {
            return;
        };
        let Ok(file_path) = files.path_to_filesystem(&ObjectPath::from(name)) else {
            return;
        };
        self.runtime.spawn_blocking(move || {
            if let Err(error) = std::fs::File::open(&file_path).and_then(|file| file.sync_data())
            {
                tracing::debug!(file = %file_path.display(), %error, "early write-back failed; the final fsync retries it");
            }
        });
    }

    /// Starts a streaming upload of `name`.
    pub fn begin_upload(&self, name: &str) -> Result<ObjectUpload, SinkError> {
        let path = ObjectPath::from(name);
        let upload = self
            .runtime
            .block_on(self.objects.put_multipart(&path))
            .map_err(|error| self.storage_error(error))?;
        Ok(ObjectUpload {
            writer: Some(WriteMultipart::new_with_chunk_size(
                upload,
                UPLOAD_CHUNK_BYTES,
            )),
            pending: take_chunk_buffer(),
            store: self.clone(),
            name: name.to_owned(),
        })
    }

    /// A pre-signed GET URL valid for `ttl`, where the backend can sign.
    pub async fn signed_url(&self, name: &str, ttl: Duration) -> Result<Option<String>, SinkError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let path = ObjectPath::from(name);
        let url = signer
            .signed_url(object_store::signer::Method::GET, &path, ttl)
            .await
            .map_err(|error| self.storage_error(error))?;
        Ok(Some(url.to_string()))
    }

    pub fn container(&self) -> &ContainerName {
        &self.container
    }

    fn storage_error(&self, error: object_store::Error) -> SinkError {
        SinkError::from_object_store(self.container.as_str(), &self.destination, error)
    }

    /// Writes a whole object, replacing any object of that name.
    pub fn put_blocking(&self, name: &str, bytes: Bytes) -> Result<(), SinkError> {
        let path = ObjectPath::from(name);
        self.runtime
            .block_on(self.objects.put(&path, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|error| self.storage_error(error))
    }

    pub fn rename_blocking(&self, from: &str, to: &str) -> Result<(), SinkError> {
        let (from, to) = (ObjectPath::from(from), ObjectPath::from(to));
        self.runtime
            .block_on(self.objects.rename(&from, &to))
            .map_err(|error| self.storage_error(error))
    }

    pub fn exists_blocking(&self, name: &str) -> Result<bool, SinkError> {
        let path = ObjectPath::from(name);
        match self.runtime.block_on(self.objects.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(self.storage_error(error)),
        }
    }

    /// Names of every object under `prefix/`, sorted.
    pub fn list_blocking(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        self.runtime.block_on(self.list(prefix))
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        let path = ObjectPath::from(prefix);
        let mut listing = self.objects.list(Some(&path));
        let mut names = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|error| self.storage_error(error))?;
            names.push(meta.location.to_string());
        }
        names.sort();
        Ok(names)
    }

    /// Deletes every object under `prefix/`.
    pub fn delete_prefix_blocking(&self, prefix: &str) -> Result<(), SinkError> {
        self.runtime.block_on(async {
            for name in self.list(prefix).await? {
                match self.objects.delete(&ObjectPath::from(name.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(error) => return Err(self.storage_error(error)),
                }
            }
            Ok(())
        })
    }

    /// The size and validators of `name`, or [`SinkError::Unreachable`] when the
    /// destination does not answer within [`DOWNLOAD_ANSWER_DEADLINE`].
    pub async fn describe_object(&self, name: &str) -> Result<StoredObject, SinkError> {
        let path = ObjectPath::from(name);
        let meta = self
            .within_download_deadline(self.interactive_objects.head(&path))
            .await?;
        let version = meta
            .e_tag
            .clone()
            .unwrap_or_else(|| meta.last_modified.timestamp_micros().to_string());
        let fingerprint = blake3::hash(format!("{}\n{version}", meta.size).as_bytes());
        Ok(StoredObject {
            size: meta.size,
            entity_tag: format!("\"{:x}-{}\"", meta.size, &fingerprint.to_hex()[..16]),
            last_modified: crate::fhir::Instant::from_micros_since_epoch(
                meta.last_modified.timestamp_micros(),
            ),
        })
    }

    /// Streams `name`'s bytes in `range` (all of them with `None`); the destination's
    /// first answer must come within [`DOWNLOAD_ANSWER_DEADLINE`].
    pub async fn stream_object(
        &self,
        name: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<ObjectByteStream, SinkError> {
        let path = ObjectPath::from(name);
        let options = object_store::GetOptions {
            range: range.map(object_store::GetRange::Bounded),
            ..object_store::GetOptions::default()
        };
        let answer = self
            .within_download_deadline(self.interactive_objects.get_opts(&path, options))
            .await?;
        let container = self.container.to_string();
        let destination = Arc::clone(&self.destination);
        Ok(answer
            .into_stream()
            .map(move |chunk| {
                chunk.map_err(|error| SinkError::from_object_store(&container, &destination, error))
            })
            .boxed())
    }

    async fn within_download_deadline<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, SinkError> {
        match tokio::time::timeout(DOWNLOAD_ANSWER_DEADLINE, request).await {
            Ok(answer) => answer.map_err(|error| self.storage_error(error)),
            Err(_) => Err(SinkError::no_answer_within(
                self.container.as_str(),
                &self.destination,
                DOWNLOAD_ANSWER_DEADLINE,
            )),
        }
    }

    async fn get(&self, name: &str) -> Result<object_store::GetResult, SinkError> {
        self.objects
            .get(&ObjectPath::from(name))
            .await
            .map_err(|error| self.storage_error(error))
    }

    pub async fn get_range(
        &self,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, SinkError> {
        let path = ObjectPath::from(name);
        self.objects
            .get_range(&path, range)
            .await
            .map_err(|error| self.storage_error(error))
    }

    pub async fn get_bytes(&self, name: &str) -> Result<Bytes, SinkError> {
        self.get(name)
            .await?
            .bytes()
            .await
            .map_err(|error| self.storage_error(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_name_the_container_but_not_the_destination_or_its_words() {
        let destination = "s3 at http://10.9.8.7:9000";
        let forbidden = object_store::Error::Generic {
            store: "S3",
            source: "Client error with status 403 Forbidden: <Error>secret body</Error> at /srv/x"
                .into(),
        };
        let failures = [
            SinkError::ContainerMissing {
                container: "given".to_owned(),
                destination: destination.to_owned(),
            },
            SinkError::from_object_store("given", destination, forbidden),
            SinkError::storage_failure("given", destination, "S3", "/srv/x is full".to_owned()),
            SinkError::no_answer_within("given", destination, Duration::from_secs(1)),
        ];
        for failure in failures {
            let shown = failure.client_message();
            assert!(shown.contains("'given'"), "{shown}");
            for leaked in ["10.9.8.7", "http://", "secret", "/srv/x"] {
                assert!(!shown.contains(leaked), "{shown}");
            }
            assert!(
                failure.detail().contains("10.9.8.7"),
                "{}",
                failure.detail()
            );
            let as_export_error = crate::export::ExportError::from(failure);
            assert!(!as_export_error.message().contains("10.9.8.7"));
        }
    }

    /// A refused connection as the storage HTTP client reports it.
    fn refused_connection_error() -> storage_http::Error {
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("an ephemeral port")
            .port();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime
            .block_on(
                storage_http::Client::new()
                    .get(format!("http://127.0.0.1:{closed_port}/"))
                    .send(),
            )
            .expect_err("nothing listens on a port just released")
    }

    #[test]
    fn transport_errors_object_store_cannot_classify_are_judged_by_the_client_error_beneath() {
        use object_store::client::{HttpError, HttpErrorKind};
        let unclassified = object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(
                HttpErrorKind::Unknown,
                refused_connection_error(),
            )),
        };
        assert!(matches!(
            SinkError::from_object_store("given", "s3", unclassified),
            SinkError::Unreachable { .. }
        ));
        let undecodable_answer = object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(
                HttpErrorKind::Decode,
                refused_connection_error(),
            )),
        };
        assert!(matches!(
            SinkError::from_object_store("given", "s3", undecodable_answer),
            SinkError::Storage { .. }
        ));
    }

    #[test]
    fn container_names_follow_the_strictest_rules() {
        for good in ["abc", "fhirlog-exports", "a1-b2", &"a".repeat(63)] {
            assert!(ContainerName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "-abc",
            "abc-",
            "a--b",
            "ABC",
            "a_b",
            "../etc",
            "a/b",
            "a.b",
            &"a".repeat(64),
            "",
        ] {
            assert!(ContainerName::parse(bad).is_err(), "{bad}");
        }
    }
}
