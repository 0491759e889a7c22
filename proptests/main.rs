//! Property tests in the style of sled's own (DESIGN.md §8): random operation sequences,
//! including restarts and projection rebuilds, run against the store and an in-memory
//! model; the resource body parser run against arbitrary bytes. Every shrunk failure is
//! kept in [`regressions`] as a named test.

mod body_parser;
mod body_prefilter;
mod canonical_stream;
mod date_prefixes;
mod export_model;
mod export_properties;
mod json_oracle;
mod regressions;
mod store_harness;
mod store_model;
mod store_properties;
