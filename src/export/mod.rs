//! Bulk Data `$export`: request parsing, planning, persisted jobs, work units run by a
//! worker pool, and the manifest (DESIGN.md §3–4).

pub mod cli;
pub mod engine;
pub mod job;
pub mod manifest;
pub mod plan;
pub mod request;
pub mod settings;
pub mod unit;

pub use engine::{ExportEngine, ExportError, ExportSettings, JobStatus};
pub use request::{ExportLevel, ExportParameters, ExportRequest, InvalidExportRequest, KickOff};

#[cfg(test)]
mod tests;
