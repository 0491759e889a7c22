//! Placeholder for the FHIRPath evaluator's node type until the `fhirpath` branch merges.

use serde_json::Value;

use crate::fhir::ResourceType;

/// One value an expression selected, with its FHIR type code.
#[derive(Clone, Copy, Debug)]
pub struct TypedNode<'r> {
    pub value: &'r Value,
    pub fhir_type: &'static str,
}

#[derive(Debug)]
pub struct CompiledFhirPath;

#[derive(Debug, Clone, thiserror::Error)]
#[error("fhirpath evaluator not merged yet")]
pub struct UnsupportedFhirPath;

impl CompiledFhirPath {
    pub fn compile(
        _expression: &str,
        _resource_type: ResourceType,
    ) -> Result<CompiledFhirPath, UnsupportedFhirPath> {
        Err(UnsupportedFhirPath)
    }

    pub fn evaluate<'r>(&self, _resource: &'r Value) -> Vec<TypedNode<'r>> {
        Vec::new()
    }
}
