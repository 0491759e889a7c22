use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::job::FileKind;
use super::*;
use crate::fhir::canonical::{DEFAULT_MAX_JSON_DEPTH, ParsedResource};
use crate::fhir::{Instant, LocalBase, ResourceId, ResourceType};
use crate::sink::MemoryDestination;
use crate::store::{PreparedResource, Store, StoreOptions, UnchangedContent, WriteOperation};

struct Harness {
    _directory: tempfile::TempDir,
    store: Store,
    runtime: tokio::runtime::Runtime,
    destination: Arc<MemoryDestination>,
}

impl Harness {
    fn new() -> Harness {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Harness {
            _directory: directory,
            store,
            runtime,
            destination: Arc::new(MemoryDestination::new(true)),
        }
    }

    fn engine(&self, settings: ExportSettings) -> ExportEngine {
        ExportEngine::start(
            self.store.clone(),
            self.destination.clone(),
            settings,
            self.runtime.handle().clone(),
        )
        .unwrap()
    }

    fn put(&self, text: &str) -> Instant {
        let parsed = ParsedResource::parse_bytes(text.as_bytes(), DEFAULT_MAX_JSON_DEPTH).unwrap();
        let id = parsed.id.clone().unwrap();
        let operation = WriteOperation::Update {
            resource: PreparedResource::new(
                parsed.resource_type,
                id,
                parsed.json,
                &LocalBase::relative_only(),
            ),
            expected_version: None,
            unchanged: UnchangedContent::NewVersion,
        };
        match &self.store.commit(vec![operation]).unwrap()[0] {
            crate::store::WriteOutcome::Created { version }
            | crate::store::WriteOutcome::Updated { version } => version.last_updated,
            other => panic!("{other:?}"),
        }
    }

    /// Writes `texts` in one commit.
    fn put_all(&self, texts: &[String]) {
        let operations = texts
            .iter()
            .map(|text| {
                let parsed =
                    ParsedResource::parse_bytes(text.as_bytes(), DEFAULT_MAX_JSON_DEPTH).unwrap();
                WriteOperation::Update {
                    resource: PreparedResource::new(
                        parsed.resource_type,
                        parsed.id.clone().unwrap(),
                        parsed.json,
                        &LocalBase::relative_only(),
                    ),
                    expected_version: None,
                    unchanged: UnchangedContent::NewVersion,
                }
            })
            .collect();
        self.store.commit(operations).unwrap();
    }

    fn delete(&self, type_name: &str, id: &str) -> Instant {
        let operation = WriteOperation::Delete {
            resource_type: ResourceType::parse(type_name).unwrap(),
            id: ResourceId::parse(id).unwrap(),
            expected_version: None,
        };
        match &self.store.commit(vec![operation]).unwrap()[0] {
            crate::store::WriteOutcome::Deleted { version } => version.last_updated,
            other => panic!("{other:?}"),
        }
    }

    /// Every file of a completed job: kind → type → lines, in manifest order.
    fn run(
        &self,
        engine: &ExportEngine,
        request: ExportRequest,
    ) -> (Box<job::JobRecord>, BTreeMap<String, Vec<String>>) {
        let job_id = engine
            .submit(request, "http://test/fhir/$export".to_owned())
            .unwrap();
        let JobStatus::Completed { record, .. } = engine.wait(&job_id, |_| {}).unwrap() else {
            panic!("job did not complete");
        };
        let mut contents = BTreeMap::new();
        for file in &record.files {
            let lines = self.file_lines(engine, &job_id, &file.name);
            assert_eq!(lines.len() as u64, file.count, "{}", file.name);
            contents.insert(file.name.clone(), lines);
        }
        (record, contents)
    }

    /// Every file of a completed job, by name, with its lines.
    fn contents_of(
        &self,
        engine: &ExportEngine,
        record: &job::JobRecord,
    ) -> BTreeMap<String, Vec<String>> {
        record
            .files
            .iter()
            .map(|file| {
                let lines = self.file_lines(engine, &record.id, &file.name);
                (file.name.clone(), lines)
            })
            .collect()
    }

    /// Submits `request` on an engine that shuts down as soon as the job's progress meets
    /// `stop_when`; the job stays saved, to resume on the next engine.
    fn submit_and_shut_down_when(
        &self,
        settings: ExportSettings,
        request: ExportRequest,
        stop_when: impl Fn(&JobProgress) -> bool,
    ) -> String {
        let engine = self.engine(settings);
        let job_id = engine.submit(request, "x".to_owned()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match engine.status(&job_id).unwrap() {
                JobStatus::InProgress { progress } if stop_when(&progress) => return job_id,
                JobStatus::InProgress { .. } => {}
                other => panic!("the job ended before it could be interrupted: {other:?}"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the job made no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The job's record as saved in the store.
    fn saved_record(&self, job_id: &str) -> job::JobRecord {
        job::JobRecord::load_all(&self.store)
            .unwrap()
            .into_iter()
            .find(|record| record.id == job_id)
            .unwrap()
    }

    /// Resumes the saved job on a new engine and returns its files once it completes.
    fn resume_to_completion(
        &self,
        settings: ExportSettings,
        job_id: &str,
    ) -> BTreeMap<String, Vec<String>> {
        let engine = self.engine(settings);
        let JobStatus::Completed { record, .. } = engine.wait(job_id, |_| {}).unwrap() else {
            panic!("the resumed job did not complete")
        };
        self.contents_of(&engine, &record)
    }

    /// The lines of a completed job's file, read through the engine as a download would.
    fn file_lines(&self, engine: &ExportEngine, job_id: &str, file_name: &str) -> Vec<String> {
        let (files, object) = engine.file(job_id, file_name).unwrap();
        let bytes = self.runtime.block_on(files.get_bytes(&object)).unwrap();
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The error a system export kick-off is refused with.
fn refused_system_export(engine: &ExportEngine) -> ExportError {
    engine
        .submit(
            ExportRequest::everything_at(ExportLevel::System),
            "x".to_owned(),
        )
        .unwrap_err()
}

fn error_kind<T>(result: Result<T, ExportError>) -> Option<ExportErrorKind> {
    result.err().map(|error| error.kind())
}

fn ids_in(contents: &BTreeMap<String, Vec<String>>, prefix: &str) -> BTreeSet<String> {
    contents
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .flat_map(|(_, lines)| lines.iter())
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn small_settings(max_resources_per_file: u64) -> ExportSettings {
    ExportSettings {
        workers: 2,
        max_resources_per_file,
        job_timeout: Duration::from_secs(60),
        max_jobs: 8,
        retention: Duration::from_secs(3600),
        destination_timeout: Duration::from_secs(60),
        ..ExportSettings::default()
    }
}

fn observation(id: &str, patients: &[&str]) -> String {
    let performers: Vec<String> = patients[1..]
        .iter()
        .map(|patient| format!(r#"{{"reference":"Patient/{patient}"}}"#))
        .collect();
    format!(
        r#"{{"resourceType":"Observation","id":"{id}","status":"final","code":{{}},"subject":{{"reference":"Patient/{}"}},"performer":[{}]}}"#,
        patients[0],
        performers.join(",")
    )
}

#[test]
fn system_export_writes_numbered_parts_of_current_versions() {
    let harness = Harness::new();
    for index in 0..7 {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#));
    }
    harness.put(r#"{"resourceType":"Patient","id":"p0","active":true}"#);
    harness.delete("Patient", "p6");
    harness.put(r#"{"resourceType":"Organization","id":"org"}"#);
    let engine = harness.engine(small_settings(3));
    let (record, contents) =
        harness.run(&engine, ExportRequest::everything_at(ExportLevel::System));
    let names: Vec<&str> = record.files.iter().map(|file| file.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "Organization-1.ndjson",
            "Patient-1.ndjson",
            "Patient-2.ndjson"
        ]
    );
    assert_eq!(ids_in(&contents, "Patient-").len(), 6);
    assert!(!ids_in(&contents, "Patient-").contains("p6"));
    let patient_zero = contents
        .values()
        .flatten()
        .find(|line| line.contains(r#""id":"p0""#))
        .unwrap();
    assert!(
        patient_zero.contains(r#""versionId":"2""#) && patient_zero.contains(r#""active":true"#)
    );
    let stored = harness
        .store
        .read_current(ResourceType::PATIENT, &ResourceId::parse("p0").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(patient_zero, &stored.body.unwrap());
}

#[test]
fn until_exports_the_store_as_it_was_and_since_reports_changes_and_deletes() {
    let harness = Harness::new();
    harness.put(r#"{"resourceType":"Patient","id":"a","gender":"male"}"#);
    harness.put(r#"{"resourceType":"Patient","id":"b"}"#);
    let between = harness.put(r#"{"resourceType":"Patient","id":"c"}"#);
    std::thread::sleep(Duration::from_millis(2));
    harness.put(r#"{"resourceType":"Patient","id":"a","gender":"female"}"#);
    harness.delete("Patient", "b");
    harness.put(r#"{"resourceType":"Patient","id":"d"}"#);
    let engine = harness.engine(small_settings(100));

    let mut as_it_was = ExportRequest::everything_at(ExportLevel::System);
    as_it_was.until = Some(between);
    let (record, contents) = harness.run(&engine, as_it_was);
    assert_eq!(record.transaction_time, between);
    assert_eq!(
        ids_in(&contents, "Patient-"),
        BTreeSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()])
    );
    assert!(
        contents["Patient-1.ndjson"]
            .iter()
            .any(|line| line.contains("male") && !line.contains("female"))
    );

    let mut changes = ExportRequest::everything_at(ExportLevel::System);
    changes.since = Some(between);
    let (_, contents) = harness.run(&engine, changes);
    assert_eq!(
        ids_in(&contents, "Patient-"),
        BTreeSet::from(["a".to_owned(), "d".to_owned()])
    );
    let deleted: Vec<Value> = contents["deleted-1.ndjson"]
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["entry"][0]["request"]["url"], "Patient/b");
    assert_eq!(deleted[0]["entry"][0]["request"]["method"], "DELETE");
}

#[test]
fn writes_after_kick_off_are_not_exported() {
    let harness = Harness::new();
    for index in 0..50 {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#));
    }
    let engine = harness.engine(small_settings(5));
    let job_id = engine
        .submit(
            ExportRequest::everything_at(ExportLevel::System),
            "x".to_owned(),
        )
        .unwrap();
    for index in 50..80 {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#));
    }
    harness.put(r#"{"resourceType":"Patient","id":"p1","active":true}"#);
    let JobStatus::Completed { record, .. } = engine.wait(&job_id, |_| {}).unwrap() else {
        panic!()
    };
    assert_eq!(record.files.iter().map(|file| file.count).sum::<u64>(), 50);
    let (files, object) = engine.file(&job_id, "Patient-1.ndjson").unwrap();
    let first = harness.runtime.block_on(files.get_bytes(&object)).unwrap();
    assert!(
        String::from_utf8(first.to_vec())
            .unwrap()
            .contains(r#""id":"p1","meta":{"versionId":"1""#)
    );
}

#[test]
fn patient_and_group_exports_cover_compartments_once() {
    let harness = Harness::new();
    for patient in ["p1", "p2", "p3"] {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"{patient}"}}"#));
    }
    harness.put(&observation("shared", &["p1", "p2"]));
    harness.put(&observation("only-p3", &["p3"]));
    harness.put(r#"{"resourceType":"Practitioner","id":"doc"}"#);
    harness.put(
        r#"{"resourceType":"Group","id":"inner","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p2"}}]}"#,
    );
    harness.put(
        r#"{"resourceType":"Group","id":"outer","type":"person","actual":true,"member":[
            {"entity":{"reference":"Patient/p1"}},{"entity":{"reference":"Group/inner"}},
            {"entity":{"reference":"Patient/p3"},"inactive":true}]}"#,
    );
    let engine = harness.engine(small_settings(100));

    let (_, everyone) = harness.run(
        &engine,
        ExportRequest::everything_at(ExportLevel::AllPatients),
    );
    assert_eq!(ids_in(&everyone, "Patient-").len(), 3);
    assert_eq!(
        ids_in(&everyone, "Observation-"),
        BTreeSet::from(["shared".to_owned(), "only-p3".to_owned()])
    );
    assert!(!everyone.keys().any(|name| name.starts_with("Practitioner")));
    assert_eq!(
        ids_in(&everyone, "Group-"),
        BTreeSet::from(["inner".to_owned(), "outer".to_owned()])
    );

    let (_, group) = harness.run(
        &engine,
        ExportRequest::everything_at(ExportLevel::Group(ResourceId::parse("outer").unwrap())),
    );
    assert_eq!(
        ids_in(&group, "Patient-"),
        BTreeSet::from(["p1".to_owned(), "p2".to_owned()])
    );
    assert_eq!(
        group["Observation-1.ndjson"].len(),
        1,
        "the shared observation appears once"
    );
    assert!(!group.keys().any(|name| name.starts_with("Group")));

    let mut narrowed =
        ExportRequest::everything_at(ExportLevel::Group(ResourceId::parse("outer").unwrap()));
    narrowed.patients = vec![ResourceId::parse("p2").unwrap()];
    let (_, narrowed) = harness.run(&engine, narrowed);
    assert_eq!(
        ids_in(&narrowed, "Patient-"),
        BTreeSet::from(["p2".to_owned()])
    );
    assert_eq!(
        ids_in(&narrowed, "Observation-"),
        BTreeSet::from(["shared".to_owned()])
    );

    let missing = engine.submit(
        ExportRequest::everything_at(ExportLevel::Group(ResourceId::parse("nope").unwrap())),
        "x".to_owned(),
    );
    assert_eq!(error_kind(missing), Some(ExportErrorKind::NotFound));
    let mut outsider =
        ExportRequest::everything_at(ExportLevel::Group(ResourceId::parse("outer").unwrap()));
    outsider.patients = vec![ResourceId::parse("p3").unwrap()];
    assert_eq!(
        error_kind(engine.submit(outsider, "x".to_owned())),
        Some(ExportErrorKind::InvalidRequest)
    );
}

#[test]
fn group_membership_is_read_as_of_the_snapshot() {
    let harness = Harness::new();
    harness.put(r#"{"resourceType":"Patient","id":"p1"}"#);
    harness.put(r#"{"resourceType":"Patient","id":"p2"}"#);
    let before = harness.put(r#"{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p1"}}]}"#);
    harness.put(r#"{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p2"}}]}"#);
    let engine = harness.engine(small_settings(100));
    let mut then =
        ExportRequest::everything_at(ExportLevel::Group(ResourceId::parse("g").unwrap()));
    then.until = Some(before);
    let (_, contents) = harness.run(&engine, then);
    assert_eq!(
        ids_in(&contents, "Patient-"),
        BTreeSet::from(["p1".to_owned()])
    );
    let (_, now) = harness.run(
        &engine,
        ExportRequest::everything_at(ExportLevel::Group(ResourceId::parse("g").unwrap())),
    );
    assert_eq!(ids_in(&now, "Patient-"), BTreeSet::from(["p2".to_owned()]));
}

#[test]
fn cancel_removes_the_job_and_its_files() {
    let harness = Harness::new();
    for index in 0..200 {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#));
    }
    let engine = harness.engine(small_settings(10));
    let (record, _) = harness.run(&engine, ExportRequest::everything_at(ExportLevel::System));
    engine.cancel(&record.id).unwrap();
    assert_eq!(
        error_kind(engine.status(&record.id)),
        Some(ExportErrorKind::NotFound)
    );
    assert_eq!(
        error_kind(engine.cancel(&record.id)),
        Some(ExportErrorKind::NotFound)
    );
    let container = crate::sink::ContainerName::default_container();
    let files = crate::sink::ContainerStore::new(
        container.clone(),
        crate::sink::Destination::open_container(
            harness.destination.as_ref(),
            &container,
            harness.runtime.handle(),
        )
        .unwrap(),
        harness.runtime.handle().clone(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !files.list_blocking(&record.id).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "files were not deleted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_job_interrupted_by_shutdown_resumes_to_the_same_output() {
    let harness = Harness::new();
    for index in 0..3000 {
        harness.put(&format!(
            r#"{{"resourceType":"Patient","id":"p{index:05}"}}"#
        ));
    }
    let uninterrupted = {
        let engine = harness.engine(small_settings(7));
        harness
            .run(&engine, ExportRequest::everything_at(ExportLevel::System))
            .1
    };
    let job_id = harness.submit_and_shut_down_when(
        small_settings(7),
        ExportRequest::everything_at(ExportLevel::System),
        |progress| {
            matches!(progress, JobProgress::Exporting { resources_exported, .. } if *resources_exported >= 70)
        },
    );
    let interrupted_unit = job::UnitCheckpoint::load(&harness.store, &job_id, 0).unwrap();
    assert!(
        !interrupted_unit.done && !interrupted_unit.output.parts.is_empty(),
        "the job was not stopped in the middle of its unit: {interrupted_unit:?}"
    );
    let resumed = harness.resume_to_completion(small_settings(7), &job_id);
    assert_eq!(resumed, uninterrupted);
}

#[test]
fn a_referenced_export_interrupted_in_its_first_pass_keeps_what_its_written_parts_reference() {
    let harness = Harness::new();
    let encounters = 6_000;
    let mut texts = vec![r#"{"resourceType":"Patient","id":"p1"}"#.to_owned()];
    for index in 0..encounters {
        texts.push(format!(
            r#"{{"resourceType":"Practitioner","id":"pr{index:05}"}}"#
        ));
        texts.push(format!(
            r#"{{"resourceType":"Encounter","id":"e{index:05}","subject":{{"reference":"Patient/p1"}},"participant":[{{"individual":{{"reference":"Practitioner/pr{index:05}"}}}}]}}"#
        ));
    }
    harness.put_all(&texts);
    let request = || {
        ExportRequest::everything_at(ExportLevel::AllPatients).with_default_associated_data(true)
    };
    let uninterrupted = {
        let engine = harness.engine(small_settings(7));
        harness.run(&engine, request()).1
    };
    let practitioners_in = |contents: &BTreeMap<String, Vec<String>>| {
        contents
            .iter()
            .filter(|(name, _)| name.starts_with("Practitioner-"))
            .map(|(_, lines)| lines.len())
            .sum::<usize>()
    };
    assert_eq!(practitioners_in(&uninterrupted), encounters);
    let job_id = harness.submit_and_shut_down_when(small_settings(7), request(), |progress| {
        matches!(
            progress,
            JobProgress::Exporting { resources_exported, collecting_referenced: true, .. }
                if *resources_exported >= 70
        )
    });
    let encounter_unit = harness
        .saved_record(&job_id)
        .units
        .iter()
        .position(|unit| unit.resource_type.as_str() == "Encounter")
        .unwrap();
    let interrupted_unit =
        job::UnitCheckpoint::load(&harness.store, &job_id, encounter_unit).unwrap();
    assert!(
        !interrupted_unit.done && !interrupted_unit.output.parts.is_empty(),
        "the job was not stopped in the middle of its Encounter unit: {interrupted_unit:?}"
    );
    let resumed = harness.resume_to_completion(small_settings(7), &job_id);
    assert_eq!(practitioners_in(&resumed), encounters);
    assert_eq!(resumed, uninterrupted);
}

#[test]
fn lenient_problems_become_the_error_file() {
    let harness = Harness::new();
    harness.put(r#"{"resourceType":"Patient","id":"p1"}"#);
    let engine = harness.engine(small_settings(100));
    let mut lenient = ExportRequest::everything_at(ExportLevel::System);
    lenient.ignored_under_lenient = vec!["_elements is not supported yet".to_owned()];
    let (record, contents) = harness.run(&engine, lenient);
    let error_file = record
        .files
        .iter()
        .find(|file| file.kind == FileKind::Error)
        .unwrap();
    assert!(contents[&error_file.name][0].contains("_elements"));
}

#[test]
fn the_job_limit_is_enforced() {
    let harness = Harness::new();
    for index in 0..2000 {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#));
    }
    let mut settings = small_settings(1);
    settings.max_jobs = 1;
    settings.workers = 1;
    let engine = harness.engine(settings);
    engine
        .submit(
            ExportRequest::everything_at(ExportLevel::System),
            "x".to_owned(),
        )
        .unwrap();
    let refused = refused_system_export(&engine);
    assert_eq!(refused.kind(), ExportErrorKind::TooManyJobs);
    assert!(refused.message().contains("the limit is 1"), "{refused}");
}

#[test]
fn kept_exports_are_limited_by_count_and_by_bytes() {
    let harness = Harness::new();
    for index in 0..20 {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#));
    }
    let mut settings = small_settings(5);
    settings.max_retained_exports = 1;
    let engine = harness.engine(settings);
    let (first, _) = harness.run(&engine, ExportRequest::everything_at(ExportLevel::System));
    let refused = refused_system_export(&engine);
    assert_eq!(refused.kind(), ExportErrorKind::TooManyJobs);
    assert!(refused.message().contains("kept"), "{refused}");
    engine.cancel(&first.id).unwrap();
    let (second, _) = harness.run(&engine, ExportRequest::everything_at(ExportLevel::System));
    let exported_bytes: u64 = second.files.iter().map(|file| file.bytes).sum();
    assert!(exported_bytes > 20 * 30, "{exported_bytes} bytes");
    drop(engine);

    let mut settings = small_settings(5);
    settings.max_export_bytes = Some(exported_bytes);
    let engine = harness.engine(settings);
    let refused = refused_system_export(&engine);
    assert_eq!(refused.kind(), ExportErrorKind::InsufficientStorage);
    engine.cancel(&second.id).unwrap();
    harness.run(&engine, ExportRequest::everything_at(ExportLevel::System));
}

/// Regression (found by the export property test): right after a restart, the files of
/// an export completed before it were not downloadable until a worker had reopened the
/// container.
#[test]
fn files_of_an_export_completed_before_a_restart_are_readable_at_once() {
    let harness = Harness::new();
    harness.put(r#"{"resourceType":"Patient","id":"p1"}"#);
    let (record, contents) = {
        let engine = harness.engine(small_settings(5));
        harness.run(&engine, ExportRequest::everything_at(ExportLevel::System))
    };
    let restarted = harness.engine(small_settings(5));
    for file in &record.files {
        let lines = harness.file_lines(&restarted, &record.id, &file.name);
        assert_eq!(lines, contents[&file.name]);
    }
}

#[test]
fn an_export_running_while_the_store_refuses_writes_completes_once_it_takes_them_again() {
    let harness = Harness::new();
    let patients: Vec<String> = (0..1500)
        .map(|index| format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#))
        .collect();
    harness.put_all(&patients);
    let engine = harness.engine(small_settings(1));
    let job_id = engine
        .submit(
            ExportRequest::everything_at(ExportLevel::System),
            "http://test/fhir/$export".to_owned(),
        )
        .unwrap();
    harness
        .store
        .fail_a_write_for_test(std::io::Error::from_raw_os_error(28));
    let refused = engine.submit(
        ExportRequest::everything_at(ExportLevel::System),
        "http://test/fhir/$export".to_owned(),
    );
    assert_eq!(
        error_kind(refused),
        Some(ExportErrorKind::InsufficientStorage)
    );
    match engine.wait(&job_id, |_| {}).unwrap() {
        JobStatus::Completed { record, .. } => assert_eq!(record.files.len(), 1500),
        other => panic!("the export did not complete: {other:?}"),
    }
}

/// A request at `level` with `_typeFilter` values, built through the one constructor.
fn filtered_request(level: ExportLevel, type_filters: &[&str]) -> ExportRequest {
    let mut parameters = ExportParameters::new(level);
    parameters.type_filters = type_filters.iter().map(|text| text.to_string()).collect();
    ExportRequest::new(parameters, Instant::now()).unwrap()
}

fn categorised_observation(id: &str, patient: &str, category: &str, status: &str) -> String {
    format!(
        r#"{{"resourceType":"Observation","id":"{id}","status":"{status}","category":[{{"coding":[{{"code":"{category}"}}]}}],"code":{{}},"subject":{{"reference":"Patient/{patient}"}}}}"#
    )
}

fn condition(id: &str, patient: &str, clinical_status: &str) -> String {
    format!(
        r#"{{"resourceType":"Condition","id":"{id}","clinicalStatus":{{"coding":[{{"code":"{clinical_status}"}}]}},"subject":{{"reference":"Patient/{patient}"}}}}"#
    )
}

fn ids(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

#[test]
fn type_filter_on_one_type_neither_lets_another_filtered_type_through_nor_drops_an_unfiltered_type()
{
    let harness = Harness::new();
    harness.put(r#"{"resourceType":"Patient","id":"p1"}"#);
    harness.put(&categorised_observation("lab", "p1", "laboratory", "final"));
    harness.put(&categorised_observation(
        "vital",
        "p1",
        "vital-signs",
        "final",
    ));
    harness.put(&condition("active", "p1", "active"));
    harness.put(&condition("resolved", "p1", "resolved"));
    let engine = harness.engine(small_settings(100));
    let (_, contents) = harness.run(
        &engine,
        filtered_request(
            ExportLevel::System,
            &[
                "Observation?category=laboratory",
                "Condition?clinical-status=active",
            ],
        ),
    );
    assert_eq!(ids_in(&contents, "Observation-"), ids(&["lab"]));
    assert_eq!(ids_in(&contents, "Condition-"), ids(&["active"]));
    assert_eq!(ids_in(&contents, "Patient-"), ids(&["p1"]));
}

#[test]
fn overlapping_type_filters_for_one_type_export_a_resource_once() {
    let harness = Harness::new();
    harness.put(&categorised_observation(
        "both",
        "p1",
        "laboratory",
        "final",
    ));
    harness.put(&categorised_observation(
        "lab-only",
        "p1",
        "laboratory",
        "preliminary",
    ));
    harness.put(&categorised_observation(
        "final-only",
        "p1",
        "imaging",
        "final",
    ));
    harness.put(&categorised_observation(
        "neither",
        "p1",
        "imaging",
        "preliminary",
    ));
    let engine = harness.engine(small_settings(100));
    let (_, contents) = harness.run(
        &engine,
        filtered_request(
            ExportLevel::System,
            &[
                "Observation?category=laboratory",
                "Observation?status=final",
            ],
        ),
    );
    assert_eq!(
        ids_in(&contents, "Observation-"),
        ids(&["both", "lab-only", "final-only"])
    );
    assert_eq!(
        contents["Observation-1.ndjson"].len(),
        3,
        "no resource twice"
    );
}

#[test]
fn group_and_patient_exports_filter_member_resources() {
    let harness = Harness::new();
    for patient in ["p1", "p2", "outsider"] {
        harness.put(&format!(r#"{{"resourceType":"Patient","id":"{patient}"}}"#));
        harness.put(&categorised_observation(
            &format!("{patient}-lab"),
            patient,
            "laboratory",
            "final",
        ));
        harness.put(&categorised_observation(
            &format!("{patient}-vital"),
            patient,
            "vital-signs",
            "final",
        ));
    }
    harness.put(
        r#"{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[
            {"entity":{"reference":"Patient/p1"}},{"entity":{"reference":"Patient/p2"}}]}"#,
    );
    let engine = harness.engine(small_settings(100));
    let group = ExportLevel::Group(ResourceId::parse("g").unwrap());
    let (_, members) = harness.run(
        &engine,
        filtered_request(group.clone(), &["Observation?category=laboratory"]),
    );
    assert_eq!(ids_in(&members, "Observation-"), ids(&["p1-lab", "p2-lab"]));
    assert_eq!(ids_in(&members, "Patient-"), ids(&["p1", "p2"]));

    let mut narrowed = ExportParameters::new(group);
    narrowed.patients = vec![ResourceId::parse("p2").unwrap()];
    narrowed.type_filters = vec!["Observation?category=vital-signs".to_owned()];
    let (_, narrowed) = harness.run(
        &engine,
        ExportRequest::new(narrowed, Instant::now()).unwrap(),
    );
    assert_eq!(ids_in(&narrowed, "Observation-"), ids(&["p2-vital"]));

    let (_, everyone) = harness.run(
        &engine,
        filtered_request(
            ExportLevel::AllPatients,
            &["Observation?category=laboratory"],
        ),
    );
    assert_eq!(
        ids_in(&everyone, "Observation-"),
        ids(&["p1-lab", "p2-lab", "outsider-lab"])
    );
}

#[test]
fn a_type_filter_with_until_matches_the_resource_as_it_was_at_the_snapshot() {
    let harness = Harness::new();
    harness.put(&categorised_observation(
        "o1",
        "p1",
        "laboratory",
        "preliminary",
    ));
    harness.put(&categorised_observation("o2", "p1", "laboratory", "final"));
    let snapshot = harness.put(r#"{"resourceType":"Patient","id":"p1"}"#);
    std::thread::sleep(Duration::from_millis(2));
    harness.put(&categorised_observation("o1", "p1", "laboratory", "final"));
    harness.put(&categorised_observation(
        "o2",
        "p1",
        "laboratory",
        "amended",
    ));
    let engine = harness.engine(small_settings(100));
    let as_it_was = |filter: &str| {
        let mut parameters = ExportParameters::new(ExportLevel::System);
        parameters.until = Some(snapshot);
        parameters.type_filters = vec![filter.to_owned()];
        ExportRequest::new(parameters, Instant::now()).unwrap()
    };
    let (_, final_then) = harness.run(&engine, as_it_was("Observation?status=final"));
    assert_eq!(ids_in(&final_then, "Observation-"), ids(&["o2"]));
    assert!(final_then["Observation-1.ndjson"][0].contains(r#""final""#));
    let (_, preliminary_then) = harness.run(&engine, as_it_was("Observation?status=preliminary"));
    assert_eq!(ids_in(&preliminary_then, "Observation-"), ids(&["o1"]));
    let (_, final_now) = harness.run(
        &engine,
        filtered_request(ExportLevel::System, &["Observation?status=final"]),
    );
    assert_eq!(ids_in(&final_now, "Observation-"), ids(&["o1"]));
}

#[test]
fn a_type_filter_dropped_under_lenient_handling_reaches_the_error_file() {
    let harness = Harness::new();
    harness.put(&categorised_observation("o1", "p1", "laboratory", "final"));
    let engine = harness.engine(small_settings(100));
    let mut parameters = ExportParameters::new(ExportLevel::System);
    parameters.lenient = true;
    parameters.type_filters = vec!["Observation?_sort=date".to_owned()];
    let request = ExportRequest::new(parameters, Instant::now()).unwrap();
    let (record, contents) = harness.run(&engine, request);
    assert_eq!(ids_in(&contents, "Observation-"), ids(&["o1"]));
    let error_file = record
        .files
        .iter()
        .find(|file| file.kind == FileKind::Error)
        .unwrap();
    assert!(contents[&error_file.name][0].contains("_sort"));
}

fn provenance_recorded(id: &str, targets: &[&str], recorded: &str) -> String {
    let target: Vec<Value> = targets
        .iter()
        .map(|reference| serde_json::json!({"reference": reference}))
        .collect();
    serde_json::json!({"resourceType": "Provenance", "id": id, "target": target,
        "recorded": recorded, "agent": [{"who": {"reference": "Practitioner/doc"}}]})
    .to_string()
}

/// A patient with observations `latest-read-first` and `latest-read-last`, whose latest
/// Provenance (`first`, `last`) are read first and last, with `older_count` older ones
/// naming both in between.
fn put_latest_provenance_world(harness: &Harness, older_count: usize) {
    harness.put(r#"{"resourceType":"Patient","id":"p"}"#);
    harness.put(&observation("latest-read-first", &["p"]));
    harness.put(&observation("latest-read-last", &["p"]));
    let both = [
        "Observation/latest-read-first",
        "Observation/latest-read-last",
    ];
    harness.put(&provenance_recorded(
        "first",
        &both[..1],
        "2030-01-01T00:00:00Z",
    ));
    let older: Vec<String> = (0..older_count)
        .map(|index| {
            let recorded = Instant::from_micros_since_epoch(index as i64 * 1_000_000);
            provenance_recorded(&format!("older-{index}"), &both, &recorded.to_fhir_string())
        })
        .collect();
    harness.put_all(&older);
    harness.put(&provenance_recorded(
        "last",
        &both[1..],
        "2030-01-01T00:00:00Z",
    ));
}

fn latest_provenance_request() -> ExportRequest {
    let mut request = ExportRequest::everything_at(ExportLevel::AllPatients);
    request.associated_data = Some(request::AssociatedData {
        latest_provenance: true,
        ..request::AssociatedData::default()
    });
    request
}

#[test]
fn latest_provenance_is_kept_across_checkpoint_chunks() {
    let harness = Harness::new();
    put_latest_provenance_world(&harness, provenance::PROVENANCE_PER_CHECKPOINT + 10);
    let engine = harness.engine(small_settings(100));

    let (_, latest) = harness.run(&engine, latest_provenance_request());

    assert_eq!(ids_in(&latest, "Provenance-"), ids(&["first", "last"]));
}

#[test]
fn a_latest_provenance_collection_stopped_between_checkpoints_resumes_to_the_same_output() {
    let harness = Harness::new();
    put_latest_provenance_world(&harness, 4 * provenance::PROVENANCE_PER_CHECKPOINT);
    let uninterrupted = {
        let engine = harness.engine(small_settings(100));
        harness.run(&engine, latest_provenance_request()).1
    };
    let past_a_checkpoint = |record: &job::JobRecord| matches!(record.state, job::JobState::CollectingProvenance { after_seq } if after_seq > 0);
    let job_id = {
        let engine = harness.engine(small_settings(100));
        let job_id = engine
            .submit(latest_provenance_request(), "x".to_owned())
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !past_a_checkpoint(&harness.saved_record(&job_id)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the job never checkpointed its Provenance collection"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        job_id
    };
    let stopped = harness.saved_record(&job_id);
    assert!(
        past_a_checkpoint(&stopped),
        "the job was not stopped inside its Provenance collection: {:?}",
        stopped.state
    );
    let resumed = harness.resume_to_completion(small_settings(100), &job_id);
    assert_eq!(resumed, uninterrupted);
    assert_eq!(ids_in(&resumed, "Provenance-"), ids(&["first", "last"]));
}
