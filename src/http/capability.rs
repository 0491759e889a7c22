//! `GET /fhir/metadata`: the CapabilityStatement.

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::{AppState, response};
use crate::fhir::{Instant, ResourceType};

pub const BULK_DATA_CAPABILITY: &str =
    "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const EXPORT_DEFINITION: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

pub fn capability_statement(state: &AppState) -> WarpResponse {
    let interactions = [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "create",
    ];
    let resources: Vec<Value> = ResourceType::all()
        .map(|resource_type| {
            let mut resource = json!({
                "type": resource_type.as_str(),
                "interaction": interactions.iter().map(|code| json!({"code": code})).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
            });
            let export_definition = match resource_type {
                ResourceType::PATIENT => Some(PATIENT_EXPORT_DEFINITION),
                ResourceType::GROUP => Some(GROUP_EXPORT_DEFINITION),
                _ => None,
            };
            if let Some(definition) = export_definition {
                resource["operation"] = json!([{"name": "export", "definition": definition}]);
            }
            resource
        })
        .collect();
    let mut statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": Instant::now().to_fhir_string(),
        "publisher": "fhirlog",
        "kind": "instance",
        "instantiates": [BULK_DATA_CAPABILITY],
        "software": {"name": "fhirlog", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "fhirlog FHIR R4 server", "url": state.base_url.as_str()},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [{"name": "export", "definition": EXPORT_DEFINITION}],
        }],
    });
    if let Some(issuer) = state.auth.issuer() {
        statement["rest"][0]["security"] = json!({
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": issuer.token_endpoint()}]
            }]
        });
    }
    response::fhir_json(StatusCode::OK, &statement)
}
