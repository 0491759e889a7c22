//! FHIR R4 search: the search parameter registry, typed queries and their matching.

pub mod matching;
pub mod query;
pub mod registry;
