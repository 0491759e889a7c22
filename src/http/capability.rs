//! `GET /fhir/metadata`: the CapabilityStatement.

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::{AppState, response};
use crate::fhir::{Instant, ResourceType};

pub const BULK_DATA_CAPABILITY: &str =
    "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";

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
            json!({
                "type": resource_type.as_str(),
                "interaction": interactions.iter().map(|code| json!({"code": code})).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
            })
        })
        .collect();
    let statement = json!({
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
        }],
    });
    response::fhir_json(StatusCode::OK, &statement)
}
