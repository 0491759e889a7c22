//! Bulk Data `$export` over real sockets, driven the way a bulk client drives it:
//! kick-off, status polling, the manifest, plain and gzip downloads, cancel, every
//! refused kick-off, snapshot semantics, resume after SIGKILL, and the job limits.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fhirlog::export::ExportSettings;
use fhirlog::fhir::{ResourceId, ResourceType};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::bulk::{
    BulkClient, Completion, Downloads, EAGER_POLL_INTERVAL, EXPORT_DEADLINE, Export,
    KickOffRequest, NDJSON, Polling, ResourceKey, assert_in_progress_reply, assert_manifest_shape,
    assert_output_files_are_numbered_per_type, gunzip, key, parameters, parse_http_date,
    parse_instant, resource_header,
};
use support::fake_s3::{self, SwitchableS3};
use support::{
    FhirClient, Reply, ServerProcess, TestApp, free_local_port, run_fhirlog,
    spawn_app_in_data_dir_with_export_settings, spawn_app_with_export_settings,
};
use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const SMALL_FILE_LIMIT: u64 = 4;
const SAMPLE_FILE_LIMIT: u64 = 500;
const SAMPLE_RESOURCE_COUNT: u64 = 45_200;
const SAMPLE_TEMPLATE_PREFIX: &str = "export-flow-sample-store-";
const DEFAULT_CONTAINER: &str = "fhirlog-exports";
const BULK_DATA_CAPABILITY: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const EXPORT_DEFINITION: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

fn export_settings(max_resources_per_file: u64) -> ExportSettings {
    ExportSettings {
        max_resources_per_file,
        ..ExportSettings::default()
    }
}

fn single_worker_export_settings(max_resources_per_file: u64) -> ExportSettings {
    ExportSettings {
        workers: 1,
        max_resources_per_file,
        ..ExportSettings::default()
    }
}

fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn last_updated_of(resource: &Value) -> String {
    resource["meta"]["lastUpdated"]
        .as_str()
        .unwrap_or_else(|| panic!("resource has no meta.lastUpdated: {resource}"))
        .to_owned()
}

fn sample_data_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("sample")
}

fn copy_directory(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|error| panic!("creating {to:?}: {error}"));
    for entry in std::fs::read_dir(from).unwrap_or_else(|error| panic!("listing {from:?}: {error}"))
    {
        let entry = entry.expect("reading a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("reading a file type").is_dir() {
            copy_directory(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|error| panic!("copying {:?}: {error}", entry.path()));
        }
    }
}

fn remove_sample_templates_of_finished_runs(root: &Path) {
    let processes = Path::new("/proc");
    if !processes.is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(process_id) = name
            .to_str()
            .and_then(|name| name.strip_prefix(SAMPLE_TEMPLATE_PREFIX))
            .and_then(|process_id| process_id.parse::<u32>().ok())
        else {
            continue;
        };
        if !processes.join(process_id.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A store with `data/sample` loaded by `fhirlog load`, built once per test run; tests
/// that need volume copy it instead of loading the sample again.
fn sample_store_template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_sample_templates_of_finished_runs(root);
        let template = root.join(format!("{SAMPLE_TEMPLATE_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&template);
        let output = run_fhirlog(&[
            OsStr::new("load"),
            sample_data_directory().as_os_str(),
            OsStr::new("--data-dir"),
            template.as_os_str(),
        ]);
        assert!(
            output.status.success(),
            "loading data/sample failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        template
    })
}

/// Resources per type in `data/sample`, from its `{Type}.ndjson.gz` files.
fn sample_counts_by_type() -> &'static BTreeMap<String, u64> {
    static COUNTS: OnceLock<BTreeMap<String, u64>> = OnceLock::new();
    COUNTS.get_or_init(|| {
        let mut counts = BTreeMap::new();
        for entry in std::fs::read_dir(sample_data_directory()).expect("listing data/sample") {
            let path = entry.expect("reading a directory entry").path();
            let Some(type_name) = path
                .file_name()
                .and_then(OsStr::to_str)
                .and_then(|name| name.strip_suffix(".ndjson.gz"))
            else {
                continue;
            };
            let text = String::from_utf8(gunzip(&std::fs::read(&path).expect("reading sample")))
                .expect("sample files are UTF-8");
            let lines = text.lines().filter(|line| !line.trim().is_empty()).count();
            counts.insert(type_name.to_owned(), lines as u64);
        }
        assert_eq!(counts.values().sum::<u64>(), SAMPLE_RESOURCE_COUNT);
        counts
    })
}

fn sample_patient_ids() -> Vec<String> {
    let compressed =
        std::fs::read(sample_data_directory().join("Patient.ndjson.gz")).expect("reading sample");
    let text = String::from_utf8(gunzip(&compressed)).expect("sample files are UTF-8");
    let mut ids: Vec<String> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<Value>(line).expect("a sample Patient")["id"]
                .as_str()
                .expect("a sample Patient id")
                .to_owned()
        })
        .collect();
    ids.sort();
    ids
}

fn data_dir_with_sample() -> TempDir {
    let data_dir = TempDir::new().expect("creating a temporary data directory");
    copy_directory(sample_store_template(), data_dir.path());
    data_dir
}

fn spawn_app_with_sample(settings: ExportSettings) -> TestApp {
    spawn_app_in_data_dir_with_export_settings(data_dir_with_sample(), settings)
}

fn patient(id: &str, family_name: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family_name}]})
}

fn observation(id: &str, subject: &str, code: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"text": code}, "subject": {"reference": format!("Patient/{subject}")}})
}

/// PUTs `resource` and returns the stored body the server answered with.
fn put(client: &FhirClient, resource: &Value) -> Value {
    client.put_resource(resource)
}

fn delete(client: &FhirClient, reference: &str) {
    let reply = client.delete(&format!("/{reference}"));
    assert!(
        reply.status == StatusCode::OK || reply.status == StatusCode::NO_CONTENT,
        "DELETE {reference}: {} {}",
        reply.status,
        reply.text
    );
}

fn read_text(client: &FhirClient, path: &str) -> String {
    let reply = client.get(path);
    assert_eq!(reply.status, StatusCode::OK, "GET {path}: {}", reply.text);
    reply.text
}

/// What a test wrote: every live resource and the patients whose compartments hold it.
#[derive(Default)]
struct World {
    live: BTreeMap<ResourceKey, BTreeSet<String>>,
}

impl World {
    fn put(&mut self, client: &FhirClient, resource: Value, compartment_of: &[&str]) -> Value {
        let stored = put(client, &resource);
        let resource_key = key(
            resource["resourceType"].as_str().expect("a resourceType"),
            resource["id"].as_str().expect("an id"),
        );
        self.live.insert(
            resource_key,
            compartment_of.iter().map(|id| (*id).to_owned()).collect(),
        );
        stored
    }

    fn delete(&mut self, client: &FhirClient, resource_type: &str, id: &str) {
        delete(client, &format!("{resource_type}/{id}"));
        self.live.remove(&key(resource_type, id));
    }

    fn every_live_resource(&self) -> BTreeSet<ResourceKey> {
        self.live.keys().cloned().collect()
    }

    fn in_some_patient_compartment(&self) -> BTreeSet<ResourceKey> {
        self.live
            .iter()
            .filter(|(_, patients)| !patients.is_empty())
            .map(|(resource_key, _)| resource_key.clone())
            .collect()
    }

    fn in_compartments_of(&self, members: &[&str]) -> BTreeSet<ResourceKey> {
        self.live
            .iter()
            .filter(|((resource_type, _), patients)| {
                resource_type != "Group" && members.iter().any(|member| patients.contains(*member))
            })
            .map(|(resource_key, _)| resource_key.clone())
            .collect()
    }
}

/// GET of each resource: the stored body an export must reproduce byte for byte.
fn current_bodies(
    client: &FhirClient,
    keys: &BTreeSet<ResourceKey>,
) -> BTreeMap<ResourceKey, String> {
    keys.iter()
        .map(|(resource_type, id)| {
            (
                key(resource_type, id),
                read_text(client, &format!("/{resource_type}/{id}")),
            )
        })
        .collect()
}

const SMALL_WORLD_PATIENTS: [&str; 6] = ["p-1", "p-2", "p-3", "p-4", "p-5", "p-6"];
const SMALL_WORLD_GROUP: &str = "grp-1";
const SMALL_WORLD_GROUP_MEMBERS: [&str; 3] = ["p-1", "p-2", "p-4"];

/// Six patients with observations and encounters, an organization and practitioners
/// outside every compartment, an observation in two compartments, a Group, updates and
/// a delete.
fn build_small_world(client: &FhirClient) -> World {
    let mut world = World::default();
    world.put(
        client,
        json!({"resourceType": "Organization", "id": "org-1", "name": "Clinic"}),
        &[],
    );
    for practitioner in ["pr-1", "pr-2"] {
        world.put(
            client,
            json!({"resourceType": "Practitioner", "id": practitioner, "name": [{"family": practitioner}]}),
            &[],
        );
    }
    for (index, patient_id) in SMALL_WORLD_PATIENTS.iter().enumerate() {
        world.put(
            client,
            json!({"resourceType": "Patient", "id": patient_id, "gender": if index % 2 == 0 {"female"} else {"male"},
                   "name": [{"family": format!("Family{index}")}],
                   "managingOrganization": {"reference": "Organization/org-1"}}),
            &[patient_id],
        );
        for suffix in ["a", "b"] {
            world.put(
                client,
                json!({"resourceType": "Observation", "id": format!("obs-{}-{suffix}", index + 1),
                       "status": "final", "code": {"text": format!("code {suffix}")},
                       "subject": {"reference": format!("Patient/{patient_id}")},
                       "performer": [{"reference": "Practitioner/pr-1"}],
                       "valueQuantity": {"value": 1.50, "unit": "mg"}}),
                &[patient_id],
            );
        }
        world.put(
            client,
            json!({"resourceType": "Encounter", "id": format!("enc-{}", index + 1), "status": "finished",
                   "class": {"code": "AMB"}, "subject": {"reference": format!("Patient/{patient_id}")},
                   "serviceProvider": {"reference": "Organization/org-1"},
                   "participant": [{"individual": {"reference": "Practitioner/pr-2"}}]}),
            &[patient_id],
        );
    }
    world.put(
        client,
        json!({"resourceType": "Observation", "id": "obs-shared", "status": "final", "code": {"text": "shared"},
               "subject": {"reference": "Patient/p-1"}, "performer": [{"reference": "Patient/p-2"}]}),
        &["p-1", "p-2"],
    );
    world.put(
        client,
        support::person_group(SMALL_WORLD_GROUP, &SMALL_WORLD_GROUP_MEMBERS),
        &SMALL_WORLD_GROUP_MEMBERS,
    );
    world.put(
        client,
        json!({"resourceType": "Patient", "id": "p-2", "active": false, "name": [{"family": "Renamed"}]}),
        &["p-2"],
    );
    for code in ["second", "third"] {
        world.put(client, observation("obs-1-a", "p-1", code), &["p-1"]);
    }
    world.delete(client, "Observation", "obs-3-b");
    world
}

/// Resources written so far according to `X-Progress` like `12% (1,917 resources; …)`.
fn resources_written_so_far(progress: &str) -> u64 {
    progress
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(" resources"))
        .map(|(count, _)| count.replace(',', ""))
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}

fn job_id_of(status_url: &str) -> &str {
    status_url
        .rsplit('/')
        .next()
        .expect("a status URL ends with the job id")
}

fn job_folder(data_dir: &Path, status_url: &str) -> PathBuf {
    data_dir
        .join("exports")
        .join(DEFAULT_CONTAINER)
        .join(job_id_of(status_url))
}

/// Every regular file below `directory` (none when it does not exist).
fn files_under(directory: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_export_holds_exactly(export: &Export, expected: &BTreeMap<ResourceKey, String>) {
    let exported = export.output_by_key();
    let missing: Vec<&ResourceKey> = expected
        .keys()
        .filter(|resource_key| !exported.contains_key(*resource_key))
        .collect();
    let unexpected: Vec<&ResourceKey> = exported
        .keys()
        .filter(|resource_key| !expected.contains_key(*resource_key))
        .collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "missing {missing:?}; unexpected {unexpected:?}"
    );
    for (resource_key, body) in expected {
        assert_eq!(
            &exported[resource_key], body,
            "{resource_key:?} differs from its stored body"
        );
    }
}

fn assert_transaction_time_covers(export: &Export) {
    let transaction_time = parse_instant(&export.transaction_time());
    assert!(transaction_time <= OffsetDateTime::now_utc());
    for header in export.output.iter().flat_map(|file| file.headers.iter()) {
        assert!(
            parse_instant(&header.last_updated) <= transaction_time,
            "{}/{} was updated at {} after transactionTime {transaction_time}",
            header.resource_type,
            header.id,
            header.last_updated
        );
    }
}

#[test]
fn system_export_by_get_and_post_delivers_every_stored_resource_once_with_its_stored_body() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let world = build_small_world(&app.client);
    let expected = current_bodies(&app.client, &world.every_live_resource());
    let bulk = BulkClient::new(&app.base_url);

    let (by_get, by_post) = bulk.export_by_get_and_post(
        &KickOffRequest::get("/$export"),
        &KickOffRequest::post(
            "/$export",
            parameters(&[("_outputFormat", "application/fhir+ndjson")]),
        ),
        SMALL_FILE_LIMIT,
    );

    for export in [&by_get, &by_post] {
        assert_export_holds_exactly(export, &expected);
        assert!(export.deleted.is_empty() && export.error.is_empty());
        assert_eq!(export.completion.manifest["deleted"], json!([]));
        assert_eq!(export.completion.manifest["error"], json!([]));
        assert_transaction_time_covers(export);
        let observation_files = export
            .output
            .iter()
            .filter(|file| file.type_name == "Observation")
            .count();
        assert_eq!(observation_files, 3, "12 Observations in files of 4");
    }
    assert_eq!(by_get.lines_by_type(), by_post.lines_by_type());
    assert_eq!(by_get.transaction_time(), by_post.transaction_time());
    assert!(!expected.contains_key(&key("Observation", "obs-3-b")));
    let observation_one = &by_get.output_by_key()[&key("Observation", "obs-1-a")];
    assert_eq!(resource_header(observation_one).version_id, "3");
}

#[test]
fn patient_export_by_get_and_post_delivers_exactly_the_patient_compartments() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let world = build_small_world(&app.client);
    let expected = current_bodies(&app.client, &world.in_some_patient_compartment());
    let bulk = BulkClient::new(&app.base_url);

    let (by_get, by_post) = bulk.export_by_get_and_post(
        &KickOffRequest::get("/Patient/$export?_outputFormat=ndjson"),
        &KickOffRequest::post(
            "/Patient/$export",
            parameters(&[("_outputFormat", "application/ndjson")]),
        ),
        SMALL_FILE_LIMIT,
    );
    for export in [&by_get, &by_post] {
        assert_export_holds_exactly(export, &expected);
        assert!(export.deleted.is_empty() && export.error.is_empty());
    }
    assert_eq!(by_get.lines_by_type(), by_post.lines_by_type());
    for outside in ["Organization", "Practitioner"] {
        assert!(!by_get.lines_by_type().contains_key(outside));
    }

    let one_patient = bulk.export(
        &KickOffRequest::post(
            "/Patient/$export",
            parameters(&[("patient", "Patient/p-3")]),
        ),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SMALL_FILE_LIMIT,
    );
    let expected_for_p3 = current_bodies(&app.client, &world.in_compartments_of(&["p-3"]));
    assert_export_holds_exactly(&one_patient, &expected_for_p3);
    assert_eq!(
        one_patient.output_keys(),
        BTreeSet::from([
            key("Encounter", "enc-3"),
            key("Observation", "obs-3-a"),
            key("Patient", "p-3"),
        ])
    );
}

#[test]
fn group_export_by_get_and_post_delivers_exactly_the_members_compartments() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let world = build_small_world(&app.client);
    let expected = current_bodies(
        &app.client,
        &world.in_compartments_of(&SMALL_WORLD_GROUP_MEMBERS),
    );
    let bulk = BulkClient::new(&app.base_url);
    let path = format!("/Group/{SMALL_WORLD_GROUP}/$export");

    let (by_get, by_post) = bulk.export_by_get_and_post(
        &KickOffRequest::get(&path),
        &KickOffRequest::post(&path, parameters(&[("_outputFormat", "ndjson")])),
        SMALL_FILE_LIMIT,
    );
    for export in [&by_get, &by_post] {
        assert_export_holds_exactly(export, &expected);
        assert!(export.deleted.is_empty() && export.error.is_empty());
    }
    assert_eq!(by_get.lines_by_type(), by_post.lines_by_type());
    let patients: BTreeSet<ResourceKey> = by_get
        .output_keys()
        .into_iter()
        .filter(|(resource_type, _)| resource_type == "Patient")
        .collect();
    assert_eq!(
        patients,
        SMALL_WORLD_GROUP_MEMBERS
            .iter()
            .map(|id| key("Patient", id))
            .collect()
    );

    let narrowed = bulk.export(
        &KickOffRequest::post(&path, parameters(&[("patient", "Patient/p-4")])),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SMALL_FILE_LIMIT,
    );
    assert_export_holds_exactly(
        &narrowed,
        &current_bodies(&app.client, &world.in_compartments_of(&["p-4"])),
    );
}

#[test]
fn a_resource_in_two_patients_compartments_appears_once_in_patient_and_group_exports() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    for patient_id in ["twin-a", "twin-b"] {
        put(&app.client, &patient(patient_id, "Twin"));
    }
    put(
        &app.client,
        &json!({"resourceType": "Observation", "id": "both", "status": "final", "code": {},
                "subject": {"reference": "Patient/twin-a"}, "performer": [{"reference": "Patient/twin-b"}]}),
    );
    put(
        &app.client,
        &json!({"resourceType": "Encounter", "id": "visit", "status": "finished", "class": {"code": "AMB"},
                "subject": {"reference": "Patient/twin-a"},
                "participant": [{"individual": {"reference": "Patient/twin-b"}}]}),
    );
    put(
        &app.client,
        &support::person_group("twins", &["twin-a", "twin-b"]),
    );
    let bulk = BulkClient::new(&app.base_url);
    for path in ["/Patient/$export", "/Group/twins/$export"] {
        let export = bulk.export(
            &KickOffRequest::get(path),
            Polling::Eagerly,
            Downloads::PlainOnly,
            SMALL_FILE_LIMIT,
        );
        let keys = export.output_keys();
        assert!(
            keys.contains(&key("Observation", "both")),
            "{path}: {keys:?}"
        );
        assert!(
            keys.contains(&key("Encounter", "visit")),
            "{path}: {keys:?}"
        );
        let total_lines: usize = export.output.iter().map(|file| file.lines.len()).sum();
        assert_eq!(total_lines, keys.len(), "{path} repeats a resource");
    }
}

#[test]
fn status_of_a_running_export_is_202_with_progress_and_fast_polling_is_never_throttled() {
    let app = spawn_app_with_sample(single_worker_export_settings(SAMPLE_FILE_LIMIT));
    let bulk = BulkClient::new(&app.base_url);
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));
    let file_of_running_export = format!(
        "{}/$export-file/{}/Patient-1.ndjson",
        app.base_url,
        job_id_of(&status_url)
    );
    let early_download = bulk
        .absolute
        .get_raw(&file_of_running_export, &[("Accept", NDJSON)]);
    let fast_poller = {
        let status_url = status_url.clone();
        let base_url = app.base_url.clone();
        std::thread::spawn(move || {
            let bulk = BulkClient::new(&base_url);
            let mut statuses = Vec::new();
            let deadline = Instant::now() + EXPORT_DEADLINE;
            loop {
                let reply = bulk.status(&status_url);
                if reply.status == StatusCode::ACCEPTED {
                    assert_in_progress_reply(&reply);
                    statuses.push((
                        reply.status,
                        resources_written_so_far(reply.required_header("x-progress")),
                    ));
                } else {
                    statuses.push((reply.status, 0));
                }
                if reply.status != StatusCode::ACCEPTED || Instant::now() > deadline {
                    return statuses;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let completion = bulk.poll_until_complete(&status_url, Polling::HonoringRetryAfter);
    let fast_statuses = fast_poller.join().expect("the fast poller panicked");
    assert_eq!(
        early_download.status,
        StatusCode::NOT_FOUND,
        "a file was served before its export completed"
    );

    assert!(
        !completion.progress_seen.is_empty(),
        "the export completed before its first status poll"
    );
    assert!(
        fast_statuses
            .iter()
            .all(|(status, _)| *status == StatusCode::ACCEPTED || *status == StatusCode::OK),
        "fast polling got {fast_statuses:?}"
    );
    assert_eq!(
        fast_statuses.last().map(|(status, _)| *status),
        Some(StatusCode::OK)
    );
    assert!(
        fast_statuses.len() > completion.progress_seen.len(),
        "polling every 5 ms should see more statuses than polling every Retry-After"
    );
    let progress: Vec<u64> = fast_statuses
        .iter()
        .filter(|(status, _)| *status == StatusCode::ACCEPTED)
        .map(|(_, written)| *written)
        .collect();
    assert!(
        progress.windows(2).all(|pair| pair[0] <= pair[1]),
        "X-Progress went backwards: {progress:?}"
    );

    assert_manifest_shape(
        &completion.manifest,
        &app.base_url,
        &format!("{}/$export", app.base_url),
    );
    let export = bulk.download(completion, Downloads::PlainOnly);
    assert_output_files_are_numbered_per_type(&export, SAMPLE_FILE_LIMIT);
    assert_eq!(&export.counts_by_type(), sample_counts_by_type());
    let exported = export.output_by_key();
    assert_eq!(exported.len() as u64, SAMPLE_RESOURCE_COUNT);
    for ((type_name, id), line) in &exported {
        let resource_type = ResourceType::parse(type_name).expect("an exported type");
        let stored = app
            .store
            .read_current(
                resource_type,
                &ResourceId::parse(id).expect("an exported id"),
            )
            .expect("reading the store")
            .and_then(|version| version.body)
            .unwrap_or_else(|| panic!("{type_name}/{id} is exported but not stored"));
        assert_eq!(line, &stored, "{type_name}/{id}");
    }
    let downloaded_twice = bulk.download_file(
        &export.completion.manifest["output"][0],
        Downloads::ComparingGzip,
    );
    assert_eq!(downloaded_twice.lines, export.output[0].lines);
}

#[test]
fn cancelling_a_running_export_stops_it_and_makes_its_status_and_files_404() {
    let app = spawn_app_with_sample(single_worker_export_settings(SAMPLE_FILE_LIMIT));
    let bulk = BulkClient::new(&app.base_url);
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));
    let running = bulk.status(&status_url);
    assert_eq!(
        running.status,
        StatusCode::ACCEPTED,
        "the export finished before it could be cancelled"
    );

    let cancelled = bulk.cancel(&status_url);
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{}", cancelled.text);
    if !cancelled.text.is_empty() {
        assert_eq!(cancelled.json()["resourceType"], "OperationOutcome");
    }
    bulk.status(&status_url)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[job_id_of(&status_url)]);
    let file_url = format!(
        "{}/$export-file/{}/Patient-1.ndjson",
        app.base_url,
        job_id_of(&status_url)
    );
    assert_eq!(
        bulk.absolute
            .get_raw(&file_url, &[("Accept", NDJSON)])
            .status,
        StatusCode::NOT_FOUND
    );
    let folder = job_folder(app.data_dir(), &status_url);
    assert!(
        wait_until(Duration::from_secs(10), || files_under(&folder).is_empty()),
        "files under {folder:?} still exist 10 s after the cancel: {:?}",
        files_under(&folder)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        files_under(&folder),
        Vec::<PathBuf>::new(),
        "a worker wrote files again after the cancel"
    );
    bulk.cancel(&status_url)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[]);

    let next = bulk.export(
        &KickOffRequest::get("/$export?_type=Patient"),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SAMPLE_FILE_LIMIT,
    );
    assert_eq!(
        next.counts_by_type()["Patient"],
        sample_counts_by_type()["Patient"]
    );
}

#[test]
fn cancelling_a_completed_export_makes_its_status_and_files_404_and_unknown_jobs_are_404() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    build_small_world(&app.client);
    let bulk = BulkClient::new(&app.base_url);
    let export = bulk.export(
        &KickOffRequest::get("/$export"),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SMALL_FILE_LIMIT,
    );
    let status_url = export.completion.status_url.clone();

    let cancelled = bulk.cancel(&status_url);
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{}", cancelled.text);
    bulk.status(&status_url)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[]);
    for file in export.output.iter().chain(&export.deleted) {
        let reply = bulk.absolute.get_raw(&file.url, &[("Accept", NDJSON)]);
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", file.url);
    }
    let folder = job_folder(app.data_dir(), &status_url);
    assert!(
        wait_until(Duration::from_secs(10), || files_under(&folder).is_empty()),
        "files under {folder:?} still exist after the cancel: {:?}",
        files_under(&folder)
    );
    bulk.cancel(&status_url)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[]);

    let unknown_job = format!("{}/$export-status/{}", app.base_url, "0".repeat(32));
    bulk.cancel(&unknown_job)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[]);
    bulk.status(&unknown_job)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[]);
    let malformed_job = format!("{}/$export-status/not-a-job", app.base_url);
    bulk.cancel(&malformed_job)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[]);
}

#[test]
fn cancelled_and_expired_exports_leave_no_folders_behind() {
    let app = spawn_app_with_export_settings(ExportSettings {
        retention: Duration::from_secs(2),
        ..export_settings(SMALL_FILE_LIMIT)
    });
    put(&app.client, &patient("alone", "Alone"));
    let bulk = BulkClient::new(&app.base_url);
    let mut status_urls = Vec::new();
    for _ in 0..2 {
        let export = bulk.export(
            &KickOffRequest::get("/$export"),
            Polling::Eagerly,
            Downloads::PlainOnly,
            SMALL_FILE_LIMIT,
        );
        status_urls.push(export.completion.status_url.clone());
    }
    assert_eq!(bulk.cancel(&status_urls[0]).status, StatusCode::ACCEPTED);
    for status_url in &status_urls {
        let folder = job_folder(app.data_dir(), status_url);
        assert!(
            wait_until(Duration::from_secs(10), || !folder.exists()),
            "{folder:?} is left behind after its export was removed"
        );
    }
}

struct RefusedKickOff {
    case: &'static str,
    request: KickOffRequest,
    status: StatusCode,
    fragments: Vec<String>,
}

fn refused(case: &'static str, request: KickOffRequest, fragments: &[&str]) -> RefusedKickOff {
    RefusedKickOff {
        case,
        request,
        status: StatusCode::BAD_REQUEST,
        fragments: fragments
            .iter()
            .map(|fragment| (*fragment).to_owned())
            .collect(),
    }
}

#[test]
fn every_invalid_kick_off_is_a_400_operation_outcome_naming_the_problem() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    build_small_world(&app.client);
    let bulk = BulkClient::new(&app.base_url);
    let soon = (OffsetDateTime::now_utc() + time::Duration::minutes(5))
        .format(&Rfc3339)
        .expect("formatting an instant");
    let group_path = format!("/Group/{SMALL_WORLD_GROUP}/$export");
    let get = KickOffRequest::get;
    let mut cases = vec![
        refused(
            "no Accept",
            get("/$export").with_accept(None),
            &["Accept", "application/fhir+json"],
        ),
        refused(
            "Accept without FHIR JSON",
            get("/$export").with_accept(Some("application/json")),
            &["Accept", "application/fhir+json"],
        ),
        refused(
            "no Prefer",
            get("/$export").with_prefer(&[]),
            &["Prefer", "respond-async"],
        ),
        refused(
            "Prefer without respond-async",
            get("/$export").with_prefer(&["handling=lenient"]),
            &["respond-async"],
        ),
        refused(
            "_outputFormat text/csv",
            get("/$export?_outputFormat=text%2Fcsv"),
            &["_outputFormat", "text/csv"],
        ),
        refused(
            "_outputFormat application/json",
            get("/Patient/$export?_outputFormat=application%2Fjson"),
            &["_outputFormat"],
        ),
        refused(
            "_since not an instant",
            get("/$export?_since=yesterday"),
            &["_since", "yesterday"],
        ),
        refused(
            "_since a date without time",
            get("/$export?_since=2020-01-01"),
            &["_since"],
        ),
        refused(
            "_since without a zone",
            get("/$export?_since=2020-01-01T00%3A00%3A00"),
            &["_since"],
        ),
        refused(
            "_since in the future",
            get(&format!("/$export?_since={}", encode(&soon))),
            &["_since", "future"],
        ),
        refused(
            "_until not an instant",
            get("/$export?_until=tomorrow"),
            &["_until"],
        ),
        refused(
            "_till with month 13",
            get("/Patient/$export?_till=2020-13-01T00%3A00%3A00Z"),
            &["_till"],
        ),
        refused(
            "_since after _until",
            get("/$export?_since=2021-01-01T00%3A00%3A00Z&_until=2020-01-01T00%3A00%3A00Z"),
            &["_since", "_until"],
        ),
        refused(
            "_since equal to _until",
            get("/$export?_since=2021-01-01T00%3A00%3A00Z&_until=2021-01-01T00%3A00%3A00Z"),
            &["_since", "_until"],
        ),
        refused(
            "unknown _type",
            get("/$export?_type=Patient,Nope"),
            &["_type", "Nope"],
        ),
        refused(
            "lower-case _type",
            get("/Patient/$export?_type=observation"),
            &["_type", "observation"],
        ),
        refused(
            "patient in a GET query at Patient level",
            get("/Patient/$export?patient=Patient%2Fp-1"),
            &["patient", "POST"],
        ),
        refused(
            "patient in a GET query at Group level",
            get(&format!("{group_path}?patient=Patient%2Fp-1")),
            &["patient", "POST"],
        ),
        refused(
            "patient at system level",
            KickOffRequest::post("/$export", parameters(&[("patient", "Patient/p-1")])),
            &["patient"],
        ),
        refused(
            "patient not a member of the Group",
            KickOffRequest::post(&group_path, parameters(&[("patient", "Patient/p-3")])),
            &["Patient/p-3", "member", "Group/grp-1"],
        ),
        refused(
            "patient that does not exist",
            KickOffRequest::post(
                "/Patient/$export",
                parameters(&[("patient", "Patient/nobody")]),
            ),
            &["Patient/nobody"],
        ),
        refused(
            "patient referencing another type",
            KickOffRequest::post(
                "/Patient/$export",
                parameters(&[("patient", "Observation/obs-1-a")]),
            ),
            &["patient", "Observation/obs-1-a"],
        ),
        refused(
            "_container with a path",
            get("/$export?_container=..%2Fx"),
            &["_container"],
        ),
        refused(
            "_container in upper case",
            get("/$export?_container=UPPER"),
            &["_container"],
        ),
        refused(
            "_container too short",
            get("/$export?_container=a"),
            &["_container"],
        ),
        refused(
            "_typeFilter on a type outside _type",
            get("/$export?_type=Patient&_typeFilter=Observation%3Fstatus%3Dfinal"),
            &["_typeFilter", "Observation"],
        ),
        refused(
            "_typeFilter with a result parameter, in a POST body",
            KickOffRequest::post(
                "/Patient/$export",
                parameters(&[("_typeFilter", "Observation?_sort=date")]),
            ),
            &["_sort"],
        ),
        refused(
            "_typeFilter with an unknown search parameter",
            get("/$export?_typeFilter=Observation%3Fnonsense%3D1"),
            &["nonsense"],
        ),
        refused(
            "_elements naming an element no exported type has",
            get("/$export?_type=Patient&_elements=nonsense"),
            &["_elements", "nonsense"],
        ),
        refused(
            "includeAssociatedData",
            get("/$export?includeAssociatedData=_nonsense"),
            &["includeAssociatedData"],
        ),
        refused(
            "organizeOutputBy",
            get("/Patient/$export?organizeOutputBy=Patient"),
            &["organizeOutputBy"],
        ),
        refused("unknown parameter", get("/$export?bogus=1"), &["bogus"]),
        refused(
            "repeated _since with different values",
            get("/$export?_since=2020-01-01T00%3A00%3A00Z&_since=2020-02-01T00%3A00%3A00Z"),
            &["_since", "twice"],
        ),
        refused(
            "POST body that is not Parameters",
            KickOffRequest::post("/$export", patient("x", "NotParameters")),
            &["Parameters"],
        ),
        refused(
            "allowPartialManifests not a boolean",
            get("/$export?allowPartialManifests=maybe"),
            &["allowPartialManifests"],
        ),
    ];
    cases.push(RefusedKickOff {
        case: "Group that does not exist",
        request: get("/Group/nope/$export"),
        status: StatusCode::NOT_FOUND,
        fragments: vec!["Group/nope".to_owned()],
    });

    for case in &cases {
        let reply = bulk.send_kick_off(&case.request);
        assert_eq!(
            reply.status, case.status,
            "case '{}' ({} {}): {}",
            case.case, case.request.method, case.request.path, reply.text
        );
        let fragments: Vec<&str> = case.fragments.iter().map(String::as_str).collect();
        reply.expect_operation_outcome(case.status, &fragments);
        assert_eq!(
            reply.header("content-location"),
            None,
            "case '{}'",
            case.case
        );
    }
}

#[test]
fn lenient_handling_accepts_unsupported_and_unknown_parameters_and_reports_each_in_the_error_file()
{
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let world = build_small_world(&app.client);
    let bulk = BulkClient::new(&app.base_url);
    let patients: BTreeSet<ResourceKey> = world
        .every_live_resource()
        .into_iter()
        .filter(|(resource_type, _)| resource_type == "Patient")
        .collect();
    let expected = current_bodies(&app.client, &patients);

    let in_one_header = KickOffRequest::get(
        "/$export?_type=Patient&_elements=nonsense&_typeFilter=Patient%3F_sort%3Dname&zzz=1",
    )
    .with_prefer(&["respond-async, handling=lenient"]);
    let in_two_headers = KickOffRequest::post(
        "/Patient/$export",
        parameters(&[
            ("_type", "Patient"),
            ("includeAssociatedData", "_nonsense"),
            ("_elements", "Patient.bogus"),
        ]),
    )
    .with_prefer(&["respond-async", "handling=lenient"]);

    for (request, ignored) in [
        (&in_one_header, vec!["_elements", "_typeFilter", "zzz"]),
        (&in_two_headers, vec!["includeAssociatedData", "_elements"]),
    ] {
        let export = bulk.export(
            request,
            Polling::Eagerly,
            Downloads::ComparingGzip,
            SMALL_FILE_LIMIT,
        );
        assert_export_holds_exactly(&export, &expected);
        assert_eq!(export.error.len(), 1, "{}", export.completion.manifest);
        let outcomes: Vec<Value> = export.error[0]
            .lines
            .iter()
            .map(|line| serde_json::from_str(line).expect("an error line is JSON"))
            .collect();
        assert_eq!(outcomes.len(), ignored.len(), "{outcomes:?}");
        let mut diagnostics_of_each_outcome = Vec::new();
        for outcome in &outcomes {
            assert_eq!(outcome["resourceType"], "OperationOutcome");
            let issue = &outcome["issue"][0];
            assert!(
                issue["severity"].is_string() && issue["code"].is_string(),
                "{outcome}"
            );
            diagnostics_of_each_outcome.push(issue["diagnostics"].as_str().unwrap_or_default());
        }
        for parameter in &ignored {
            assert_eq!(
                diagnostics_of_each_outcome
                    .iter()
                    .filter(|diagnostics| diagnostics.contains(parameter))
                    .count(),
                1,
                "exactly one of {diagnostics_of_each_outcome:?} names {parameter}"
            );
        }
    }

    let still_invalid = KickOffRequest::get("/$export?_since=yesterday&_elements=id")
        .with_prefer(&["respond-async, handling=lenient"]);
    bulk.send_kick_off(&still_invalid)
        .expect_operation_outcome(StatusCode::BAD_REQUEST, &["_since"]);
}

#[test]
fn repeating_type_gives_the_same_export_as_comma_joining_it() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    build_small_world(&app.client);
    let bulk = BulkClient::new(&app.base_url);
    let requests = [
        KickOffRequest::get("/$export?_type=Patient,Observation"),
        KickOffRequest::get("/$export?_type=Patient&_type=Observation"),
        KickOffRequest::get("/$export?_type=Observation&_type=Patient,Observation"),
        KickOffRequest::post(
            "/$export",
            parameters(&[("_type", "Observation"), ("_type", "Patient")]),
        ),
    ];
    let exports: Vec<Export> = requests
        .iter()
        .map(|request| {
            bulk.export(
                request,
                Polling::Eagerly,
                Downloads::PlainOnly,
                SMALL_FILE_LIMIT,
            )
        })
        .collect();
    let reference = exports[0].lines_by_type();
    assert_eq!(
        reference.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["Observation", "Patient"]
    );
    for (request, export) in requests.iter().zip(&exports).skip(1) {
        assert_eq!(export.lines_by_type(), reference, "{}", request.path);
    }
}

#[test]
fn writes_that_land_during_an_export_never_appear_in_it() {
    let app = spawn_app_with_sample(single_worker_export_settings(SAMPLE_FILE_LIMIT));
    let bulk = BulkClient::new(&app.base_url);
    let sample_patients = sample_patient_ids();
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let writer = {
        let client = app.client.clone();
        let stop = Arc::clone(&stop);
        let acknowledged = Arc::clone(&acknowledged);
        let sample_patients = sample_patients.clone();
        std::thread::spawn(move || {
            let mut written = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let subject = &sample_patients[written % sample_patients.len()];
                put(
                    &client,
                    &observation(&format!("during-{written}"), subject, "during"),
                );
                put(&client, &patient(subject, &format!("During{written}")));
                written += 1;
                acknowledged.store(written, Ordering::SeqCst);
            }
            written
        })
    };
    let mut acknowledged_while_running = 0;
    let deadline = Instant::now() + EXPORT_DEADLINE;
    let completion = loop {
        let reply = bulk.status(&status_url);
        if reply.status == StatusCode::ACCEPTED {
            acknowledged_while_running = acknowledged.load(Ordering::SeqCst);
            assert!(Instant::now() < deadline, "the export did not complete");
            std::thread::sleep(EAGER_POLL_INTERVAL);
            continue;
        }
        break bulk.poll_until_complete(&status_url, Polling::Eagerly);
    };
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("the writer panicked");
    assert!(
        acknowledged_while_running > 0,
        "no write was acknowledged while the export ran ({written} in all)"
    );

    let export = bulk.download(completion, Downloads::PlainOnly);
    assert_eq!(&export.counts_by_type(), sample_counts_by_type());
    assert_transaction_time_covers(&export);
    let exported = export.output_by_key();
    assert!(
        exported.keys().all(|(_, id)| !id.starts_with("during-")),
        "an Observation written during the export was exported"
    );
    for patient_id in &sample_patients {
        let line = &exported[&key("Patient", patient_id)];
        assert_eq!(
            line,
            &read_text(&app.client, &format!("/Patient/{patient_id}/_history/1")),
            "Patient/{patient_id} is not exported as it was at kick-off"
        );
    }
}

/// The stored body of version `version` of `reference`.
fn version_body(client: &FhirClient, reference: &str, version: u64) -> String {
    read_text(client, &format!("/{reference}/_history/{version}"))
}

fn expected_versions(
    client: &FhirClient,
    versions: &[(&str, u64)],
) -> BTreeMap<ResourceKey, String> {
    versions
        .iter()
        .map(|(reference, version)| {
            let (resource_type, id) = reference.split_once('/').expect("a Type/id reference");
            (
                key(resource_type, id),
                version_body(client, reference, *version),
            )
        })
        .collect()
}

#[test]
fn until_exports_versions_as_they_were_at_system_patient_and_group_level() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let client = &app.client;
    put(
        client,
        &json!({"resourceType": "Organization", "id": "org-u", "name": "Before"}),
    );
    put(client, &patient("u-a", "Before"));
    put(client, &patient("u-b", "Before"));
    put(client, &observation("obs-u-a", "u-a", "before"));
    put(client, &support::person_group("grp-u", &["u-a", "u-b"]));
    let until = last_updated_of(&put(client, &observation("obs-u-b", "u-b", "before")));

    put(
        client,
        &json!({"resourceType": "Organization", "id": "org-u", "name": "After"}),
    );
    put(client, &patient("u-a", "After"));
    delete(client, "Observation/obs-u-b");
    put(client, &patient("u-c", "Created after"));
    put(client, &observation("obs-u-c", "u-c", "after"));
    put(client, &support::person_group("grp-u", &["u-a", "u-c"]));

    let bulk = BulkClient::new(&app.base_url);
    let query = format!("_until={}", encode(&until));
    let in_compartments = [
        ("Patient/u-a", 1),
        ("Patient/u-b", 1),
        ("Observation/obs-u-a", 1),
        ("Observation/obs-u-b", 1),
    ];
    let mut system_expected = in_compartments.to_vec();
    system_expected.extend([("Organization/org-u", 1), ("Group/grp-u", 1)]);
    let mut patient_expected = in_compartments.to_vec();
    patient_expected.push(("Group/grp-u", 1));
    for (path, expected) in [
        (format!("/$export?{query}"), system_expected),
        (format!("/Patient/$export?{query}"), patient_expected),
        (
            format!("/Group/grp-u/$export?{query}"),
            in_compartments.to_vec(),
        ),
    ] {
        let export = bulk.export(
            &KickOffRequest::get(&path),
            Polling::Eagerly,
            Downloads::PlainOnly,
            SMALL_FILE_LIMIT,
        );
        assert_export_holds_exactly(&export, &expected_versions(client, &expected));
        assert_eq!(
            parse_instant(&export.transaction_time()),
            parse_instant(&until),
            "{path}: transactionTime"
        );
        assert!(export.deleted.is_empty(), "{path}");
    }
}

#[test]
fn since_exports_exactly_what_changed_after_the_instant_and_lists_deletions_in_deleted() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let client = &app.client;
    put(
        client,
        &json!({"resourceType": "Organization", "id": "org-s", "name": "Gone soon"}),
    );
    for index in 1..=4 {
        put(client, &patient(&format!("s-{index}"), "Before"));
        put(
            client,
            &observation(&format!("obs-s-{index}"), &format!("s-{index}"), "before"),
        );
    }
    let since = last_updated_of(&put(
        client,
        &support::person_group("grp-s", &["s-1", "s-2", "s-3"]),
    ));

    put(client, &patient("s-1", "After"));
    put(client, &observation("obs-s-5", "s-2", "new"));
    put(client, &observation("obs-s-2", "s-2", "updated"));
    delete(client, "Observation/obs-s-3");
    delete(client, "Organization/org-s");
    delete(client, "Patient/s-4");

    let bulk = BulkClient::new(&app.base_url);
    let query = format!("_since={}", encode(&since));
    let changed = expected_versions(
        client,
        &[
            ("Patient/s-1", 2),
            ("Observation/obs-s-5", 1),
            ("Observation/obs-s-2", 2),
        ],
    );
    for (path, deleted) in [
        (
            format!("/$export?{query}"),
            vec!["Observation/obs-s-3", "Organization/org-s", "Patient/s-4"],
        ),
        (
            format!("/Patient/$export?{query}"),
            vec!["Observation/obs-s-3", "Patient/s-4"],
        ),
        (
            format!("/Group/grp-s/$export?{query}"),
            vec!["Observation/obs-s-3"],
        ),
    ] {
        let export = bulk.export(
            &KickOffRequest::get(&path),
            Polling::Eagerly,
            Downloads::ComparingGzip,
            SMALL_FILE_LIMIT,
        );
        assert_export_holds_exactly(&export, &changed);
        let deleted_references = export.deleted_references();
        assert_eq!(
            deleted_references,
            deleted
                .iter()
                .map(|reference| (*reference).to_owned())
                .collect(),
            "{path}"
        );
        for (resource_type, id) in export.output_keys() {
            assert!(
                !deleted_references.contains(&format!("{resource_type}/{id}")),
                "{path}: {resource_type}/{id} is both output and deleted"
            );
        }
    }
}

#[test]
fn group_export_with_until_uses_the_membership_as_it_was_then() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let client = &app.client;
    for member in ["m-x", "m-y", "m-z"] {
        put(client, &patient(member, "Member"));
        put(
            client,
            &observation(&format!("obs-{member}"), member, "data"),
        );
    }
    let until = last_updated_of(&put(
        client,
        &support::person_group("grp-m", &["m-x", "m-y"]),
    ));
    put(client, &support::person_group("grp-m", &["m-y", "m-z"]));

    let bulk = BulkClient::new(&app.base_url);
    let keys_for = |members: &[&str]| -> BTreeSet<ResourceKey> {
        members
            .iter()
            .flat_map(|member| {
                [
                    key("Patient", member),
                    key("Observation", &format!("obs-{member}")),
                ]
            })
            .collect()
    };
    let as_it_was = bulk.export(
        &KickOffRequest::get(&format!("/Group/grp-m/$export?_until={}", encode(&until))),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SMALL_FILE_LIMIT,
    );
    assert_eq!(as_it_was.output_keys(), keys_for(&["m-x", "m-y"]));
    let as_it_is = bulk.export(
        &KickOffRequest::get("/Group/grp-m/$export"),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SMALL_FILE_LIMIT,
    );
    assert_eq!(as_it_is.output_keys(), keys_for(&["m-y", "m-z"]));

    bulk.send_kick_off(&KickOffRequest::post(
        "/Group/grp-m/$export",
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "_until", "valueInstant": until},
            {"name": "patient", "valueReference": {"reference": "Patient/m-z"}}]}),
    ))
    .expect_operation_outcome(StatusCode::BAD_REQUEST, &["Patient/m-z", "member"]);
}

/// Every file a manifest lists, read from the job's folder on disk: each has as many lines
/// as the manifest counts and each line is JSON. Returns the resources in `output` files.
fn assert_listed_files_are_whole_on_disk(
    data_dir: &Path,
    status_url: &str,
    manifest: &Value,
) -> u64 {
    let folder = job_folder(data_dir, status_url);
    let mut exported = 0;
    for kind in ["output", "deleted", "error"] {
        for item in manifest[kind].as_array().expect("a manifest list") {
            let url = item["url"].as_str().expect("a file url");
            let name = url.rsplit('/').next().expect("a file name");
            let path = folder.join(name);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("{} after SIGKILL: {error}", path.display()));
            let count = item["count"].as_u64().expect("a file count");
            assert_eq!(
                text.lines().count() as u64,
                count,
                "{} after SIGKILL holds a different number of lines than the manifest says",
                path.display()
            );
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "{} is cut short",
                path.display()
            );
            for line in text.lines() {
                serde_json::from_str::<Value>(line).unwrap_or_else(|error| {
                    panic!(
                        "{} after SIGKILL has a broken line: {error}",
                        path.display()
                    )
                });
            }
            if kind == "output" {
                exported += count;
            }
        }
    }
    exported
}

#[test]
fn a_server_killed_right_after_the_manifest_appears_leaves_every_listed_file_whole() {
    let workspace = TempDir::new().expect("creating a workspace");
    let data_dir = workspace.path().join("data");
    copy_directory(sample_store_template(), &data_dir);
    let port = free_local_port();
    let arguments = ["--max-resources-per-file", "2000"];
    let mut server = ServerProcess::start_on_port(&data_dir, port, &arguments);
    let bulk = BulkClient::new(&server.base_url);
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));
    let completion = bulk.poll_until_complete(&status_url, Polling::Eagerly);
    server.kill_hard();

    let exported =
        assert_listed_files_are_whole_on_disk(&data_dir, &status_url, &completion.manifest);
    assert_eq!(exported, SAMPLE_RESOURCE_COUNT);
    let restarted = ServerProcess::start_on_port(&data_dir, port, &arguments);
    let after_restart =
        BulkClient::new(&restarted.base_url).poll_until_complete(&status_url, Polling::Eagerly);
    assert_eq!(
        after_restart.manifest, completion.manifest,
        "the manifest changed across SIGKILL"
    );
}

/// Kicks off system exports until one is caught in progress with resources written,
/// then kills the server with SIGKILL; `None` when every attempt finished first.
fn kick_off_and_kill_mid_export(server: &mut ServerProcess) -> Option<(String, String)> {
    let bulk = BulkClient::new(&server.base_url);
    for _ in 0..3 {
        let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));
        loop {
            let reply = bulk.status(&status_url);
            match reply.status {
                StatusCode::ACCEPTED => {
                    let progress = reply.required_header("x-progress").to_owned();
                    if resources_written_so_far(&progress) > 0 {
                        server.kill_hard();
                        return Some((status_url, progress));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                StatusCode::OK => break,
                other => panic!("status {other}: {}", reply.text),
            }
        }
    }
    None
}

#[test]
fn a_system_export_killed_with_sigkill_resumes_after_restart_and_equals_an_uninterrupted_one() {
    let workspace = TempDir::new().expect("creating a workspace");
    let data_dir = workspace.path().join("data");
    copy_directory(sample_store_template(), &data_dir);
    let port = free_local_port();
    let arguments = ["--max-resources-per-file", "500", "--workers", "1"];
    let mut server = ServerProcess::start_on_port(&data_dir, port, &arguments);
    let (status_url, progress_at_kill) = match kick_off_and_kill_mid_export(&mut server) {
        Some(caught) => caught,
        None => {
            server.terminate();
            let generated = workspace.path().join("generated");
            let generate = run_fhirlog(&[
                OsStr::new("gen"),
                OsStr::new("--from"),
                sample_data_directory().as_os_str(),
                OsStr::new("--copies"),
                OsStr::new("5"),
                OsStr::new("--out"),
                generated.as_os_str(),
            ]);
            assert!(generate.status.success(), "{generate:?}");
            let load = run_fhirlog(&[
                OsStr::new("load"),
                generated.as_os_str(),
                OsStr::new("--data-dir"),
                data_dir.as_os_str(),
            ]);
            assert!(load.status.success(), "{load:?}");
            server = ServerProcess::start_on_port(&data_dir, port, &arguments);
            kick_off_and_kill_mid_export(&mut server)
                .expect("even five more copies of the sample export before a status poll")
        }
    };
    assert!(
        !progress_at_kill.starts_with("100%"),
        "killed at {progress_at_kill}"
    );

    let server = ServerProcess::restart_resuming_export(&data_dir, port, &arguments);
    let bulk = BulkClient::new(&server.base_url);
    let resumed_completion = bulk.poll_until_complete(&status_url, Polling::Eagerly);
    assert_manifest_shape(
        &resumed_completion.manifest,
        &server.base_url,
        &format!("{}/$export", server.base_url),
    );
    let resumed = bulk.download(resumed_completion, Downloads::PlainOnly);
    assert_output_files_are_numbered_per_type(&resumed, SAMPLE_FILE_LIMIT);
    let uninterrupted = bulk.export(
        &KickOffRequest::get("/$export"),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SAMPLE_FILE_LIMIT,
    );

    assert_eq!(resumed.transaction_time(), uninterrupted.transaction_time());
    assert_eq!(resumed.counts_by_type(), uninterrupted.counts_by_type());
    let resumed_lines = resumed.lines_by_type();
    let uninterrupted_lines = uninterrupted.lines_by_type();
    assert_eq!(
        resumed_lines.keys().collect::<Vec<_>>(),
        uninterrupted_lines.keys().collect::<Vec<_>>()
    );
    for (type_name, lines) in &uninterrupted_lines {
        assert!(
            &resumed_lines[type_name] == lines,
            "{type_name}: the resumed export's lines differ from the uninterrupted export's \
             ({} vs {} lines; killed at {progress_at_kill})",
            resumed_lines[type_name].len(),
            lines.len()
        );
    }
    let exported = resumed.output_by_key();
    assert!(exported.len() as u64 >= SAMPLE_RESOURCE_COUNT);
}

#[test]
fn with_max_jobs_2_a_third_kick_off_while_two_exports_run_gets_429_with_retry_after() {
    let workspace = TempDir::new().expect("creating a workspace");
    let data_dir = workspace.path().join("data");
    copy_directory(sample_store_template(), &data_dir);
    let server =
        ServerProcess::start_with_arguments(&data_dir, &["--max-jobs", "2", "--workers", "1"]);
    let bulk = BulkClient::new(&server.base_url);
    let first = bulk.kick_off(&KickOffRequest::get("/$export"));
    let second = bulk.kick_off(&KickOffRequest::get("/Patient/$export"));
    let third = bulk.send_kick_off(&KickOffRequest::get("/$export?_type=Patient"));
    for status_url in [&first, &second] {
        assert_eq!(
            bulk.status(status_url).status,
            StatusCode::ACCEPTED,
            "an export finished before the third kick-off could be refused"
        );
    }
    third.expect_operation_outcome(StatusCode::TOO_MANY_REQUESTS, &["limit is 2"]);
    let retry_after = third.required_header("retry-after");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|seconds| seconds > 0),
        "Retry-After '{retry_after}'"
    );
    assert_eq!(third.header("content-location"), None);

    for status_url in [&first, &second] {
        bulk.poll_until_complete(status_url, Polling::Eagerly);
    }
    bulk.kick_off(&KickOffRequest::get("/$export?_type=Patient"));
}

#[test]
fn simultaneous_kick_offs_never_start_more_exports_than_max_jobs() {
    const CLIENTS: usize = 6;
    let app = spawn_app_with_sample(ExportSettings {
        max_jobs: 2,
        ..single_worker_export_settings(5_000)
    });
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let kick_offs: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let base_url = app.base_url.clone();
            std::thread::spawn(move || {
                let bulk = BulkClient::new(&base_url);
                barrier.wait();
                bulk.send_kick_off(&KickOffRequest::get("/$export"))
            })
        })
        .collect();
    let replies: Vec<Reply> = kick_offs
        .into_iter()
        .map(|kick_off| kick_off.join().expect("a kick-off thread panicked"))
        .collect();
    let bulk = BulkClient::new(&app.base_url);
    let accepted: Vec<&str> = replies
        .iter()
        .filter(|reply| reply.status == StatusCode::ACCEPTED)
        .map(|reply| reply.required_header("content-location"))
        .collect();
    let still_running = accepted
        .iter()
        .filter(|status_url| bulk.status(status_url).status == StatusCode::ACCEPTED)
        .count();
    assert!(
        replies
            .iter()
            .all(|reply| reply.status == StatusCode::ACCEPTED
                || reply.status == StatusCode::TOO_MANY_REQUESTS),
        "{:?}",
        replies.iter().map(|reply| reply.status).collect::<Vec<_>>()
    );
    assert!(
        accepted.len() <= 2,
        "{} of {CLIENTS} simultaneous kick-offs were accepted with --max-jobs 2 \
         ({still_running} of them still running)",
        accepted.len()
    );
    assert!(
        !accepted.is_empty(),
        "none of {CLIENTS} simultaneous kick-offs was accepted with --max-jobs 2: {:?}",
        replies
            .iter()
            .map(|reply| (reply.status, reply.text.as_str()))
            .collect::<Vec<_>>()
    );
}

#[derive(Debug, Clone)]
struct AcknowledgedWrite {
    resource_type: &'static str,
    id: String,
    subject: String,
    version: String,
    last_updated: OffsetDateTime,
}

#[test]
fn four_concurrent_exports_with_concurrent_writes_all_complete_and_are_each_consistent() {
    let app = spawn_app_with_sample(ExportSettings {
        max_jobs: 8,
        ..export_settings(2_000)
    });
    let sample_patients = sample_patient_ids();
    let members: Vec<&str> = sample_patients
        .iter()
        .take(10)
        .map(String::as_str)
        .collect();
    put(&app.client, &support::person_group("concurrent", &members));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::<AcknowledgedWrite>::new()));
    let writer = {
        let client = app.client.clone();
        let stop = Arc::clone(&stop);
        let writes = Arc::clone(&writes);
        let sample_patients = sample_patients.clone();
        std::thread::spawn(move || {
            let mut index = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let subject = sample_patients[index % sample_patients.len()].clone();
                let id = format!("concurrent-{index}");
                let stored = put(&client, &observation(&id, &subject, "concurrent"));
                let updated = put(&client, &patient(&subject, &format!("Concurrent{index}")));
                let mut log = writes.lock().expect("the write log");
                for (resource_type, id, stored) in [
                    ("Observation", id, stored),
                    ("Patient", subject.clone(), updated),
                ] {
                    log.push(AcknowledgedWrite {
                        resource_type,
                        id,
                        subject: subject.clone(),
                        version: stored["meta"]["versionId"]
                            .as_str()
                            .expect("a versionId")
                            .to_owned(),
                        last_updated: parse_instant(&last_updated_of(&stored)),
                    });
                }
                index += 1;
            }
        })
    };
    assert!(wait_until(Duration::from_secs(30), || {
        writes.lock().expect("the write log").len() >= 10
    }));

    let bulk = BulkClient::new(&app.base_url);
    let requests = [
        (KickOffRequest::get("/$export"), None),
        (
            KickOffRequest::get("/Patient/$export?_type=Patient,Observation"),
            None,
        ),
        (
            KickOffRequest::get("/Group/concurrent/$export"),
            Some(members.clone()),
        ),
        (
            KickOffRequest::get("/$export?_type=Patient,Observation,Encounter"),
            None,
        ),
    ];
    let mut status_urls = Vec::new();
    for (request, _) in &requests {
        status_urls.push(bulk.kick_off(request));
        std::thread::sleep(Duration::from_millis(30));
    }
    let completions: Vec<Completion> = status_urls
        .iter()
        .map(|status_url| bulk.poll_until_complete(status_url, Polling::Eagerly))
        .collect();
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("the writer panicked");
    let writes = writes.lock().expect("the write log").clone();

    for ((request, scope), completion) in requests.iter().zip(completions) {
        assert_manifest_shape(
            &completion.manifest,
            &app.base_url,
            &request.request_url(&app.base_url),
        );
        let export = bulk.download(completion, Downloads::PlainOnly);
        assert_output_files_are_numbered_per_type(&export, 2_000);
        assert_transaction_time_covers(&export);
        let transaction_time = parse_instant(&export.transaction_time());
        let exported = export.output_by_key();
        let mut expected_versions: BTreeMap<ResourceKey, String> = BTreeMap::new();
        for write in writes.iter().filter(|write| {
            write.last_updated <= transaction_time
                && scope
                    .as_ref()
                    .is_none_or(|members| members.contains(&write.subject.as_str()))
        }) {
            expected_versions.insert(key(write.resource_type, &write.id), write.version.clone());
        }
        let sample_version = "1".to_owned();
        for write in writes.iter().filter(|write| {
            scope
                .as_ref()
                .is_none_or(|members| members.contains(&write.subject.as_str()))
        }) {
            let resource_key = key(write.resource_type, &write.id);
            let exported_version = exported
                .get(&resource_key)
                .map(|line| resource_header(line).version_id);
            let expected_version = match expected_versions.get(&resource_key) {
                Some(version) => Some(version),
                None if write.resource_type == "Patient" => Some(&sample_version),
                None => None,
            };
            assert_eq!(
                exported_version.as_ref(),
                expected_version,
                "{}: {resource_key:?} is not exported at its version as of transactionTime",
                request.path
            );
        }
        if request.path == "/$export" {
            let created_before = expected_versions
                .keys()
                .filter(|(resource_type, _)| resource_type == "Observation")
                .count() as u64;
            assert_eq!(
                exported.len() as u64,
                SAMPLE_RESOURCE_COUNT + 1 + created_before
            );
        }
    }
}

#[test]
fn with_retention_of_2s_a_completed_exports_status_and_files_disappear_within_seconds() {
    let workspace = TempDir::new().expect("creating a workspace");
    let data_dir = workspace.path().join("data");
    let server = ServerProcess::start_with_arguments(&data_dir, &["--retention", "2s"]);
    build_small_world(&server.client);
    let bulk = BulkClient::new(&server.base_url);
    let kicked_off_at = OffsetDateTime::now_utc();
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));
    let completion = bulk.poll_until_complete(&status_url, Polling::Eagerly);
    let status = bulk.status(&status_url);
    assert_eq!(status.status, StatusCode::OK);
    let expires = parse_http_date(status.required_header("expires"));
    let now = OffsetDateTime::now_utc();
    assert!(
        expires <= now + time::Duration::seconds(3),
        "Expires {expires} is not about 2 s after completion ({now})"
    );
    let http_date_resolution = time::Duration::seconds(1);
    assert!(
        expires + http_date_resolution >= kicked_off_at + time::Duration::seconds(2),
        "Expires {expires} is less than the 2 s retention after the kick-off ({kicked_off_at})"
    );
    let export = bulk.download(completion, Downloads::PlainOnly);
    let folder = job_folder(&data_dir, &status_url);
    assert!(!files_under(&folder).is_empty());

    assert!(
        wait_until(Duration::from_secs(10), || bulk.status(&status_url).status
            == StatusCode::NOT_FOUND),
        "the export was still listed 10 s after completing with --retention 2s"
    );
    let removed_by = OffsetDateTime::now_utc();
    assert!(
        removed_by >= expires,
        "the export was gone at {removed_by}, before its Expires {expires}"
    );
    bulk.status(&status_url)
        .expect_operation_outcome(StatusCode::NOT_FOUND, &[]);
    for file in &export.output {
        assert_eq!(
            bulk.absolute
                .get_raw(&file.url, &[("Accept", NDJSON)])
                .status,
            StatusCode::NOT_FOUND,
            "{}",
            file.url
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || files_under(&folder).is_empty()),
        "files under {folder:?} are still on disk: {:?}",
        files_under(&folder)
    );
}

#[test]
fn group_export_follows_nested_groups_and_skips_inactive_members() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let client = &app.client;
    for member in ["n-1", "n-2", "n-3", "n-4"] {
        put(client, &patient(member, "Nested"));
        put(
            client,
            &observation(&format!("obs-{member}"), member, "data"),
        );
    }
    put(client, &support::person_group("inner", &["n-1", "n-2"]));
    put(
        client,
        &json!({"resourceType": "Group", "id": "outer", "type": "person", "actual": true, "member": [
            {"entity": {"reference": "Group/inner"}},
            {"entity": {"reference": "Patient/n-3"}},
            {"entity": {"reference": "Patient/n-4"}, "inactive": true}]}),
    );
    let bulk = BulkClient::new(&app.base_url);
    let export = bulk.export(
        &KickOffRequest::get("/Group/outer/$export"),
        Polling::Eagerly,
        Downloads::PlainOnly,
        SMALL_FILE_LIMIT,
    );
    let expected: BTreeSet<ResourceKey> = ["n-1", "n-2", "n-3"]
        .iter()
        .flat_map(|member| {
            [
                key("Patient", member),
                key("Observation", &format!("obs-{member}")),
            ]
        })
        .collect();
    assert_eq!(export.output_keys(), expected);
}

fn assert_export_completes(bulk: &BulkClient, status_url: &str) {
    let deadline = Instant::now() + EXPORT_DEADLINE;
    loop {
        let reply = bulk.status(status_url);
        match reply.status {
            StatusCode::ACCEPTED if Instant::now() < deadline => {
                std::thread::sleep(EAGER_POLL_INTERVAL);
            }
            StatusCode::OK => return,
            other => panic!("{status_url} ended with {other}: {}", reply.text),
        }
    }
}

/// `fhirlog serve` exporting to `destination` with `--job-timeout 2s` and a destination
/// timeout long enough that only the watchdog can end a job, over the small world.
fn serve_small_world_on_fake_s3(
    destination: &SwitchableS3,
    extra_arguments: &[&str],
) -> (TempDir, ServerProcess) {
    let workspace = TempDir::new().expect("creating a workspace");
    let storage_url = destination.storage_url();
    let mut arguments = vec![
        "--storage",
        storage_url.as_str(),
        "--job-timeout",
        "2s",
        "--destination-timeout",
        "60s",
    ];
    arguments.extend_from_slice(extra_arguments);
    let server = ServerProcess::start_with_environment(
        &workspace.path().join("data"),
        &arguments,
        &fake_s3::storage_environment(),
    );
    build_small_world(&server.client);
    (workspace, server)
}

#[test]
fn an_export_whose_destination_stops_answering_is_failed_by_job_timeout_for_making_no_progress() {
    let destination = SwitchableS3::start();
    let job_timeout = Duration::from_secs(2);
    let (_workspace, server) = serve_small_world_on_fake_s3(&destination, &[]);
    destination.die();
    let bulk = BulkClient::new(&server.base_url);
    let kicked_off_at = Instant::now();
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));

    let stall_bound = Duration::from_secs(25);
    let mut last_reply = None;
    let ended = wait_until(stall_bound, || {
        let reply = bulk.status(&status_url);
        let ended = reply.status != StatusCode::ACCEPTED;
        last_reply = Some(reply);
        ended
    });
    let ended_after = kicked_off_at.elapsed();
    let last_reply = last_reply.expect("at least one status poll");
    assert!(
        ended,
        "the stalled export was still in progress {stall_bound:?} after kick-off with \
         --job-timeout 2s: {}",
        last_reply.text
    );
    last_reply.expect_operation_outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        &["made no progress", "the limit is 2.0s"],
    );
    assert_eq!(
        last_reply.json()["issue"][0]["code"],
        "timeout",
        "{}",
        last_reply.text
    );
    assert!(
        ended_after >= job_timeout,
        "the export failed {ended_after:?} after kick-off, before --job-timeout 2s could pass"
    );
}

#[test]
fn an_export_to_a_slow_destination_that_keeps_making_progress_outlives_a_shorter_job_timeout() {
    let destination = SwitchableS3::start();
    let job_timeout = Duration::from_secs(2);
    let (_workspace, server) = serve_small_world_on_fake_s3(
        &destination,
        &["--workers", "1", "--max-resources-per-file", "1"],
    );
    let answer_delay = Duration::from_millis(100);
    destination.answer_after(answer_delay);
    let bulk = BulkClient::new(&server.base_url);
    let kicked_off_at = Instant::now();
    let status_url = bulk.kick_off(&KickOffRequest::get("/$export"));

    let (finished, finished_after) = bulk.poll_until_finished(&status_url, EXPORT_DEADLINE);
    assert_eq!(
        finished.status,
        StatusCode::OK,
        "an export making progress every {answer_delay:?} was stopped: {}\nserver log:\n{}",
        finished.text,
        server.log()
    );
    assert!(
        kicked_off_at.elapsed() > job_timeout,
        "the export completed in {finished_after:?}, within --job-timeout 2s, so it proves \
         nothing about outliving it"
    );
}

#[test]
fn exports_that_keep_making_progress_outlive_a_job_timeout_shorter_than_the_export() {
    let job_timeout = Duration::from_millis(1500);
    let app = spawn_app_with_sample(ExportSettings {
        job_timeout,
        ..single_worker_export_settings(SAMPLE_FILE_LIMIT)
    });
    let bulk = BulkClient::new(&app.base_url);
    for path in ["/$export", "/Patient/$export"] {
        let started = Instant::now();
        assert_export_completes(&bulk, &bulk.kick_off(&KickOffRequest::get(path)));
        if started.elapsed() <= job_timeout {
            println!(
                "note: {path} took {:?}, no longer than the {job_timeout:?} timeout",
                started.elapsed()
            );
        }
    }
}

#[test]
fn an_export_queued_behind_another_is_not_failed_by_job_timeout_while_it_waits() {
    let app = spawn_app_with_sample(ExportSettings {
        job_timeout: Duration::from_millis(1500),
        ..single_worker_export_settings(SAMPLE_FILE_LIMIT)
    });
    let bulk = BulkClient::new(&app.base_url);
    let running = bulk.kick_off(&KickOffRequest::get("/$export"));
    let queued = bulk.kick_off(&KickOffRequest::get("/$export?_type=Patient"));
    assert_export_completes(&bulk, &running);
    assert_export_completes(&bulk, &queued);
}

#[test]
fn a_group_export_collecting_patients_is_not_failed_by_job_timeout() {
    let app = spawn_app_with_sample(ExportSettings {
        job_timeout: Duration::from_millis(1500),
        ..single_worker_export_settings(SAMPLE_FILE_LIMIT)
    });
    let members = sample_patient_ids();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    put(&app.client, &support::person_group("everyone", &members));
    let bulk = BulkClient::new(&app.base_url);
    assert_export_completes(
        &bulk,
        &bulk.kick_off(&KickOffRequest::get("/Group/everyone/$export")),
    );
}

#[test]
fn capability_statement_declares_export_at_system_patient_and_group_level() {
    let app = spawn_app_with_export_settings(export_settings(SMALL_FILE_LIMIT));
    let statement = app.client.get("/metadata").expect_json(StatusCode::OK);
    assert!(
        statement["instantiates"]
            .as_array()
            .is_some_and(|canonicals| canonicals.contains(&json!(BULK_DATA_CAPABILITY))),
        "{}",
        statement["instantiates"]
    );
    let rest = &statement["rest"][0];
    let operations_named_export = |operations: &Value| -> Vec<String> {
        operations
            .as_array()
            .into_iter()
            .flatten()
            .filter(|operation| operation["name"] == "export")
            .map(|operation| {
                operation["definition"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(
        operations_named_export(&rest["operation"]),
        vec![EXPORT_DEFINITION]
    );
    for (resource_type, definition) in [
        ("Patient", PATIENT_EXPORT_DEFINITION),
        ("Group", GROUP_EXPORT_DEFINITION),
    ] {
        let resource = rest["resource"]
            .as_array()
            .expect("rest.resource")
            .iter()
            .find(|resource| resource["type"] == resource_type)
            .unwrap_or_else(|| panic!("no rest.resource for {resource_type}"));
        assert_eq!(
            operations_named_export(&resource["operation"]),
            vec![definition],
            "{resource_type}"
        );
    }
}

#[test]
fn inferno_like_checks_report_no_failures_against_the_sample_with_a_group() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared")
        .join("tools")
        .join("inferno_like_checks.py");
    if !script.is_file() {
        println!("skipped: {script:?} is missing");
        return;
    }
    if !Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        println!("skipped: python3 is not available");
        return;
    }
    let app = spawn_app_with_sample(export_settings(5_000));
    let members: Vec<String> = sample_patient_ids().into_iter().take(5).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    put(&app.client, &support::person_group("inferno", &members));

    let output = Command::new("python3")
        .arg(&script)
        .arg(&app.base_url)
        .args([
            "--group",
            "inferno",
            "--validator",
            "none",
            "--timeout",
            "60",
        ])
        .output()
        .expect("running inferno_like_checks.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last_line = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    assert!(
        last_line.contains(" 0 failed"),
        "inferno_like_checks.py: {last_line}\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{stdout}");
}
