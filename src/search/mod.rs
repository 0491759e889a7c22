//! FHIR search: the FHIRPath subset that search parameter expressions are written in.

pub mod fhirpath;
