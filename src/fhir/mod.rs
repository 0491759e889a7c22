//! FHIR R4 domain values parsed at the edge: resource types, ids, instants, canonical
//! bodies, OperationOutcomes, the Patient compartment definition and which references are local.

pub mod canonical;
pub mod compartment;
mod instant;
mod local_base;
pub mod outcome;
pub mod references;
mod resource_id;
mod resource_type;
mod resource_type_names;

pub use instant::{Instant, InstantParseError};
pub use local_base::LocalBase;
pub use resource_id::{ResourceId, ResourceIdParseError};
pub use resource_type::{ResourceType, UnknownResourceType};
