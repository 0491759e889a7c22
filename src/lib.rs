//! # fhirlog — a FHIR R4 server built around Bulk Data `$export`
//!
//! Layout, one line per module (DESIGN.md §7):
//! - [`app`]: the composition root — store, destination, export engine, routes, listener.
//! - [`auth`]: access control — static tokens, SMART Backend Services, scopes, job owners.
//! - [`config`]: settings from flags and `FHIRLOG_*` variables, validated at start-up.
//! - [`fhir`]: domain values parsed at the edge — resource types, ids, instants, canonical bodies, OperationOutcome, the Patient compartment.
//! - [`store`]: the event log in fjall and its projections; the only code that touches fjall.
//! - [`export`]: Bulk Data `$export` as stages — request, registry, scheduler, planner, worker, finalizer, files, watchdog, manifest.
//! - [`http`]: the warp front end — routes, handlers, downloads, `/healthz`, and the one mapping from errors to OperationOutcome.
//! - [`load`]: the ndjson and Bundle loader behind `fhirlog load` and `serve --load`.
//! - [`generate`]: the scale-data generator behind `fhirlog gen`.
//! - [`sink`]: export destinations — the `Destination` trait over object_store (local, memory, S3, Azure), durability, ranged reads.
//! - [`search`]: FHIR search — the FHIRPath subset, the R4 parameter registry, typed queries and matching.
//! - [`serve`]: `fhirlog serve` — open, load, listen, shut down gracefully.

pub mod app;
pub mod auth;
pub mod config;
pub mod export;
pub mod fhir;
pub mod generate;
pub mod http;
pub mod load;
pub mod search;
pub mod serve;
pub mod sink;
pub mod store;
