use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use object_store::memory::InMemory;

use super::{ContainerName, Destination, Durability, OpenedContainer, SinkError};

/// Containers held in memory, for tests.
#[derive(Default)]
pub struct MemoryDestination {
    containers: Mutex<HashMap<ContainerName, Arc<InMemory>>>,
    create_containers: bool,
}

impl MemoryDestination {
    pub fn new(create_containers: bool) -> MemoryDestination {
        MemoryDestination {
            containers: Mutex::new(HashMap::new()),
            create_containers,
        }
    }
}

impl MemoryDestination {
    fn opened(&self, objects: Arc<InMemory>) -> OpenedContainer {
        OpenedContainer {
            objects: objects.clone(),
            interactive_objects: objects,
            signer: None,
            durability: Durability::CommittedOnUpload,
            destination: self.describe(),
        }
    }
}

impl Destination for MemoryDestination {
    fn describe(&self) -> String {
        "memory://".to_owned()
    }

    fn attach_container(&self, container: &ContainerName) -> Result<OpenedContainer, SinkError> {
        let containers = self
            .containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match containers.get(container) {
            Some(existing) => Ok(self.opened(Arc::clone(existing))),
            None => Err(SinkError::ContainerMissing {
                container: container.to_string(),
                destination: self.describe(),
            }),
        }
    }

    fn open_container(
        &self,
        container: &ContainerName,
        _runtime: &tokio::runtime::Handle,
    ) -> Result<OpenedContainer, SinkError> {
        let mut containers = self
            .containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = containers.get(container) {
            return Ok(self.opened(Arc::clone(existing)));
        }
        if !self.create_containers {
            return Err(SinkError::ContainerMissing {
                container: container.to_string(),
                destination: self.describe(),
            });
        }
        let created = Arc::new(InMemory::new());
        containers.insert(container.clone(), Arc::clone(&created));
        Ok(self.opened(created))
    }
}
