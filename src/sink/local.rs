use std::path::PathBuf;
use std::sync::Arc;

use object_store::local::LocalFileSystem;

use super::{ContainerName, Destination, OpenedContainer, SinkError};

/// Containers are directories under `root` (by default `{data-dir}/exports`).
pub struct LocalDestination {
    root: PathBuf,
    create_containers: bool,
}

impl LocalDestination {
    pub fn new(root: PathBuf, create_containers: bool) -> LocalDestination {
        LocalDestination {
            root,
            create_containers,
        }
    }
}

impl Destination for LocalDestination {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn open_container(
        &self,
        container: &ContainerName,
        _runtime: &tokio::runtime::Handle,
    ) -> Result<OpenedContainer, SinkError> {
        let directory = self.root.join(container.as_str());
        if !directory.is_dir() {
            if !self.create_containers {
                return Err(SinkError::ContainerMissing {
                    container: container.to_string(),
                    destination: self.describe(),
                });
            }
            std::fs::create_dir_all(&directory)?;
        }
        let objects = LocalFileSystem::new_with_prefix(&directory)
            .map_err(|source| SinkError::Storage {
                container: container.to_string(),
                source,
            })?
            .with_automatic_cleanup(true);
        Ok(OpenedContainer {
            objects: Arc::new(objects),
            signer: None,
        })
    }
}
