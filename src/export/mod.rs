//! Bulk Data `$export` as stages (DESIGN.md §3–4): a kick-off becomes a typed
//! [`ExportRequest`]; the [`engine`] wires the stages and answers the HTTP layer and the CLI.
//!
//! - [`request`]: kick-off parameters parsed into an [`ExportRequest`].
//! - [`settings`]: how the engine runs.
//! - [`error`]: the one export error type, with a kind the caller acts on.
//! - [`job`]: the persisted job record, work units and checkpoints.
//! - [`registry`]: the jobs in memory and their control (stop, progress, the decision of their end).
//! - [`scheduler`]: persisted state → work items on a bounded channel to the workers.
//! - [`planner`]: snapshot, members, collection into the scratch set, units.
//! - [`referenced`]: `includeAssociatedData=_referenced`, the referenced resources added
//!   to the scratch set.
//! - [`provenance`]: the Provenance whose targets a Patient or Group export holds.
//! - [`worker`]: running one unit, retrying transient destination failures.
//! - [`finalizer`]: final file names, durable files, completion; clean-up.
//! - [`files`]: every object name and prefix a job uses.
//! - [`watchdog`]: stalled and expired jobs.
//! - [`manifest`]: the completion manifest.
//! - [`cli`]: `fhirlog export`.

pub mod cli;
pub mod engine;
pub mod error;
pub mod files;
pub mod finalizer;
pub mod job;
pub mod manifest;
pub mod planner;
pub mod provenance;
pub mod referenced;
pub mod registry;
pub mod request;
pub mod scheduler;
pub mod settings;
pub mod watchdog;
pub mod worker;

pub use engine::{ExportEngine, JobStatus};
pub use error::{ExportError, ExportErrorKind};
pub use registry::JobProgress;
pub use request::{
    AssociatedData, ExportLevel, ExportParameters, ExportRequest, InvalidExportRequest, KickOff,
};
pub use settings::ExportSettings;

#[cfg(test)]
mod tests;
