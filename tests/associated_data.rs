//! Associated data in Patient and Group exports over real sockets: which references are
//! local (this server's base only), `includeAssociatedData=_referenced` (each referenced
//! resource once, as of the snapshot, missing targets reported as warnings), and resuming
//! its planning after SIGKILL.

mod support;

use std::collections::BTreeSet;

use fhirlog::export::ExportSettings;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::bulk::{BulkClient, Downloads, Export, KickOffRequest, Polling, ResourceKey, key};
use support::{FhirClient, spawn_app_with_export_settings};

const FILE_LIMIT: u64 = 3;

fn export_settings() -> ExportSettings {
    ExportSettings {
        max_resources_per_file: FILE_LIMIT,
        ..ExportSettings::default()
    }
}

/// PUTs `resource` and returns the stored body the server answered with.
fn put(client: &FhirClient, resource: &Value) -> Value {
    let path = format!(
        "/{}/{}",
        resource["resourceType"].as_str().expect("a resourceType"),
        resource["id"].as_str().expect("an id")
    );
    let reply = client.put_json(&path, resource);
    assert!(
        reply.status == StatusCode::OK || reply.status == StatusCode::CREATED,
        "PUT {path}: {} {}",
        reply.status,
        reply.text
    );
    reply.json()
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": id}]})
}

fn observation_about(id: &str, subject_reference: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": id},
           "subject": {"reference": subject_reference}})
}

fn group(id: &str, members: &[&str]) -> Value {
    let member: Vec<Value> = members
        .iter()
        .map(|patient| json!({"entity": {"reference": format!("Patient/{patient}")}}))
        .collect();
    json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": member})
}

fn export(bulk: &BulkClient, request: &KickOffRequest) -> Export {
    bulk.export(request, Polling::Eagerly, Downloads::PlainOnly, FILE_LIMIT)
}

fn observation_keys(export: &Export) -> BTreeSet<ResourceKey> {
    export
        .output_keys()
        .into_iter()
        .filter(|(resource_type, _)| resource_type == "Observation")
        .collect()
}

#[test]
fn only_references_on_this_servers_base_put_a_resource_in_a_patients_compartment() {
    let app = spawn_app_with_export_settings(export_settings());
    put(&app.client, &patient("x"));
    put(
        &app.client,
        &observation_about("injected", "http://other.example/fhir/Patient/x"),
    );
    put(
        &app.client,
        &observation_about("ours-absolute", &format!("{}/Patient/x", app.base_url)),
    );
    put(
        &app.client,
        &observation_about("ours-relative", "Patient/x"),
    );
    put(&app.client, &group("just-x", &["x"]));
    let bulk = BulkClient::new(&app.base_url);
    let expected = BTreeSet::from([
        key("Observation", "ours-absolute"),
        key("Observation", "ours-relative"),
    ]);

    for path in ["/Patient/$export", "/Group/just-x/$export"] {
        let exported = export(&bulk, &KickOffRequest::get(path));
        assert_eq!(observation_keys(&exported), expected, "{path}");
    }
}
