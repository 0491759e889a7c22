//! `GET /fhir/metadata`: the CapabilityStatement.

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::{AppState, response};
use crate::fhir::{Instant, ResourceType};
use crate::search::registry::SearchParameterRegistry;

pub const BULK_DATA_CAPABILITY: &str =
    "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const EXPORT_DEFINITION: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";
const EXPORT_DOCUMENTATION: &str = "Bulk Data $export at system, Patient and Group level with _type, _since, _until, patient and _typeFilter. A _typeFilter value is Type?query over the search parameters listed under rest.resource.searchParam for that type; several filters for one type are ORed, types without a filter are exported whole, and a filter on a type outside _type, an unsupported parameter or a malformed query is refused (or, under Prefer: handling=lenient, dropped and reported in the error file). Patient and Group exports take includeAssociatedData=_referenced (a value of this server): besides the patients' compartments they then hold every resource outside the Patient compartment that an exported compartment resource references by a literal reference (Type/id, or an absolute URL under this server's base; contained #id references excluded), one hop, each once, as it was at the export's snapshot (_until included), in its own Type-n.ndjson files; _type limits the added types too, _typeFilter applies to the compartment resources only, and _since does not limit the added resources. A referenced resource that did not exist or was deleted at the snapshot is reported once as a warning in the error file. Patient and Group exports hold every Provenance whose target is an exported compartment resource; includeAssociatedData=RelevantProvenanceResources adds those whose target _referenced added. includeAssociatedData=LatestProvenanceResources replaces that default: for each exported non-Provenance resource (compartment or added by _referenced) only its most recent Provenance is exported (latest recorded, then meta.lastUpdated, then last written; one without recorded ranks lowest), each Provenance once; compartment Provenance that are no resource's latest are left out. Named with RelevantProvenanceResources, the latter applies (the least restrictive value). At system level _referenced, RelevantProvenanceResources and LatestProvenanceResources are refused (a system export holds every resource); unknown values are refused, or under Prefer: handling=lenient dropped and reported.";

/// The search parameters of one type this server evaluates: `rest.resource[].searchParam`.
fn search_parameters_of(resource_type: ResourceType) -> Vec<Value> {
    SearchParameterRegistry::r4()
        .parameters_of(resource_type)
        .filter(|parameter| parameter.compiled().is_ok())
        .map(|parameter| {
            json!({
                "name": parameter.code,
                "definition": parameter.definition_url,
                "type": parameter.parameter_type.as_str(),
            })
        })
        .collect()
}

pub fn capability_statement(state: &AppState) -> WarpResponse {
    let interactions = [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ];
    let resources: Vec<Value> = ResourceType::all()
        .map(|resource_type| {
            let mut resource = json!({
                "type": resource_type.as_str(),
                "interaction": interactions.iter().map(|code| json!({"code": code})).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "searchParam": search_parameters_of(resource_type),
            });
            let export_definition = match resource_type {
                ResourceType::PATIENT => Some(PATIENT_EXPORT_DEFINITION),
                ResourceType::GROUP => Some(GROUP_EXPORT_DEFINITION),
                _ => None,
            };
            if let Some(definition) = export_definition {
                resource["operation"] = json!([{"name": "export", "definition": definition, "documentation": EXPORT_DOCUMENTATION}]);
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
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "operation": [{"name": "export", "definition": EXPORT_DEFINITION, "documentation": EXPORT_DOCUMENTATION}],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_supported_search_parameters_of_each_type() {
        let started = std::time::Instant::now();
        let listed: usize = ResourceType::all()
            .map(|resource_type| search_parameters_of(resource_type).len())
            .sum();
        eprintln!(
            "{listed} search parameters listed in {:?}",
            started.elapsed()
        );
        let observation = search_parameters_of(ResourceType::parse("Observation").unwrap());
        let code = observation
            .iter()
            .find(|parameter| parameter["name"] == "code")
            .expect("Observation lists code");
        assert_eq!(
            code["definition"],
            "http://hl7.org/fhir/SearchParameter/clinical-code"
        );
        assert_eq!(code["type"], "token");
        let names: Vec<&str> = observation
            .iter()
            .filter_map(|parameter| parameter["name"].as_str())
            .collect();
        assert!(names.contains(&"_lastUpdated") && names.contains(&"patient"));
        assert!(
            !names.contains(&"code-value-quantity"),
            "composites are not listed"
        );
    }
}
