use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;
use object_store::memory::InMemory;

use super::{ContainerName, Destination, SinkError};

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

    /// Adds an empty container (as an operator would create a bucket).
    pub fn create_container(&self, container: &ContainerName) {
        self.containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(container.clone())
            .or_insert_with(|| Arc::new(InMemory::new()));
    }
}

impl Destination for MemoryDestination {
    fn describe(&self) -> String {
        "memory://".to_owned()
    }

    fn open_container(&self, container: &ContainerName) -> Result<Arc<dyn ObjectStore>, SinkError> {
        let mut containers = self
            .containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = containers.get(container) {
            return Ok(Arc::clone(existing) as Arc<dyn ObjectStore>);
        }
        if !self.create_containers {
            return Err(SinkError::ContainerMissing {
                container: container.to_string(),
                destination: self.describe(),
            });
        }
        let created = Arc::new(InMemory::new());
        containers.insert(container.clone(), Arc::clone(&created));
        Ok(created)
    }
}
