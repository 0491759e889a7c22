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
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
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

/// Storage failures, with whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("container '{container}' does not exist in {destination}")]
    ContainerMissing {
        container: String,
        destination: String,
    },
    #[error("object '{0}' does not exist")]
    NotFound(String),
    #[error("storage error in container '{container}': {source}")]
    Storage {
        container: String,
        #[source]
        source: object_store::Error,
    },
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Error texts of failures that retrying cannot fix: rejected credentials or
/// permissions, and missing buckets or containers.
const PERMANENT_FAILURE_MARKERS: [&str; 12] = [
    "401 Unauthorized",
    "403 Forbidden",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "NoSuchBucket",
    "ContainerNotFound",
    "InvalidBucketName",
    "Permission denied",
];

impl SinkError {
    /// Whether trying again later can succeed (timeouts, 5xx, throttling, dropped
    /// connections); a missing container or rejected credentials never will.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::ContainerMissing { .. } | SinkError::NotFound(_) => false,
            SinkError::Io(error) => !matches!(
                error.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ReadOnlyFilesystem
            ),
            SinkError::Storage { source, .. } => match source {
                object_store::Error::NotFound { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => false,
                other => !error_chain_mentions(other, &PERMANENT_FAILURE_MARKERS),
            },
        }
    }
}

/// An opened container: its objects, and a URL signer where the backend has one.
pub struct OpenedContainer {
    pub objects: Arc<dyn ObjectStore>,
    pub signer: Option<Arc<dyn Signer>>,
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
    /// may create containers) or reported as [`SinkError::ContainerMissing`]. Blocking.
    fn open_container(
        &self,
        container: &ContainerName,
        runtime: &tokio::runtime::Handle,
    ) -> Result<OpenedContainer, SinkError>;
}

/// Opens a cloud container: checks it exists, creates it with `create` when allowed, and
/// hands out the store with its URL signer.
pub(crate) fn open_checked_container<S: ObjectStore + Signer>(
    store: Arc<S>,
    container: &ContainerName,
    destination: &dyn Destination,
    create_containers: bool,
    runtime: &tokio::runtime::Handle,
    create: impl std::future::Future<Output = Result<(), SinkError>>,
) -> Result<OpenedContainer, SinkError> {
    let exists = runtime
        .block_on(container_exists(store.as_ref()))
        .map_err(|source| SinkError::Storage {
            container: container.to_string(),
            source,
        })?;
    if !exists {
        if !create_containers {
            return Err(SinkError::ContainerMissing {
                container: container.to_string(),
                destination: destination.describe(),
            });
        }
        runtime.block_on(create)?;
    }
    Ok(OpenedContainer {
        objects: store.clone(),
        signer: Some(store),
    })
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

/// Objects are stored as `application/fhir+ndjson`, so signed-URL downloads carry the
/// right Content-Type. Set these before any other option: they replace the client options
/// (`allow_http` included).
pub fn ndjson_client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new().with_default_content_type("application/fhir+ndjson")
}

/// One container of a destination, with blocking calls for worker threads (which are
/// not runtime threads) and async ones for HTTP handlers.
#[derive(Clone)]
pub struct ContainerStore {
    container: ContainerName,
    objects: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    runtime: tokio::runtime::Handle,
}

/// Bytes handed to a multipart upload at a time, and uploads in flight per writer:
/// together they bound an upload's memory whatever the file size.
const UPLOAD_CHUNK_BYTES: usize = 5 * 1024 * 1024;
const UPLOAD_PARTS_IN_FLIGHT: usize = 2;

/// A streaming (multipart/block) upload of one object, fed from a worker thread.
pub struct ObjectUpload {
    writer: Option<WriteMultipart>,
    pending: Vec<u8>,
    store: ContainerStore,
    name: String,
}

impl ObjectUpload {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= UPLOAD_CHUNK_BYTES {
            self.hand_over_pending()?;
        }
        Ok(())
    }

    fn hand_over_pending(&mut self) -> Result<(), SinkError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.pending));
        let runtime = self.store.runtime.clone();
        let _context = runtime.enter();
        writer.put(chunk);
        runtime
            .block_on(writer.wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT))
            .map_err(|error| self.store.storage_error(error))
    }

    /// Completes the object; it becomes visible only now.
    pub fn finish(mut self) -> Result<(), SinkError> {
        self.hand_over_pending()?;
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        let runtime = self.store.runtime.clone();
        let _context = runtime.enter();
        runtime
            .block_on(writer.finish())
            .map(|_| ())
            .map_err(|error| self.store.storage_error(error))
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
            signer: opened.signer,
            runtime,
        }
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
            pending: Vec::with_capacity(64 * 1024),
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

    fn storage_error(&self, source: object_store::Error) -> SinkError {
        match source {
            object_store::Error::NotFound { path, .. } => SinkError::NotFound(path),
            source => SinkError::Storage {
                container: self.container.to_string(),
                source,
            },
        }
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

    /// Streams an object's bytes.
    pub async fn get_stream(
        &self,
        name: &str,
    ) -> Result<
        impl futures_util::Stream<Item = Result<Bytes, object_store::Error>> + Send + 'static,
        SinkError,
    > {
        Ok(self.get(name).await?.into_stream())
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
