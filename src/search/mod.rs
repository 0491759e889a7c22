//! FHIR search: `_elements` subsetting.

pub mod elements;
