//! Runs a sequence of steps against a real store in a temporary directory and the model
//! side by side, checking every answer and every read against the model.

use std::path::Path;

use fhirlog::fhir::{Instant, ResourceType};
use fhirlog::store::{Store, StoreError, StoreOptions, StoredVersion, VersionInfo, WriteOutcome};
use serde_json::Value;
use tempfile::TempDir;

use crate::store_model::{
    ModelVersion, PATIENT_IDS, PredictedOutcome, RecordedEvent, RequestOperation, ResolvedRequest,
    ResourceContent, ResourceTarget, StoreModel, every_resource_target, expected_content_json,
    without_server_metadata,
};

#[derive(Debug, Clone)]
pub enum StoreStep {
    /// One request, committed and waited for.
    Commit(Vec<RequestOperation>),
    /// Several requests queued before waiting for any, so the committer may group them.
    SubmitTogether(Vec<Vec<RequestOperation>>),
    /// Drop the store and open the same directory again.
    Restart,
    Rebuild,
}

/// Tiny memtables, so that projections are flushed to disk tables within a few commits.
pub fn small_memtable_store_options() -> StoreOptions {
    StoreOptions {
        block_cache_bytes: 1 << 20,
        max_journal_bytes: 64 << 20,
        events_memtable_bytes: 16 << 10,
        index_memtable_bytes: 4 << 10,
        ..StoreOptions::default()
    }
}

/// A fresh directory for one store, in memory-backed `/dev/shm` where there is one: fsync
/// costs nothing there, so the run time depends on the store and not on the disk's load.
pub fn scenario_directory() -> TempDir {
    let memory_backed_directory = Path::new("/dev/shm");
    if memory_backed_directory.is_dir()
        && let Ok(directory) = tempfile::Builder::new()
            .prefix("fhirlog-proptests-")
            .tempdir_in(memory_backed_directory)
    {
        return directory;
    }
    tempfile::tempdir().expect("creating a temporary directory")
}

fn open_store(directory: &Path) -> Store {
    Store::open(directory, &small_memtable_store_options())
        .unwrap_or_else(|error| panic!("opening the store failed: {error}"))
}

pub fn run_store_scenario(steps: &[StoreStep]) {
    let directory = scenario_directory();
    let mut store = open_store(directory.path());
    let mut model = StoreModel::default();
    for (step_index, step) in steps.iter().enumerate() {
        let context = format!("step {step_index} ({})", step_label(step));
        match step {
            StoreStep::Commit(request) => {
                commit_and_check_answer(&store, &mut model, request, &context);
            }
            StoreStep::SubmitTogether(requests) => {
                submit_together_and_check_answers(&store, &mut model, requests, &context);
            }
            StoreStep::Restart => store = restart_and_compare(store, directory.path(), &context),
            StoreStep::Rebuild => rebuild_and_compare(&store, &model, &context),
        }
        assert_store_matches_model(&store, &model, &context);
    }
    rebuild_and_compare(&store, &model, "final rebuild");
    store = restart_and_compare(store, directory.path(), "restart after the final rebuild");
    assert_store_matches_model(&store, &model, "after the final rebuild and restart");
}

fn step_label(step: &StoreStep) -> String {
    match step {
        StoreStep::Commit(request) => format!("commit of {} operations", request.len()),
        StoreStep::SubmitTogether(requests) => {
            format!("{} requests submitted together", requests.len())
        }
        StoreStep::Restart => "restart".to_owned(),
        StoreStep::Rebuild => "rebuild".to_owned(),
    }
}

fn restart_and_compare(store: Store, directory: &Path, context: &str) -> Store {
    let projections_before = store.dump_projections().expect("dumping projections");
    drop(store);
    let reopened = open_store(directory);
    assert_eq!(
        reopened.dump_projections().expect("dumping projections"),
        projections_before,
        "{context}: projections differ after reopening the store"
    );
    reopened
}

fn rebuild_and_compare(store: &Store, model: &StoreModel, context: &str) {
    let incremental_projections = store.dump_projections().expect("dumping projections");
    let summary = store
        .rebuild_projections()
        .unwrap_or_else(|error| panic!("{context}: rebuild failed: {error}"));
    assert_eq!(
        store.dump_projections().expect("dumping projections"),
        incremental_projections,
        "{context}: rebuilt projections differ from the incrementally maintained ones"
    );
    let model_event_count: usize = model.versions_by_target.values().map(Vec::len).sum();
    assert_eq!(
        summary.events, model_event_count as u64,
        "{context}: rebuild replayed a different number of events"
    );
    assert_eq!(
        summary.commits,
        model.commits.len() as u64,
        "{context}: rebuild counted a different number of commits"
    );
}

fn commit_and_check_answer(
    store: &Store,
    model: &mut StoreModel,
    request: &[RequestOperation],
    context: &str,
) {
    let resolved = model.resolve_request(request);
    let projections_before_refusal = resolved
        .prediction
        .is_err()
        .then(|| store.dump_projections().expect("dumping projections"));
    let answer = store.commit(resolved.operations.clone());
    check_answer_and_record(model, &resolved, answer, context);
    if let Some(projections_before) = projections_before_refusal {
        assert_eq!(
            store.dump_projections().expect("dumping projections"),
            projections_before,
            "{context}: a refused request changed the projections"
        );
    }
}

fn submit_together_and_check_answers(
    store: &Store,
    model: &mut StoreModel,
    requests: &[Vec<RequestOperation>],
    context: &str,
) {
    let mut model_ahead_of_the_store = model.clone();
    let resolved_requests: Vec<ResolvedRequest> = requests
        .iter()
        .map(|request| {
            let resolved = model_ahead_of_the_store.resolve_request(request);
            if let Ok(outcomes) = &resolved.prediction {
                model_ahead_of_the_store.record_prediction_without_log_positions(outcomes);
            }
            resolved
        })
        .collect();
    let pending_commits: Vec<_> = resolved_requests
        .iter()
        .map(|resolved| store.submit(resolved.operations.clone()))
        .collect();
    for (request_index, (resolved, pending_commit)) in
        resolved_requests.iter().zip(pending_commits).enumerate()
    {
        let request_context = format!("{context}, request {request_index}");
        check_answer_and_record(model, resolved, pending_commit.wait(), &request_context);
    }
}

fn check_answer_and_record(
    model: &mut StoreModel,
    resolved: &ResolvedRequest,
    answer: Result<Vec<WriteOutcome>, StoreError>,
    context: &str,
) {
    match (&resolved.prediction, answer) {
        (Err(expected_rejection), Err(StoreError::Rejected(actual_rejection))) => {
            assert_eq!(
                &actual_rejection, expected_rejection,
                "{context}: refused for the wrong reason"
            );
        }
        (Ok(predicted_outcomes), Ok(actual_outcomes)) => {
            let events = match_outcomes(model, predicted_outcomes, &actual_outcomes, context);
            model.record_commit(events);
        }
        (prediction, answer) => {
            panic!(
                "{context}: the model predicted {prediction:?} but the store answered {answer:?}"
            )
        }
    }
}

/// Outcome kind and (type, id, version) in a form shared by predictions and answers.
type OutcomeSummary = (&'static str, Option<(ResourceType, String, u64)>);

fn predicted_outcome_summary(outcome: &PredictedOutcome) -> OutcomeSummary {
    let identify = |target: &ResourceTarget, version: &u64| {
        Some((target.resource_type(), target.id.to_owned(), *version))
    };
    match outcome {
        PredictedOutcome::Created {
            target, version, ..
        } => ("created", identify(target, version)),
        PredictedOutcome::Updated {
            target, version, ..
        } => ("updated", identify(target, version)),
        PredictedOutcome::Unchanged { target, version } => ("unchanged", identify(target, version)),
        PredictedOutcome::Deleted { target, version } => ("deleted", identify(target, version)),
        PredictedOutcome::NothingToDelete => ("nothing to delete", None),
    }
}

fn actual_outcome_summary(outcome: &WriteOutcome) -> OutcomeSummary {
    let identify = |info: &VersionInfo| {
        Some((
            info.resource_type,
            info.id.as_str().to_owned(),
            info.version,
        ))
    };
    match outcome {
        WriteOutcome::Created { version } => ("created", identify(version)),
        WriteOutcome::Updated { version } => ("updated", identify(version)),
        WriteOutcome::Unchanged {
            resource_type,
            id,
            version,
        } => (
            "unchanged",
            Some((*resource_type, id.as_str().to_owned(), *version)),
        ),
        WriteOutcome::Deleted { version } => ("deleted", identify(version)),
        WriteOutcome::NothingToDelete => ("nothing to delete", None),
    }
}

fn appended_version_info(outcome: &WriteOutcome) -> Option<&VersionInfo> {
    match outcome {
        WriteOutcome::Created { version }
        | WriteOutcome::Updated { version }
        | WriteOutcome::Deleted { version } => Some(version),
        WriteOutcome::Unchanged { .. } | WriteOutcome::NothingToDelete => None,
    }
}

/// Checks each answer against its prediction, and that the appended events share one
/// instant later than every earlier commit's and have seqs above every earlier one.
fn match_outcomes(
    model: &StoreModel,
    predicted_outcomes: &[PredictedOutcome],
    actual_outcomes: &[WriteOutcome],
    context: &str,
) -> Vec<RecordedEvent> {
    let predicted_summaries: Vec<OutcomeSummary> = predicted_outcomes
        .iter()
        .map(predicted_outcome_summary)
        .collect();
    let actual_summaries: Vec<OutcomeSummary> =
        actual_outcomes.iter().map(actual_outcome_summary).collect();
    assert_eq!(
        actual_summaries, predicted_summaries,
        "{context}: outcomes differ from the model's"
    );
    let mut events = Vec::new();
    let mut previous_seq = model.last_seq();
    let mut commit_instants = CommitInstantCheck::after(model.last_commit_instant());
    for (predicted, actual) in predicted_outcomes.iter().zip(actual_outcomes) {
        let Some((target, version, content)) = predicted.appended_version() else {
            continue;
        };
        let info = appended_version_info(actual)
            .unwrap_or_else(|| panic!("{context}: {actual:?} appended no version"));
        assert!(
            info.seq > previous_seq,
            "{context}: seq {} does not follow seq {previous_seq}",
            info.seq
        );
        previous_seq = info.seq;
        commit_instants.check(context, info.last_updated);
        events.push(RecordedEvent {
            target,
            version,
            seq: info.seq,
            last_updated: info.last_updated,
            content: content.cloned(),
        });
    }
    events
}

/// Follows the versions one commit appends: each must carry the commit's one instant, and
/// that instant must be later than the previous commit's.
pub struct CommitInstantCheck {
    previous_commit_instant: Option<Instant>,
    commit_instant: Option<Instant>,
}

impl CommitInstantCheck {
    pub fn after(previous_commit_instant: Option<Instant>) -> CommitInstantCheck {
        CommitInstantCheck {
            previous_commit_instant,
            commit_instant: None,
        }
    }

    pub fn check(&mut self, context: &str, instant: Instant) {
        match self.commit_instant {
            Some(commit_instant) => assert_eq!(
                instant, commit_instant,
                "{context}: versions of one commit carry different instants"
            ),
            None => {
                if let Some(previous_commit_instant) = self.previous_commit_instant {
                    assert!(
                        instant > previous_commit_instant,
                        "{context}: commit instant {instant} is not after the previous \
                         commit's {previous_commit_instant}"
                    );
                }
                self.commit_instant = Some(instant);
            }
        }
    }

    /// The commit's instant, once one of its versions was checked.
    pub fn commit_instant(&self) -> Option<Instant> {
        self.commit_instant
    }
}

/// Every read the store offers, for every resource of the id space, against the model.
pub fn assert_store_matches_model(store: &Store, model: &StoreModel, context: &str) {
    for target in every_resource_target() {
        assert_resource_reads_match_model(store, model, target, context);
    }
    for patient_id in PATIENT_IDS.iter().chain(["g1"].iter()) {
        let mut actual_members = store
            .compartment_members(patient_id)
            .unwrap_or_else(|error| panic!("{context}: compartment read failed: {error}"));
        actual_members.sort();
        let expected_members: Vec<(ResourceType, String)> = model
            .compartment_members_by_patient
            .get(patient_id)
            .into_iter()
            .flatten()
            .map(|target| (target.resource_type(), target.id.to_owned()))
            .collect();
        let mut expected_members_sorted = expected_members;
        expected_members_sorted.sort();
        assert_eq!(
            actual_members, expected_members_sorted,
            "{context}: compartment of Patient/{patient_id}"
        );
    }
    let mut previous_commit_last_seq = 0;
    for commit in &model.commits {
        let just_before = Instant::from_micros_since_epoch(commit.instant.micros_since_epoch() - 1);
        assert_eq!(
            store.seq_at_or_before(commit.instant).expect("clock read"),
            commit.last_seq,
            "{context}: seq at the instant {} of a commit",
            commit.instant
        );
        assert_eq!(
            store.seq_at_or_before(just_before).expect("clock read"),
            previous_commit_last_seq,
            "{context}: seq just before the commit at {}",
            commit.instant
        );
        previous_commit_last_seq = commit.last_seq;
    }
    assert_eq!(
        store
            .seq_at_or_before(Instant::from_micros_since_epoch(i64::MAX))
            .expect("clock read"),
        model.last_seq(),
        "{context}: seq at the end of time"
    );
    assert_eq!(
        store.high_water_seq().expect("high-water read"),
        model.last_seq(),
        "{context}: high-water seq"
    );
}

fn assert_resource_reads_match_model(
    store: &Store,
    model: &StoreModel,
    target: ResourceTarget,
    context: &str,
) {
    let resource_type = target.resource_type();
    let id = target.resource_id();
    let expected_versions = model.versions_of(target);
    let history = store
        .history(resource_type, &id)
        .unwrap_or_else(|error| panic!("{context}: history of {target:?} failed: {error}"));
    let history_versions: Vec<u64> = history.iter().map(|stored| stored.version).collect();
    let expected_history_versions: Vec<u64> = expected_versions
        .iter()
        .rev()
        .map(|expected| expected.version)
        .collect();
    assert_eq!(
        history_versions, expected_history_versions,
        "{context}: history of {target:?} (newest first)"
    );
    for (stored, expected) in history.iter().zip(expected_versions.iter().rev()) {
        assert_stored_version_matches(stored, target, expected, context);
    }
    let current = store
        .read_current(resource_type, &id)
        .unwrap_or_else(|error| panic!("{context}: read of {target:?} failed: {error}"));
    assert_eq!(
        current.as_ref(),
        history.first(),
        "{context}: current version of {target:?}"
    );
    for expected in expected_versions {
        let stored = store
            .read_version(resource_type, &id, expected.version)
            .unwrap_or_else(|error| panic!("{context}: vread of {target:?} failed: {error}"))
            .unwrap_or_else(|| {
                panic!(
                    "{context}: version {} of {target:?} is missing",
                    expected.version
                )
            });
        assert_stored_version_matches(&stored, target, expected, context);
    }
    for missing_version in [0, expected_versions.len() as u64 + 1] {
        assert_eq!(
            store
                .read_version(resource_type, &id, missing_version)
                .expect("vread"),
            None,
            "{context}: version {missing_version} of {target:?} should not exist"
        );
    }
}

fn assert_stored_version_matches(
    stored: &StoredVersion,
    target: ResourceTarget,
    expected: &ModelVersion,
    context: &str,
) {
    let position = (
        stored.resource_type,
        stored.id.as_str(),
        stored.version,
        stored.seq,
        stored.last_updated,
    );
    let expected_position = (
        target.resource_type(),
        target.id,
        expected.version,
        expected.seq,
        expected.last_updated,
    );
    assert_eq!(
        position, expected_position,
        "{context}: type, id, version, seq and instant of {target:?}"
    );
    match (&stored.body, &expected.content) {
        (None, None) => {}
        (Some(body), Some(content)) => {
            assert_body_matches(body, target, expected, content, context);
        }
        (body, content) => panic!(
            "{context}: version {} of {target:?} has body {body:?}, the model expected content {content:?}",
            expected.version
        ),
    }
}

fn assert_body_matches(
    body: &str,
    target: ResourceTarget,
    expected: &ModelVersion,
    content: &ResourceContent,
    context: &str,
) {
    let canonical_prefix = format!(
        r#"{{"resourceType":"{}","id":"{}","meta":{{"versionId":"{}","lastUpdated":""#,
        target.kind.type_name(),
        target.id,
        expected.version
    );
    assert!(
        body.starts_with(&canonical_prefix),
        "{context}: body of {target:?} version {} does not start like canonical form: {body}",
        expected.version
    );
    let parsed: Value = serde_json::from_str(body)
        .unwrap_or_else(|error| panic!("{context}: stored body is not JSON ({error}): {body}"));
    let meta = &parsed["meta"];
    assert_eq!(
        meta["versionId"].as_str(),
        Some(expected.version.to_string().as_str()),
        "{context}: meta.versionId of {body}"
    );
    let last_updated_text = meta["lastUpdated"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no meta.lastUpdated in {body}"));
    assert_eq!(
        Instant::parse(last_updated_text).ok(),
        Some(expected.last_updated),
        "{context}: meta.lastUpdated of {body}"
    );
    assert_eq!(
        without_server_metadata(parsed),
        expected_content_json(target, content),
        "{context}: content of {target:?} version {}",
        expected.version
    );
}
