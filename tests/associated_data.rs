//! Associated data in Patient and Group exports over real sockets: which references are
//! local (this server's base only), `includeAssociatedData=_referenced` (each referenced
//! resource once, as of the snapshot, missing targets reported as warnings), and resuming
//! its planning after SIGKILL.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use fhirlog::export::ExportSettings;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::bulk::{
    BulkClient, Downloads, Export, KickOffRequest, Polling, ResourceKey, key, parameters,
};
use support::{
    FhirClient, ServerProcess, free_local_port, run_fhirlog, spawn_app_with_export_settings,
};
use tempfile::TempDir;

const FILE_LIMIT: u64 = 3;
const SAMPLE_FILE_LIMIT: u64 = 500;

fn export_settings() -> ExportSettings {
    ExportSettings {
        max_resources_per_file: FILE_LIMIT,
        ..ExportSettings::default()
    }
}

/// PUTs `resource` and returns the stored body the server answered with.
fn put(client: &FhirClient, resource: &Value) -> Value {
    client.put_resource(resource)
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": id}]})
}

fn observation_about(id: &str, subject_reference: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": id},
           "subject": {"reference": subject_reference}})
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
    put(&app.client, &support::person_group("just-x", &["x"]));
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

fn practitioner(id: &str, family_name: &str) -> Value {
    json!({"resourceType": "Practitioner", "id": id, "name": [{"family": family_name}]})
}

fn encounter(id: &str, patient_id: &str, practitioner_id: &str, organization_id: &str) -> Value {
    json!({"resourceType": "Encounter", "id": id, "status": "finished", "class": {"code": "AMB"},
           "subject": {"reference": format!("Patient/{patient_id}")},
           "participant": [{"individual": {"reference": format!("Practitioner/{practitioner_id}")}}],
           "serviceProvider": {"reference": format!("Organization/{organization_id}")},
           "location": [{"location": {"reference": "Location/clinic"}}]})
}

/// Three patients whose records reference one Practitioner, one Organization and one
/// Location through several resources; p3 alone references the Organization `org-p3`;
/// p1's records also reference a deleted Practitioner, a Medication that never existed
/// (twice each), another server's Practitioner and a contained one. `idle` is referenced
/// by nothing.
fn build_referencing_world(client: &FhirClient) {
    put(client, &practitioner("dr", "Shared"));
    put(client, &practitioner("idle", "Unreferenced"));
    put(client, &practitioner("gone", "Deleted"));
    put(
        client,
        &json!({"resourceType": "Organization", "id": "org", "name": "Clinic"}),
    );
    put(
        client,
        &json!({"resourceType": "Organization", "id": "org-p3", "name": "Other"}),
    );
    put(
        client,
        &json!({"resourceType": "Location", "id": "clinic", "name": "Room 1"}),
    );
    for patient_id in ["p1", "p2", "p3"] {
        put(client, &patient(patient_id));
        let organization_id = if patient_id == "p3" { "org-p3" } else { "org" };
        put(
            client,
            &encounter(
                &format!("e-{patient_id}"),
                patient_id,
                "dr",
                organization_id,
            ),
        );
        put(
            client,
            &json!({"resourceType": "Observation", "id": format!("o-{patient_id}"), "status": "final",
                    "code": {"text": "weight"}, "subject": {"reference": format!("Patient/{patient_id}")},
                    "encounter": {"reference": format!("Encounter/e-{patient_id}")},
                    "performer": [{"reference": "Practitioner/dr"}, {"reference": "Organization/org"}]}),
        );
    }
    for index in 1..=2 {
        put(
            client,
            &json!({"resourceType": "MedicationRequest", "id": format!("mr-{index}"), "status": "active",
                    "intent": "order", "subject": {"reference": "Patient/p1"},
                    "medicationReference": {"reference": "Medication/never"},
                    "requester": {"reference": "Practitioner/gone"},
                    "recorder": {"reference": "http://other.example/fhir/Practitioner/foreign"},
                    "contained": [{"resourceType": "Practitioner", "id": "inline"}],
                    "performer": {"reference": "#inline"}}),
        );
    }
    let reply = client.delete("/Practitioner/gone");
    assert!(reply.status.is_success(), "{}", reply.text);
}

fn referenced_request(path: &str) -> KickOffRequest {
    KickOffRequest::get(&format!("{path}?includeAssociatedData=_referenced"))
}

/// The keys of the exported resources of types outside the Patient compartment.
fn associated_keys(export: &Export) -> BTreeSet<ResourceKey> {
    export
        .output_keys()
        .into_iter()
        .filter(|(resource_type, _)| {
            ["Practitioner", "Organization", "Location", "Medication"]
                .contains(&resource_type.as_str())
        })
        .collect()
}

/// Each warning in the export's `error` files, as `severity code diagnostics`.
fn warnings(export: &Export) -> Vec<String> {
    export
        .error
        .iter()
        .flat_map(|file| &file.lines)
        .map(|line| {
            let outcome: Value = serde_json::from_str(line).expect("an error line is JSON");
            assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
            let issue = &outcome["issue"][0];
            format!(
                "{} {} {}",
                issue["severity"].as_str().unwrap_or_default(),
                issue["code"].as_str().unwrap_or_default(),
                issue["diagnostics"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

fn assert_each_resource_once(export: &Export) {
    let lines: usize = export.output.iter().map(|file| file.lines.len()).sum();
    assert_eq!(
        lines,
        export.output_keys().len(),
        "a resource is exported twice"
    );
}

#[test]
fn a_patient_export_with_referenced_adds_each_referenced_resource_once_and_reports_missing_ones() {
    let app = spawn_app_with_export_settings(export_settings());
    build_referencing_world(&app.client);
    let bulk = BulkClient::new(&app.base_url);
    let plain = export(&bulk, &KickOffRequest::get("/Patient/$export"));

    let with_referenced = export(&bulk, &referenced_request("/Patient/$export"));

    assert_each_resource_once(&with_referenced);
    assert_eq!(
        associated_keys(&with_referenced),
        BTreeSet::from([
            key("Practitioner", "dr"),
            key("Organization", "org"),
            key("Organization", "org-p3"),
            key("Location", "clinic"),
        ])
    );
    let counts = with_referenced.counts_by_type();
    assert_eq!(counts["Practitioner"], 1);
    assert_eq!(counts["Organization"], 2);
    assert_eq!(counts["Location"], 1);
    let compartment_part: BTreeSet<ResourceKey> = with_referenced
        .output_keys()
        .difference(&associated_keys(&with_referenced))
        .cloned()
        .collect();
    assert_eq!(compartment_part, plain.output_keys());
    assert!(associated_keys(&plain).is_empty());
    assert!(plain.error.is_empty());
    let dr_line = &with_referenced.lines_by_type()["Practitioner"][0];
    assert_eq!(
        dr_line,
        &app.client.get("/Practitioner/dr").text,
        "the referenced resource is exported as stored"
    );
    let reported = warnings(&with_referenced);
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(
        reported[0].starts_with("warning not-found Medication/never ")
            && reported[0].contains("did not exist"),
        "{reported:?}"
    );
    assert!(
        reported[1].starts_with("warning deleted Practitioner/gone ")
            && reported[1].contains("deleted"),
        "{reported:?}"
    );
}

#[test]
fn a_group_export_of_two_patients_sharing_a_practitioner_holds_it_once() {
    let app = spawn_app_with_export_settings(export_settings());
    build_referencing_world(&app.client);
    put(&app.client, &support::person_group("pair", &["p2", "p3"]));
    let bulk = BulkClient::new(&app.base_url);

    let by_get = export(&bulk, &referenced_request("/Group/pair/$export"));
    let by_post = export(
        &bulk,
        &KickOffRequest::post(
            "/Group/pair/$export",
            parameters(&[("includeAssociatedData", "_referenced")]),
        ),
    );

    for exported in [&by_get, &by_post] {
        assert_each_resource_once(exported);
        assert_eq!(
            associated_keys(exported),
            BTreeSet::from([
                key("Practitioner", "dr"),
                key("Organization", "org"),
                key("Organization", "org-p3"),
                key("Location", "clinic"),
            ])
        );
        assert!(
            !exported.output_keys().contains(&key("Encounter", "e-p1")),
            "p1 is no member"
        );
        assert!(
            warnings(exported).is_empty(),
            "p1's missing targets are not p2's or p3's"
        );
    }
    let narrowed = export(
        &bulk,
        &KickOffRequest::post(
            "/Group/pair/$export",
            json!({"resourceType": "Parameters", "parameter": [
                {"name": "includeAssociatedData", "valueString": "_referenced"},
                {"name": "patient", "valueReference": {"reference": "Patient/p2"}}]}),
        ),
    );
    assert_eq!(
        associated_keys(&narrowed),
        BTreeSet::from([
            key("Practitioner", "dr"),
            key("Organization", "org"),
            key("Location", "clinic"),
        ])
    );
}

#[test]
fn type_limits_the_associated_types_and_type_filter_only_the_compartment_resources() {
    let app = spawn_app_with_export_settings(export_settings());
    build_referencing_world(&app.client);
    let bulk = BulkClient::new(&app.base_url);

    let limited = export(
        &bulk,
        &KickOffRequest::get(
            "/Patient/$export?_type=Encounter,Practitioner&includeAssociatedData=_referenced",
        ),
    );
    assert_eq!(
        limited.counts_by_type().keys().cloned().collect::<Vec<_>>(),
        vec!["Encounter".to_owned(), "Practitioner".to_owned()]
    );
    assert_eq!(
        associated_keys(&limited),
        BTreeSet::from([key("Practitioner", "dr")])
    );

    let filtered = export(
        &bulk,
        &KickOffRequest::get(
            "/Patient/$export?_type=Encounter,Organization&_typeFilter=Encounter%3Fpatient%3DPatient%2Fp3&includeAssociatedData=_referenced",
        ),
    );
    assert_eq!(
        filtered.output_keys(),
        BTreeSet::from([key("Encounter", "e-p3"), key("Organization", "org-p3")]),
        "only the filtered Encounter's references count, and the Organization is not filtered"
    );
}

#[test]
fn until_exports_the_referenced_resource_as_it_was_and_since_does_not_limit_it() {
    let app = spawn_app_with_export_settings(export_settings());
    put(&app.client, &patient("p1"));
    put(
        &app.client,
        &json!({"resourceType": "Organization", "id": "org", "name": "Clinic"}),
    );
    put(
        &app.client,
        &json!({"resourceType": "Location", "id": "clinic", "name": "Room 1"}),
    );
    put(&app.client, &encounter("e-p1", "p1", "dr", "org"));
    let old_version = put(&app.client, &practitioner("dr", "Before"));
    let until = old_version["meta"]["lastUpdated"]
        .as_str()
        .expect("meta.lastUpdated")
        .to_owned();
    std::thread::sleep(Duration::from_millis(5));
    let new_version = put(&app.client, &practitioner("dr", "After"));
    let bulk = BulkClient::new(&app.base_url);
    let family_of_exported_dr = |exported: &Export| -> String {
        let lines = exported.lines_by_type();
        assert_eq!(lines["Practitioner"].len(), 1);
        let practitioner: Value = serde_json::from_str(&lines["Practitioner"][0]).unwrap();
        practitioner["name"][0]["family"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    let as_it_was = export(
        &bulk,
        &KickOffRequest::get(&format!(
            "/Patient/$export?_until={}&includeAssociatedData=_referenced",
            until.replace('+', "%2B")
        )),
    );
    assert_eq!(family_of_exported_dr(&as_it_was), "Before");
    let as_it_is = export(&bulk, &referenced_request("/Patient/$export"));
    assert_eq!(family_of_exported_dr(&as_it_is), "After");

    std::thread::sleep(Duration::from_millis(5));
    let touched = put(
        &app.client,
        &json!({"resourceType": "Observation", "id": "late", "status": "final", "code": {"text": "x"},
                "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Practitioner/dr"}]}),
    );
    let since = new_version["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(touched["meta"]["lastUpdated"].as_str().unwrap() > since.as_str());
    let changed_since = export(
        &bulk,
        &KickOffRequest::get(&format!(
            "/Patient/$export?_since={}&includeAssociatedData=_referenced",
            since.replace('+', "%2B")
        )),
    );
    assert_eq!(
        changed_since.output_keys(),
        BTreeSet::from([key("Observation", "late"), key("Practitioner", "dr")]),
        "dr last changed at _since, yet the late Observation references it"
    );
}

#[test]
fn include_associated_data_values_are_checked_and_include_referenced_sets_the_default() {
    let app = spawn_app_with_export_settings(ExportSettings {
        include_referenced: true,
        ..export_settings()
    });
    build_referencing_world(&app.client);
    put(&app.client, &support::person_group("pair", &["p2", "p3"]));
    let bulk = BulkClient::new(&app.base_url);

    for path in ["/Patient/$export", "/Group/pair/$export"] {
        let by_default = export(&bulk, &KickOffRequest::get(path));
        assert!(
            by_default
                .output_keys()
                .contains(&key("Practitioner", "dr")),
            "{path}: --include-referenced makes _referenced the default"
        );
    }
    let system = export(&bulk, &KickOffRequest::get("/$export?_type=Practitioner"));
    assert_eq!(
        system.counts_by_type()["Practitioner"],
        2,
        "dr and idle, not more"
    );

    bulk.send_kick_off(&KickOffRequest::get(
        "/Patient/$export?includeAssociatedData=_nonsense",
    ))
    .expect_operation_outcome(
        StatusCode::BAD_REQUEST,
        &["includeAssociatedData", "_nonsense"],
    );
    bulk.send_kick_off(&KickOffRequest::get(
        "/$export?includeAssociatedData=_referenced",
    ))
    .expect_operation_outcome(StatusCode::BAD_REQUEST, &["_referenced", "system"]);
    let lenient = export(
        &bulk,
        &KickOffRequest::get("/Patient/$export?includeAssociatedData=_nonsense")
            .with_prefer(&["respond-async", "handling=lenient"]),
    );
    assert!(
        associated_keys(&lenient).is_empty(),
        "a kick-off naming its own includeAssociatedData does not get the default"
    );
    let reported = warnings(&lenient);
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(reported[0].contains("_nonsense"), "{reported:?}");
}

fn provenance(id: &str, targets: &[&str]) -> Value {
    let target: Vec<Value> = targets
        .iter()
        .map(|reference| json!({"reference": reference}))
        .collect();
    json!({"resourceType": "Provenance", "id": id, "target": target,
           "recorded": "2024-01-01T00:00:00Z", "agent": [{"who": {"reference": "Practitioner/dr"}}]})
}

fn provenance_ids(export: &Export) -> BTreeSet<String> {
    export
        .output_keys()
        .into_iter()
        .filter(|(resource_type, _)| resource_type == "Provenance")
        .map(|(_, id)| id)
        .collect()
}

fn ids(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

#[test]
fn provenance_of_exported_compartment_resources_is_exported_and_relevant_adds_referenced_ones() {
    let app = spawn_app_with_export_settings(export_settings());
    build_referencing_world(&app.client);
    put(&app.client, &support::person_group("pair", &["p2", "p3"]));
    let foreign_target = "http://other.example/fhir/Observation/o-p1".to_owned();
    for (id, targets) in [
        (
            "prov-obs",
            vec!["Observation/o-p1", "Observation/o-p1/_history/1"],
        ),
        ("prov-dr", vec!["Practitioner/dr"]),
        ("prov-patient", vec!["Patient/p2"]),
        ("prov-foreign", vec![foreign_target.as_str()]),
        ("prov-idle", vec!["Practitioner/idle"]),
    ] {
        put(&app.client, &provenance(id, &targets));
    }
    let bulk = BulkClient::new(&app.base_url);
    let cases = [
        ("/Patient/$export", ids(&["prov-obs", "prov-patient"])),
        (
            "/Patient/$export?includeAssociatedData=_referenced,RelevantProvenanceResources",
            ids(&["prov-obs", "prov-patient", "prov-dr"]),
        ),
        (
            "/Patient/$export?includeAssociatedData=_referenced",
            ids(&["prov-obs", "prov-patient"]),
        ),
        (
            "/Patient/$export?includeAssociatedData=RelevantProvenanceResources",
            ids(&["prov-obs", "prov-patient"]),
        ),
        ("/Group/pair/$export", ids(&["prov-patient"])),
        (
            "/Group/pair/$export?includeAssociatedData=_referenced&includeAssociatedData=RelevantProvenanceResources",
            ids(&["prov-patient", "prov-dr"]),
        ),
        (
            "/Patient/$export?_type=Observation,Provenance&_typeFilter=Observation%3Fsubject%3DPatient%2Fp2",
            ids(&["prov-patient"]),
        ),
        ("/Patient/$export?_type=Observation", ids(&[])),
    ];
    for (path, expected) in cases {
        let exported = export(&bulk, &KickOffRequest::get(path));
        assert_each_resource_once(&exported);
        assert_eq!(provenance_ids(&exported), expected, "{path}");
    }
}

fn load_sample(data_dir: &Path) {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("sample");
    let output = run_fhirlog(&[
        OsStr::new("load"),
        sample.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ]);
    assert!(
        output.status.success(),
        "loading data/sample failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Kicks off `_referenced` Patient exports until one is caught in its first pass, after
/// some compartment resources were exported and their references collected, then kills
/// the server with SIGKILL; `None` when every attempt got past it.
fn kick_off_and_kill_while_collecting_referenced(
    server: &mut ServerProcess,
) -> Option<(String, String)> {
    let bulk = BulkClient::new(&server.base_url);
    for _ in 0..5 {
        let status_url = bulk.kick_off(&referenced_request("/Patient/$export"));
        loop {
            let reply = bulk.status(&status_url);
            if reply.status != StatusCode::ACCEPTED {
                break;
            }
            let progress = reply.required_header("x-progress").to_owned();
            let first_pass = "exporting compartments and collecting referenced resources: ";
            if progress.starts_with(first_pass) && !progress.contains("(0 resources;") {
                server.kill_hard();
                return Some((status_url, progress));
            }
            if !progress.starts_with(first_pass) && !progress.starts_with("collecting") {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    None
}

#[test]
fn a_referenced_export_killed_while_collecting_resumes_and_equals_an_uninterrupted_one() {
    let workspace = TempDir::new().expect("creating a workspace");
    let data_dir = workspace.path().join("data");
    load_sample(&data_dir);
    let port = free_local_port();
    let file_limit = SAMPLE_FILE_LIMIT.to_string();
    let arguments = ["--max-resources-per-file", &file_limit, "--workers", "1"];
    let mut server = ServerProcess::start_on_port(&data_dir, port, &arguments);
    let (status_url, progress_at_kill) = kick_off_and_kill_while_collecting_referenced(&mut server)
        .expect("an export caught while collecting referenced resources");

    let server = ServerProcess::restart_resuming_export(&data_dir, port, &arguments);
    let bulk = BulkClient::new(&server.base_url);
    let resumed_completion = bulk.poll_until_complete(&status_url, Polling::Eagerly);
    let resumed = bulk.download(resumed_completion, Downloads::PlainOnly);
    let uninterrupted = bulk.export(
        &referenced_request("/Patient/$export"),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SAMPLE_FILE_LIMIT,
    );

    assert_eq!(resumed.transaction_time(), uninterrupted.transaction_time());
    assert_eq!(
        resumed.counts_by_type(),
        uninterrupted.counts_by_type(),
        "killed at {progress_at_kill}"
    );
    assert_eq!(
        resumed.lines_by_type(),
        uninterrupted.lines_by_type(),
        "killed at {progress_at_kill}"
    );
    let associated: BTreeMap<String, u64> = uninterrupted
        .counts_by_type()
        .into_iter()
        .filter(|(type_name, _)| {
            ["Practitioner", "Organization", "Location"].contains(&type_name.as_str())
        })
        .collect();
    assert_eq!(associated.len(), 3, "{associated:?}");
}

fn provenance_recorded_at(id: &str, targets: &[&str], recorded: Option<&str>) -> Value {
    let mut resource = provenance(id, targets);
    match recorded {
        Some(recorded) => resource["recorded"] = json!(recorded),
        None => {
            resource
                .as_object_mut()
                .expect("a Provenance object")
                .remove("recorded");
        }
    }
    resource
}

#[test]
fn latest_provenance_exports_each_exported_resource_s_most_recent_provenance_once() {
    let app = spawn_app_with_export_settings(export_settings());
    build_referencing_world(&app.client);
    put(&app.client, &support::person_group("pair", &["p2", "p3"]));
    for (id, targets, recorded) in [
        (
            "obs-late",
            vec!["Observation/o-p1"],
            Some("2024-06-01T00:00:00Z"),
        ),
        (
            "obs-early",
            vec!["Observation/o-p1"],
            Some("2024-01-01T00:00:00Z"),
        ),
        (
            "shared",
            vec!["Observation/o-p2", "Patient/p2"],
            Some("2024-03-01T00:00:00+02:00"),
        ),
        ("p2-old", vec!["Patient/p2"], Some("2023-01-01T00:00:00Z")),
        (
            "o-p3-recorded",
            vec!["Observation/o-p3"],
            Some("2020-01-01T00:00:00Z"),
        ),
        ("o-p3-unrecorded", vec!["Observation/o-p3"], None),
        (
            "dr-new",
            vec!["Practitioner/dr"],
            Some("2024-02-01T00:00:00Z"),
        ),
        (
            "dr-old",
            vec!["Practitioner/dr"],
            Some("2023-02-01T00:00:00Z"),
        ),
    ] {
        put(&app.client, &provenance_recorded_at(id, &targets, recorded));
    }
    let bulk = BulkClient::new(&app.base_url);
    let every_compartment_one = [
        "obs-late",
        "obs-early",
        "shared",
        "p2-old",
        "o-p3-recorded",
        "o-p3-unrecorded",
    ];
    let cases = [
        ("/Patient/$export", ids(&every_compartment_one)),
        (
            "/Patient/$export?includeAssociatedData=LatestProvenanceResources",
            ids(&["obs-late", "shared", "o-p3-recorded"]),
        ),
        (
            "/Patient/$export?includeAssociatedData=_referenced,LatestProvenanceResources",
            ids(&["obs-late", "shared", "o-p3-recorded", "dr-new"]),
        ),
        (
            "/Patient/$export?includeAssociatedData=_referenced,LatestProvenanceResources,RelevantProvenanceResources",
            ids(&[every_compartment_one.as_slice(), &["dr-new", "dr-old"]].concat()),
        ),
        (
            "/Group/pair/$export?includeAssociatedData=LatestProvenanceResources",
            ids(&["shared", "o-p3-recorded"]),
        ),
        (
            "/Patient/$export?_type=Observation,Provenance&includeAssociatedData=LatestProvenanceResources",
            ids(&["obs-late", "shared", "o-p3-recorded"]),
        ),
    ];
    for (path, expected) in cases {
        let exported = export(&bulk, &KickOffRequest::get(path));
        assert_each_resource_once(&exported);
        assert_eq!(provenance_ids(&exported), expected, "{path}");
    }

    bulk.send_kick_off(&KickOffRequest::get(
        "/Patient/$export?includeAssociatedData=LatestProvenance",
    ))
    .expect_operation_outcome(
        StatusCode::BAD_REQUEST,
        &["includeAssociatedData", "LatestProvenance"],
    );
    bulk.send_kick_off(&KickOffRequest::get(
        "/$export?includeAssociatedData=LatestProvenanceResources",
    ))
    .expect_operation_outcome(
        StatusCode::BAD_REQUEST,
        &["LatestProvenanceResources", "system"],
    );
}
