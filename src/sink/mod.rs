//! Where export files go: the [`Destination`] trait over `object_store`, with the local
//! filesystem (default) and in-memory (tests) implementations, container names that
//! cannot escape, and blocking helpers for worker threads.

mod conformance;
mod local;
mod memory;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub use local::LocalDestination;
pub use memory::MemoryDestination;

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

/// A backend that hands out one object store per container.
pub trait Destination: Send + Sync + 'static {
    /// Where this destination writes, for messages (no secrets).
    fn describe(&self) -> String;
    /// The store for `container`; a missing container is created or reported.
    fn open_container(&self, container: &ContainerName) -> Result<Arc<dyn ObjectStore>, SinkError>;
}

/// One container of a destination, with blocking calls for worker threads (which are
/// not runtime threads) and async ones for HTTP handlers.
#[derive(Clone)]
pub struct ContainerStore {
    container: ContainerName,
    objects: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Handle,
}

impl ContainerStore {
    pub fn new(
        container: ContainerName,
        objects: Arc<dyn ObjectStore>,
        runtime: tokio::runtime::Handle,
    ) -> ContainerStore {
        ContainerStore {
            container,
            objects,
            runtime,
        }
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
        let path = ObjectPath::from(name);
        let result = self
            .objects
            .get(&path)
            .await
            .map_err(|error| self.storage_error(error))?;
        Ok(result.into_stream())
    }

    pub async fn get_bytes(&self, name: &str) -> Result<Bytes, SinkError> {
        let path = ObjectPath::from(name);
        let result = self
            .objects
            .get(&path)
            .await
            .map_err(|error| self.storage_error(error))?;
        result
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
