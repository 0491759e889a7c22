use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::local::LocalFileSystem;

use super::{ContainerName, Destination, Durability, OpenedContainer, SinkError};

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
            create_folder_durably(&directory)?;
        }
        self.attach_container(container)
    }

    fn attach_container(&self, container: &ContainerName) -> Result<OpenedContainer, SinkError> {
        let directory = self.root.join(container.as_str());
        if !directory.is_dir() {
            return Err(SinkError::ContainerMissing {
                container: container.to_string(),
                destination: self.describe(),
            });
        }
        let folder = std::fs::canonicalize(&directory)?;
        let files = Arc::new(
            LocalFileSystem::new_with_prefix(&folder)
                .map_err(|error| {
                    SinkError::from_object_store(container.as_str(), &self.describe(), error)
                })?
                .with_automatic_cleanup(true),
        );
        Ok(OpenedContainer {
            objects: files.clone(),
            interactive_objects: files.clone(),
            signer: None,
            durability: Durability::LocalFolder { folder, files },
            destination: self.describe(),
        })
    }
}

/// Creates `directory` and its missing ancestors, and fsyncs every folder that gained an
/// entry, so the container survives a power loss.
fn create_folder_durably(directory: &Path) -> std::io::Result<()> {
    let existing_ancestor = directory
        .ancestors()
        .find(|ancestor| ancestor.as_os_str().is_empty() || ancestor.is_dir())
        .map(Path::to_path_buf);
    std::fs::create_dir_all(directory)?;
    for ancestor in directory.ancestors().skip(1) {
        let folder = if ancestor.as_os_str().is_empty() {
            Path::new(".")
        } else {
            ancestor
        };
        std::fs::File::open(folder)?.sync_all()?;
        if existing_ancestor.as_deref() == Some(ancestor) {
            break;
        }
    }
    Ok(())
}
