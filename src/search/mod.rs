//! FHIR R4 search: the FHIRPath subset of the parameter expressions, the search parameter
//! registry, typed queries and their matching, and `_elements` subsetting.

pub mod elements;
pub mod execute;
pub mod fhirpath;
pub mod matching;
pub mod query;
pub mod registry;
