//! Random histories of a small clinical id space, committed through the store with
//! restarts in between, then exported through the real engine and compared exactly with
//! the export model; an export interrupted by stopping its engine and resumed by a fresh
//! one must write the very bytes of an uninterrupted run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fhirlog::export::job::{FileKind, JobRecord, UnitCheckpoint};
use fhirlog::export::manifest::{FileUrls, manifest};
use fhirlog::export::{
    ExportEngine, ExportError, ExportErrorKind, ExportLevel, ExportRequest, ExportSettings,
    JobStatus,
};
use fhirlog::fhir::{Instant, LocalBase, ResourceId, ResourceType};
use fhirlog::sink::MemoryDestination;
use fhirlog::store::{Store, UnchangedContent, WriteOperation, WriteOutcome};
use proptest::prelude::*;
use proptest::sample::{Index, select, subsequence};
use proptest::test_runner::TestRunner;
use serde_json::Value;
use tempfile::TempDir;

use crate::export_model::{
    ABSOLUTE_REFERENCE_BASE, EXPORTED_GROUP_ID, ExpectedExport, ExpectedRefusal, ExportContent,
    ExportHistory, ExportTarget, ExportTargetKind, GROUP_IDS, GroupMember, LiteralReferenceTo,
    ORGANIZATION_IDS, RecordedVersion, every_export_target, stored_body_holds_content,
};
use crate::store_harness::{CommitInstantCheck, scenario_directory, small_memtable_store_options};
use crate::store_model::{PATIENT_IDS, prepare_resource_from_text};

const EXPORT_SCENARIO_CASES: u32 = 40;
const MIN_HISTORY_STEPS_AFTER_THE_FIRST_COMMIT: usize = 6;
const MAX_HISTORY_STEPS_AFTER_THE_FIRST_COMMIT: usize = 21;
const MAX_EXPORTS_PER_SCENARIO: usize = 4;
const MAX_COMMITS_WHILE_AN_EXPORT_IS_STOPPED: usize = 2;
const SHORT_DELAY_BEFORE_STOPPING_AN_EXPORT_MICROS: u64 = 300;
const MAX_DELAY_BEFORE_STOPPING_AN_EXPORT_MICROS: u64 = 3_000;
const JOB_COMPLETION_DEADLINE: Duration = Duration::from_secs(60);
const JOB_STATUS_POLL_INTERVAL: Duration = Duration::from_millis(1);
const PAUSE_BEFORE_A_COMMIT: Duration = Duration::from_millis(1);
/// Versions of one Patient after the others: its unit visits them all after writing its
/// first part, checking for a stop every 256 events (`CANCEL_CHECK_INTERVAL` in
/// `src/export/worker.rs`) and again before its last part, so a stop in between lands
/// part-way through the unit.
const REPEATED_PUTS: std::ops::RangeInclusive<usize> = 400..=800;
const KICK_OFF_URL: &str = "http://proptest.example/fhir/$export";
const MANIFEST_FILE_URL_PREFIX: &str = "http://proptest.example/files";

#[derive(Debug, Clone)]
pub enum HistoryOperation {
    Put {
        target: ExportTarget,
        content: ExportContent,
    },
    Delete {
        target: ExportTarget,
    },
}

#[derive(Debug, Clone)]
pub enum HistoryStep {
    Commit {
        operations: Vec<HistoryOperation>,
        /// Sleep first, so this commit's instant is measurably later than the last one's.
        pause_before: bool,
    },
    /// One request putting every Patient once, then one of them `times` more times: a
    /// part's worth of Patients followed by a long run of superseded versions, inside
    /// which an export's Patient unit can be stopped part-way written.
    PatientsThenManyVersions {
        patient_contents: Vec<ExportContent>,
        repeated_patient: Index,
        times: usize,
    },
    /// Drop the engine and the store, reopen the store and start a new engine.
    Restart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineChoice {
    pub workers: usize,
    pub max_resources_per_file: u64,
}

impl EngineChoice {
    fn settings(self) -> ExportSettings {
        ExportSettings {
            workers: self.workers,
            max_resources_per_file: self.max_resources_per_file,
            job_timeout: Duration::from_secs(300),
            max_jobs: 64,
            retention: Duration::from_secs(24 * 3600),
            destination_timeout: Duration::from_secs(120),
            max_retained_exports: usize::MAX,
            max_export_bytes: None,
            max_jobs_per_client: 64,
            max_retained_exports_per_client: usize::MAX,
            local_base: LocalBase::at(ABSOLUTE_REFERENCE_BASE),
            ..ExportSettings::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChoice {
    System,
    AllPatients,
    ExportedGroup,
}

/// An instant picked relative to the commits of the history so far.
#[derive(Debug, Clone, Copy)]
pub enum InstantChoice {
    JustBeforeTheFirstCommit,
    AtCommit(Index),
    /// `per_mille_of_the_gap` of the way from a commit to the next one (the commit itself
    /// for the last commit).
    BetweenCommits {
        commit: Index,
        per_mille_of_the_gap: u16,
    },
}

#[derive(Debug, Clone)]
pub struct PatientsChoice {
    pub chosen_by_patient_index: Vec<bool>,
    /// Keep only the chosen patients that the level covers (otherwise a non-member makes
    /// the engine refuse the request).
    pub restrict_to_level_members: bool,
}

/// When an interrupted export's engine is stopped.
#[derive(Debug, Clone, Copy)]
pub enum StopPoint {
    /// A fixed delay after the kick-off: before planning, between units or inside one,
    /// as it happens.
    AfterDelay { micros: u64 },
    /// As soon as a unit's checkpoint shows a part written and the unit not done (or once
    /// the job is no longer in progress, when that never shows).
    OnceAUnitIsPartWayWritten,
}

#[derive(Debug, Clone)]
pub struct InterruptionChoice {
    pub stop_point: StopPoint,
    pub commits_while_stopped: Vec<Vec<HistoryOperation>>,
    pub reopen_store_while_stopped: bool,
    pub resuming_engine: EngineChoice,
}

#[derive(Debug, Clone)]
pub struct ExportChoice {
    pub level: LevelChoice,
    pub types: Option<Vec<ResourceType>>,
    pub since: Option<InstantChoice>,
    pub until: Option<InstantChoice>,
    pub patients: Option<PatientsChoice>,
    pub interruption: Option<InterruptionChoice>,
}

#[derive(Debug, Clone)]
pub struct ExportScenario {
    pub engine: EngineChoice,
    /// Starts with a commit that appends at least one version.
    pub history: Vec<HistoryStep>,
    pub exports: Vec<ExportChoice>,
}

/// A completed job and the bytes of each of its files, in manifest order.
struct CompletedExport {
    record: Box<JobRecord>,
    file_bytes: Vec<(String, Bytes)>,
}

fn open_store(directory: &Path) -> Store {
    Store::open(directory, &small_memtable_store_options())
        .unwrap_or_else(|error| panic!("opening the store failed: {error}"))
}

/// One scenario's store, engine, destination and model. Fields drop in order: the engine
/// before the store, the store before its directory.
pub struct ExportScenarioRun {
    engine: Option<ExportEngine>,
    store: Option<Store>,
    engine_choice: EngineChoice,
    destination: Arc<MemoryDestination>,
    runtime: tokio::runtime::Runtime,
    history: ExportHistory,
    /// How many interruptions stopped a job with a unit part-way written.
    mid_unit_interruptions: usize,
    directory: TempDir,
}

impl ExportScenarioRun {
    pub fn new(engine_choice: EngineChoice) -> ExportScenarioRun {
        let directory = scenario_directory();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        let mut run = ExportScenarioRun {
            engine: None,
            store: Some(open_store(directory.path())),
            engine_choice,
            destination: Arc::new(MemoryDestination::new(true)),
            runtime,
            history: ExportHistory::default(),
            mid_unit_interruptions: 0,
            directory,
        };
        run.start_engine();
        run
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    fn engine(&self) -> &ExportEngine {
        self.engine.as_ref().expect("the engine is running")
    }

    fn start_engine(&mut self) {
        let engine = ExportEngine::start(
            self.store().clone(),
            self.destination.clone(),
            self.engine_choice.settings(),
            self.runtime.handle().clone(),
        )
        .unwrap_or_else(|error| panic!("starting the export engine failed: {error}"));
        self.engine = Some(engine);
    }

    fn stop_engine(&mut self) {
        self.engine = None;
    }

    fn reopen_store(&mut self) {
        assert!(self.engine.is_none(), "the engine still holds the store");
        self.store = None;
        self.store = Some(open_store(self.directory.path()));
    }

    pub fn restart(&mut self) {
        self.stop_engine();
        self.reopen_store();
        self.start_engine();
    }

    /// Commits `operations` as one request and records the versions it appended, with
    /// the stored canonical body of each live one.
    pub fn commit(&mut self, operations: &[HistoryOperation], context: &str) {
        let write_operations = operations.iter().map(write_operation_for).collect();
        let outcomes = self
            .store()
            .commit(write_operations)
            .unwrap_or_else(|error| panic!("{context}: commit failed: {error}"));
        assert_eq!(
            outcomes.len(),
            operations.len(),
            "{context}: one outcome per operation"
        );
        let mut newest_version_in_request: BTreeMap<ExportTarget, (u64, bool)> = BTreeMap::new();
        let mut appended = Vec::new();
        let mut commit_instants = CommitInstantCheck::after(self.history.last_commit_instant());
        for (operation, outcome) in operations.iter().zip(&outcomes) {
            let target = match operation {
                HistoryOperation::Put { target, .. } | HistoryOperation::Delete { target } => {
                    *target
                }
            };
            let (newest_version, newest_is_live) = newest_version_in_request
                .get(&target)
                .copied()
                .unwrap_or_else(|| {
                    let versions = self.history.versions_of(target);
                    (
                        self.history.newest_version_number(target),
                        versions.last().is_some_and(|newest| newest.live.is_some()),
                    )
                });
            let info = match (operation, outcome) {
                (HistoryOperation::Put { .. }, WriteOutcome::Created { version })
                    if !newest_is_live =>
                {
                    version
                }
                (HistoryOperation::Put { .. }, WriteOutcome::Updated { version })
                    if newest_is_live =>
                {
                    version
                }
                (HistoryOperation::Delete { .. }, WriteOutcome::Deleted { version })
                    if newest_is_live =>
                {
                    version
                }
                (HistoryOperation::Delete { .. }, WriteOutcome::NothingToDelete)
                    if !newest_is_live =>
                {
                    continue;
                }
                (operation, outcome) => {
                    panic!("{context}: {operation:?} answered {outcome:?}")
                }
            };
            assert_eq!(
                (info.resource_type, info.id.as_str(), info.version),
                (target.resource_type(), target.id, newest_version + 1),
                "{context}: the version appended for {target:?}"
            );
            commit_instants.check(context, info.last_updated);
            let live = match operation {
                HistoryOperation::Put { content, .. } => {
                    let stored = self
                        .store()
                        .read_version(target.resource_type(), &target.resource_id(), info.version)
                        .unwrap_or_else(|error| panic!("{context}: vread failed: {error}"))
                        .unwrap_or_else(|| {
                            panic!("{context}: {target:?} version {} is missing", info.version)
                        });
                    let body = stored.body.unwrap_or_else(|| {
                        panic!("{context}: {target:?} version {} has no body", info.version)
                    });
                    assert!(
                        stored_body_holds_content(&body, target, content),
                        "{context}: stored body {body} does not hold {content:?}"
                    );
                    Some((content.clone(), body))
                }
                HistoryOperation::Delete { .. } => None,
            };
            newest_version_in_request.insert(target, (info.version, live.is_some()));
            appended.push((
                target,
                RecordedVersion {
                    version: info.version,
                    last_updated: info.last_updated,
                    live,
                },
            ));
        }
        if let Some(instant) = commit_instants.commit_instant() {
            self.history.record_commit(instant, appended);
        }
    }

    fn resolve_instant(&self, choice: InstantChoice) -> Instant {
        let instants = &self.history.commit_instants;
        match choice {
            InstantChoice::JustBeforeTheFirstCommit => {
                Instant::from_micros_since_epoch(instants[0].micros_since_epoch() - 1)
            }
            InstantChoice::AtCommit(index) => instants[index.index(instants.len())],
            InstantChoice::BetweenCommits {
                commit,
                per_mille_of_the_gap,
            } => {
                let position = commit.index(instants.len());
                let Some(next) = instants.get(position + 1) else {
                    return instants[position];
                };
                let start = instants[position].micros_since_epoch();
                let gap = next.micros_since_epoch() - start;
                Instant::from_micros_since_epoch(
                    start + gap * i64::from(per_mille_of_the_gap) / 1000,
                )
            }
        }
    }

    /// The request a choice stands for, given the history so far.
    pub fn resolve_request(&self, choice: &ExportChoice) -> ExportRequest {
        let since = choice.since.map(|since| self.resolve_instant(since));
        let until = choice
            .until
            .map(|until| self.resolve_instant(until))
            .filter(|until| since.is_none_or(|since| *until > since));
        let level = match choice.level {
            LevelChoice::System => ExportLevel::System,
            LevelChoice::AllPatients => ExportLevel::AllPatients,
            LevelChoice::ExportedGroup => {
                ExportLevel::Group(ResourceId::parse(EXPORTED_GROUP_ID).expect("valid id"))
            }
        };
        let patients = match (&level, &choice.patients) {
            (ExportLevel::System, _) | (_, None) => Vec::new(),
            (_, Some(patients_choice)) => {
                let level_members = match &level {
                    ExportLevel::Group(_) => self
                        .history
                        .group_members_as_of(EXPORTED_GROUP_ID, until)
                        .unwrap_or_default(),
                    _ => self.history.patients_live_as_of(until),
                };
                PATIENT_IDS
                    .iter()
                    .zip(&patients_choice.chosen_by_patient_index)
                    .filter(|(patient_id, chosen)| {
                        **chosen
                            && (!patients_choice.restrict_to_level_members
                                || level_members.contains(*patient_id))
                    })
                    .map(|(patient_id, _)| ResourceId::parse(patient_id).expect("valid id"))
                    .collect()
            }
        };
        ExportRequest {
            since,
            until,
            types: choice
                .types
                .as_ref()
                .map(|types| types.iter().copied().collect()),
            patients,
            ..ExportRequest::everything_at(level)
        }
    }

    fn wait_for_completion(&self, job_id: &str, context: &str) -> CompletedExport {
        let engine = self.engine();
        let deadline = std::time::Instant::now() + JOB_COMPLETION_DEADLINE;
        let record = loop {
            match engine.status(job_id) {
                Ok(JobStatus::Completed { record, .. }) => break record,
                Ok(JobStatus::InProgress { progress }) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{context}: job {job_id} is still in progress ({progress}) at the deadline"
                    );
                    std::thread::sleep(JOB_STATUS_POLL_INTERVAL);
                }
                Ok(JobStatus::Failed { kind, message }) => {
                    panic!("{context}: job {job_id} failed ({kind:?}): {message}")
                }
                Err(error) => panic!("{context}: status of job {job_id}: {error}"),
            }
        };
        let file_bytes = record
            .files
            .iter()
            .map(|file| {
                let (files, object) = engine
                    .file(job_id, &file.name)
                    .unwrap_or_else(|error| panic!("{context}: {}: {error}", file.name));
                let bytes = self
                    .runtime
                    .block_on(files.get_bytes(&object))
                    .unwrap_or_else(|error| panic!("{context}: reading {}: {error}", file.name));
                (file.name.clone(), bytes)
            })
            .collect();
        CompletedExport { record, file_bytes }
    }

    /// Runs the request an export choice stands for and checks it against the model;
    /// with an interruption, runs it again, stopped and resumed, and compares the bytes.
    pub fn run_export_choice(&mut self, choice: &ExportChoice, context: &str) {
        let request = self.resolve_request(choice);
        let context = format!("{context} ({request:?})");
        let Some(uninterrupted) = self.run_export_and_compare_with_model(&request, &context) else {
            return;
        };
        if let Some(interruption) = &choice.interruption {
            self.run_interrupted_export_and_compare(
                &request,
                interruption,
                &uninterrupted,
                &context,
            );
        }
    }

    /// Runs `request` to completion and checks it against the model; `None` when the
    /// model and the engine both refuse it.
    fn run_export_and_compare_with_model(
        &self,
        request: &ExportRequest,
        context: &str,
    ) -> Option<CompletedExport> {
        let expected = self.history.expected_export(request);
        let submitted = self
            .engine()
            .submit(request.clone(), KICK_OFF_URL.to_owned());
        match (expected, submitted) {
            (Ok(expected), Ok(job_id)) => {
                let completed = self.wait_for_completion(&job_id, context);
                assert_export_matches_model(
                    &completed,
                    &expected,
                    self.engine_choice.max_resources_per_file,
                    context,
                );
                Some(completed)
            }
            (Err(refusal), Err(error)) if engine_error_answers_refusal(&error, refusal) => None,
            (expected, submitted) => {
                panic!(
                    "{context}: the model expected {expected:?}, the engine answered {submitted:?}"
                )
            }
        }
    }

    /// Whether a unit of the job has parts written and is not done, by its checkpoint.
    fn job_has_a_unit_part_way_written(&self, job_id: &str, context: &str) -> bool {
        let store = self.store();
        let records = JobRecord::load_all(store)
            .unwrap_or_else(|error| panic!("{context}: loading job records: {error}"));
        let Some(record) = records.iter().find(|record| record.id == job_id) else {
            return false;
        };
        (0..record.units.len()).any(|unit_index| {
            let checkpoint =
                UnitCheckpoint::load(store, job_id, unit_index).unwrap_or_else(|error| {
                    panic!("{context}: loading the checkpoint of unit {unit_index}: {error}")
                });
            !checkpoint.done
                && (!checkpoint.output.parts.is_empty() || !checkpoint.deleted.parts.is_empty())
        })
    }

    /// Waits until a unit of the job is part-way written, or the job is no longer in
    /// progress, or the completion deadline passes.
    fn wait_until_a_unit_is_part_way_written(&self, job_id: &str, context: &str) {
        let deadline = std::time::Instant::now() + JOB_COMPLETION_DEADLINE;
        while std::time::Instant::now() < deadline
            && !self.job_has_a_unit_part_way_written(job_id, context)
            && matches!(
                self.engine().status(job_id),
                Ok(JobStatus::InProgress { .. })
            )
        {
            std::thread::yield_now();
        }
    }

    fn run_interrupted_export_and_compare(
        &mut self,
        request: &ExportRequest,
        interruption: &InterruptionChoice,
        uninterrupted: &CompletedExport,
        context: &str,
    ) {
        let job_id = self
            .engine()
            .submit(request.clone(), KICK_OFF_URL.to_owned())
            .unwrap_or_else(|error| panic!("{context}: resubmitting failed: {error}"));
        match interruption.stop_point {
            StopPoint::AfterDelay { micros } => {
                std::thread::sleep(Duration::from_micros(micros));
            }
            StopPoint::OnceAUnitIsPartWayWritten => {
                self.wait_until_a_unit_is_part_way_written(&job_id, context);
            }
        }
        self.stop_engine();
        if self.job_has_a_unit_part_way_written(&job_id, context) {
            self.mid_unit_interruptions += 1;
        }
        for (commit_index, operations) in interruption.commits_while_stopped.iter().enumerate() {
            self.commit(
                operations,
                &format!("{context}: commit {commit_index} while the export was stopped"),
            );
        }
        if interruption.reopen_store_while_stopped {
            self.reopen_store();
        }
        self.engine_choice = interruption.resuming_engine;
        self.start_engine();
        let resumed = self.wait_for_completion(&job_id, context);
        assert_eq!(
            (
                resumed.record.transaction_time,
                resumed.record.max_resources_per_file
            ),
            (
                uninterrupted.record.transaction_time,
                uninterrupted.record.max_resources_per_file
            ),
            "{context}: transactionTime and part size of the resumed export"
        );
        assert_eq!(
            resumed.record.files, uninterrupted.record.files,
            "{context}: the resumed export's manifest differs from an uninterrupted run's"
        );
        assert_eq!(
            resumed.file_bytes, uninterrupted.file_bytes,
            "{context}: the resumed export's files differ from an uninterrupted run's"
        );
    }
}

/// Runs the scenario; returns how many of its interruptions stopped a job with a unit
/// part-way written.
pub fn run_export_scenario(scenario: &ExportScenario) -> usize {
    let mut run = ExportScenarioRun::new(scenario.engine);
    for (step_index, step) in scenario.history.iter().enumerate() {
        match step {
            HistoryStep::Commit {
                operations,
                pause_before,
            } => {
                if *pause_before {
                    std::thread::sleep(PAUSE_BEFORE_A_COMMIT);
                }
                run.commit(operations, &format!("history step {step_index}"));
            }
            HistoryStep::PatientsThenManyVersions {
                patient_contents,
                repeated_patient,
                times,
            } => {
                let puts: Vec<HistoryOperation> = PATIENT_IDS
                    .iter()
                    .zip(patient_contents)
                    .map(|(id, content)| HistoryOperation::Put {
                        target: ExportTarget {
                            kind: ExportTargetKind::Patient,
                            id,
                        },
                        content: content.clone(),
                    })
                    .collect();
                let repeated = puts[repeated_patient.index(puts.len())].clone();
                let operations: Vec<HistoryOperation> = puts
                    .into_iter()
                    .chain(std::iter::repeat_n(repeated, *times))
                    .collect();
                run.commit(&operations, &format!("history step {step_index}"));
            }
            HistoryStep::Restart => run.restart(),
        }
    }
    for (export_index, choice) in scenario.exports.iter().enumerate() {
        run.run_export_choice(choice, &format!("export {export_index}"));
    }
    run.mid_unit_interruptions
}

fn engine_error_answers_refusal(error: &ExportError, refusal: ExpectedRefusal) -> bool {
    match refusal {
        ExpectedRefusal::GroupMissingAtSnapshot => error.kind() == ExportErrorKind::NotFound,
        ExpectedRefusal::PatientOutsideTheLevel => error.kind() == ExportErrorKind::InvalidRequest,
    }
}

fn write_operation_for(operation: &HistoryOperation) -> WriteOperation {
    match operation {
        HistoryOperation::Put { target, content } => WriteOperation::Update {
            resource: prepare_resource_from_text(&content.body_json(*target).to_string()),
            expected_version: None,
            unchanged: UnchangedContent::NewVersion,
        },
        HistoryOperation::Delete { target } => WriteOperation::Delete {
            resource_type: target.resource_type(),
            id: target.resource_id(),
            expected_version: None,
        },
    }
}

/// Checks one completed export against the model: transactionTime, file names and
/// sizes, manifest counts, and every output and deleted line.
fn assert_export_matches_model(
    completed: &CompletedExport,
    expected: &ExpectedExport,
    max_resources_per_file: u64,
    context: &str,
) {
    let record = &completed.record;
    assert_eq!(
        record.transaction_time, expected.transaction_time,
        "{context}: transactionTime"
    );
    assert_eq!(
        record.max_resources_per_file, max_resources_per_file,
        "{context}: the job's part size"
    );
    let mut parts_so_far_by_stream: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut output_lines_by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut deleted_lines = Vec::new();
    let mut line_counts_by_name = BTreeMap::new();
    for (file, (name, bytes)) in record.files.iter().zip(&completed.file_bytes) {
        assert_eq!(
            &file.name, name,
            "{context}: files are read in manifest order"
        );
        let text = std::str::from_utf8(bytes)
            .unwrap_or_else(|error| panic!("{context}: {name} is not UTF-8: {error}"));
        assert!(
            text.ends_with('\n'),
            "{context}: {name} does not end with a newline"
        );
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert!(
            lines.iter().all(|line| !line.is_empty()),
            "{context}: {name} has an empty line"
        );
        assert_eq!(
            lines.len() as u64,
            file.count,
            "{context}: line count of {name}"
        );
        assert!(
            (1..=max_resources_per_file).contains(&file.count),
            "{context}: {name} holds {} lines; parts hold 1 to {max_resources_per_file}",
            file.count
        );
        line_counts_by_name.insert(name.clone(), file.count);
        let stream = match file.kind {
            FileKind::Output => (file.type_name.as_str(), file.type_name.as_str()),
            FileKind::Deleted => {
                assert_eq!(file.type_name, "Bundle", "{context}: type of {name}");
                ("Bundle", "deleted")
            }
            FileKind::Error => panic!("{context}: unexpected error file {name}"),
        };
        let part_number = parts_so_far_by_stream.entry(stream).or_insert(0);
        *part_number += 1;
        assert_eq!(
            name,
            &format!("{}-{part_number}.ndjson", stream.1),
            "{context}: parts of each stream are numbered from 1 without gaps"
        );
        match file.kind {
            FileKind::Output => output_lines_by_type
                .entry(file.type_name.clone())
                .or_default()
                .extend(lines.iter().map(|line| (*line).to_owned())),
            _ => deleted_lines.extend(lines.iter().map(|line| (*line).to_owned())),
        }
    }
    assert_eq!(
        record.files.len(),
        completed.file_bytes.len(),
        "{context}: one file per manifest entry"
    );
    assert_manifest_json_matches(record, &line_counts_by_name, expected, context);
    for (type_name, lines) in &mut output_lines_by_type {
        let mut ids = BTreeSet::new();
        for line in lines.iter() {
            let resource: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("{context}: output line is not JSON: {error}"));
            assert_eq!(
                resource["resourceType"].as_str(),
                Some(type_name.as_str()),
                "{context}: a line of a {type_name} file: {line}"
            );
            let id = resource["id"].as_str().unwrap_or_default().to_owned();
            assert!(
                ids.insert(id.clone()),
                "{context}: {type_name}/{id} is exported more than once"
            );
        }
        lines.sort();
    }
    assert_eq!(
        output_lines_by_type, expected.output_bodies_by_type,
        "{context}: output differs from the model"
    );
    let mut deleted_entries: Vec<(String, Instant)> = deleted_lines
        .iter()
        .map(|line| deleted_entry_of_bundle_line(line, context))
        .collect();
    deleted_entries.sort();
    let distinct_deleted_urls: BTreeSet<&String> =
        deleted_entries.iter().map(|(url, _)| url).collect();
    assert_eq!(
        distinct_deleted_urls.len(),
        deleted_entries.len(),
        "{context}: a resource is listed as deleted more than once: {deleted_entries:?}"
    );
    assert_eq!(
        deleted_entries, expected.deleted_entries,
        "{context}: deleted differs from the model"
    );
}

/// The `Type/id` and `meta.lastUpdated` of one line of a `deleted` file, which must be a
/// transaction Bundle with a single DELETE entry.
fn deleted_entry_of_bundle_line(line: &str, context: &str) -> (String, Instant) {
    let bundle: Value = serde_json::from_str(line)
        .unwrap_or_else(|error| panic!("{context}: deleted line is not JSON: {error}"));
    assert_eq!(
        (
            bundle["resourceType"].as_str(),
            bundle["type"].as_str(),
            bundle["entry"].as_array().map(Vec::len),
            bundle["entry"][0]["request"]["method"].as_str(),
        ),
        (Some("Bundle"), Some("transaction"), Some(1), Some("DELETE")),
        "{context}: deleted line {line}"
    );
    let url = bundle["entry"][0]["request"]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no request.url in {line}"))
        .to_owned();
    let deleted_at = bundle["meta"]["lastUpdated"]
        .as_str()
        .and_then(|text| Instant::parse(text).ok())
        .unwrap_or_else(|| panic!("{context}: no meta.lastUpdated instant in {line}"));
    (url, deleted_at)
}

fn assert_manifest_json_matches(
    record: &JobRecord,
    line_counts_by_name: &BTreeMap<String, u64>,
    expected: &ExpectedExport,
    context: &str,
) {
    let manifest_json = manifest(
        record,
        FileUrls::UnderPrefix(MANIFEST_FILE_URL_PREFIX),
        false,
    );
    assert_eq!(
        manifest_json["transactionTime"].as_str(),
        Some(expected.transaction_time.to_fhir_string().as_str()),
        "{context}: manifest transactionTime"
    );
    assert_eq!(
        manifest_json["error"].as_array().map(Vec::len),
        Some(0),
        "{context}: manifest error files"
    );
    let mut manifest_counts_by_name = BTreeMap::new();
    for section in ["output", "deleted"] {
        for item in manifest_json[section].as_array().into_iter().flatten() {
            let name = item["url"]
                .as_str()
                .and_then(|url| url.strip_prefix(&format!("{MANIFEST_FILE_URL_PREFIX}/")))
                .unwrap_or_else(|| panic!("{context}: manifest item {item} has no file url"))
                .to_owned();
            let expected_type = match section {
                "deleted" => "Bundle",
                _ => name.split('-').next().unwrap_or_default(),
            };
            assert_eq!(
                item["type"].as_str(),
                Some(expected_type),
                "{context}: type of manifest item {item}"
            );
            manifest_counts_by_name.insert(name, item["count"].as_u64().unwrap_or_default());
        }
    }
    assert_eq!(
        &manifest_counts_by_name, line_counts_by_name,
        "{context}: manifest counts differ from the files' line counts"
    );
}

fn reference_strategy(
    kind: ExportTargetKind,
    ids: &'static [&'static str],
) -> impl Strategy<Value = LiteralReferenceTo> + Clone {
    (select(ids), proptest::bool::weighted(0.2)).prop_map(move |(id, absolute)| {
        LiteralReferenceTo {
            target: ExportTarget { kind, id },
            absolute,
        }
    })
}

fn patient_reference_strategy() -> impl Strategy<Value = LiteralReferenceTo> + Clone {
    reference_strategy(ExportTargetKind::Patient, &PATIENT_IDS)
}

fn group_member_strategy() -> impl Strategy<Value = GroupMember> {
    let entity = prop_oneof![
        6 => patient_reference_strategy(),
        1 => reference_strategy(ExportTargetKind::Group, &GROUP_IDS),
    ];
    (entity, proptest::bool::weighted(0.25))
        .prop_map(|(entity, inactive)| GroupMember { entity, inactive })
}

fn content_strategy(kind: ExportTargetKind) -> BoxedStrategy<ExportContent> {
    match kind {
        ExportTargetKind::Patient => (
            any::<bool>(),
            proptest::option::of(select(vec!["male", "female"])),
            proptest::option::weighted(0.2, patient_reference_strategy()),
        )
            .prop_map(|(active, gender, linked_patient)| ExportContent::Patient {
                active,
                gender,
                linked_patient,
            })
            .boxed(),
        ExportTargetKind::Observation => (
            select(vec!["final", "amended"]),
            proptest::option::weighted(0.85, patient_reference_strategy()),
            proptest::collection::vec(
                prop_oneof![
                    3 => patient_reference_strategy(),
                    1 => reference_strategy(ExportTargetKind::Organization, &ORGANIZATION_IDS),
                ],
                0..=2,
            ),
        )
            .prop_map(|(status, subject, performers)| ExportContent::Observation {
                status,
                subject,
                performers,
            })
            .boxed(),
        ExportTargetKind::Encounter => (
            select(vec!["planned", "finished"]),
            patient_reference_strategy(),
        )
            .prop_map(|(status, subject)| ExportContent::Encounter { status, subject })
            .boxed(),
        ExportTargetKind::Organization => select(vec!["Acme Health", "Northwind Clinic"])
            .prop_map(|name| ExportContent::Organization { name })
            .boxed(),
        ExportTargetKind::Group => proptest::collection::vec(group_member_strategy(), 1..=5)
            .prop_map(|members| ExportContent::Group { members })
            .boxed(),
    }
}

fn target_strategy() -> impl Strategy<Value = ExportTarget> {
    prop_oneof![
        8 => select(every_export_target()),
        3 => Just(ExportTarget {
            kind: ExportTargetKind::Group,
            id: EXPORTED_GROUP_ID,
        }),
    ]
}

fn put_operation_strategy() -> impl Strategy<Value = HistoryOperation> {
    target_strategy().prop_flat_map(|target| {
        content_strategy(target.kind)
            .prop_map(move |content| HistoryOperation::Put { target, content })
    })
}

fn history_operation_strategy() -> impl Strategy<Value = HistoryOperation> {
    prop_oneof![
        4 => put_operation_strategy(),
        1 => select(every_export_target()).prop_map(|target| HistoryOperation::Delete { target }),
    ]
}

fn commit_operations_strategy() -> impl Strategy<Value = Vec<HistoryOperation>> {
    prop_oneof![
        4 => proptest::collection::vec(history_operation_strategy(), 1..=1),
        1 => proptest::collection::vec(history_operation_strategy(), 2..=3),
    ]
}

fn history_step_strategy() -> impl Strategy<Value = HistoryStep> {
    prop_oneof![
        12 => (commit_operations_strategy(), proptest::bool::weighted(0.25)).prop_map(
            |(operations, pause_before)| HistoryStep::Commit {
                operations,
                pause_before,
            }
        ),
        1 => Just(HistoryStep::Restart),
    ]
}

fn patients_then_many_versions_strategy() -> impl Strategy<Value = HistoryStep> {
    (
        proptest::collection::vec(
            content_strategy(ExportTargetKind::Patient),
            PATIENT_IDS.len(),
        ),
        any::<Index>(),
        REPEATED_PUTS,
    )
        .prop_map(|(patient_contents, repeated_patient, times)| {
            HistoryStep::PatientsThenManyVersions {
                patient_contents,
                repeated_patient,
                times,
            }
        })
}

/// A first commit, random steps, and usually a last step that gives the Patient unit a
/// long run of events after its first part (so most `since` choices keep it).
fn history_strategy() -> impl Strategy<Value = Vec<HistoryStep>> {
    (
        put_operation_strategy(),
        proptest::collection::vec(
            history_step_strategy(),
            MIN_HISTORY_STEPS_AFTER_THE_FIRST_COMMIT..=MAX_HISTORY_STEPS_AFTER_THE_FIRST_COMMIT,
        ),
        proptest::option::weighted(0.75, patients_then_many_versions_strategy()),
    )
        .prop_map(|(first_put, rest, last)| {
            let mut history = vec![HistoryStep::Commit {
                operations: vec![first_put],
                pause_before: false,
            }];
            history.extend(rest);
            history.extend(last);
            history
        })
}

fn engine_choice_strategy() -> impl Strategy<Value = EngineChoice> {
    (1usize..=2, 2u64..=3).prop_map(|(workers, max_resources_per_file)| EngineChoice {
        workers,
        max_resources_per_file,
    })
}

fn instant_choice_strategy() -> impl Strategy<Value = InstantChoice> {
    prop_oneof![
        1 => Just(InstantChoice::JustBeforeTheFirstCommit),
        4 => any::<Index>().prop_map(InstantChoice::AtCommit),
        2 => (any::<Index>(), 0u16..1000).prop_map(|(commit, per_mille_of_the_gap)| {
            InstantChoice::BetweenCommits {
                commit,
                per_mille_of_the_gap,
            }
        }),
    ]
}

fn exportable_types() -> Vec<ResourceType> {
    ExportTargetKind::ALL
        .iter()
        .map(|kind| kind.resource_type())
        .chain([ResourceType::parse("Condition").expect("an R4 type")])
        .collect()
}

fn interruption_strategy() -> impl Strategy<Value = InterruptionChoice> {
    let short_delays = 0..SHORT_DELAY_BEFORE_STOPPING_AN_EXPORT_MICROS;
    let long_delays =
        SHORT_DELAY_BEFORE_STOPPING_AN_EXPORT_MICROS..=MAX_DELAY_BEFORE_STOPPING_AN_EXPORT_MICROS;
    let delay = prop_oneof![
        2 => Just(0u64),
        2 => short_delays,
        1 => long_delays,
    ]
    .prop_map(|micros| StopPoint::AfterDelay { micros });
    (
        prop_oneof![
            1 => delay,
            1 => Just(StopPoint::OnceAUnitIsPartWayWritten),
        ],
        proptest::collection::vec(
            commit_operations_strategy(),
            0..=MAX_COMMITS_WHILE_AN_EXPORT_IS_STOPPED,
        ),
        any::<bool>(),
        engine_choice_strategy(),
    )
        .prop_map(
            |(stop_point, commits_while_stopped, reopen_store_while_stopped, resuming_engine)| {
                InterruptionChoice {
                    stop_point,
                    commits_while_stopped,
                    reopen_store_while_stopped,
                    resuming_engine,
                }
            },
        )
}

fn export_choice_strategy() -> impl Strategy<Value = ExportChoice> {
    (
        prop_oneof![
            1 => Just(LevelChoice::System),
            1 => Just(LevelChoice::AllPatients),
            2 => Just(LevelChoice::ExportedGroup),
        ],
        proptest::option::weighted(0.35, subsequence(exportable_types(), 1..=4)),
        proptest::option::weighted(0.6, instant_choice_strategy()),
        proptest::option::weighted(0.4, instant_choice_strategy()),
        proptest::option::weighted(
            0.3,
            (
                proptest::collection::vec(any::<bool>(), PATIENT_IDS.len()),
                proptest::bool::weighted(0.85),
            )
                .prop_map(|(chosen_by_patient_index, restrict_to_level_members)| {
                    PatientsChoice {
                        chosen_by_patient_index,
                        restrict_to_level_members,
                    }
                }),
        ),
        proptest::option::weighted(0.4, interruption_strategy()),
    )
        .prop_map(
            |(level, types, since, until, patients, interruption)| ExportChoice {
                level,
                types,
                since,
                until,
                patients,
                interruption,
            },
        )
}

/// An interruption that waits until a unit is part-way written before stopping.
fn part_way_interruption_strategy() -> impl Strategy<Value = InterruptionChoice> {
    interruption_strategy().prop_map(|interruption| InterruptionChoice {
        stop_point: StopPoint::OnceAUnitIsPartWayWritten,
        ..interruption
    })
}

/// Random exports; after a history that ends with a long run of Patient versions, also a
/// system export of everything interrupted once its Patient unit is part-way written.
fn export_scenario_strategy() -> impl Strategy<Value = ExportScenario> {
    (
        engine_choice_strategy(),
        history_strategy(),
        proptest::collection::vec(export_choice_strategy(), 1..=MAX_EXPORTS_PER_SCENARIO),
        part_way_interruption_strategy(),
    )
        .prop_map(|(engine, history, mut exports, part_way_interruption)| {
            if matches!(
                history.last(),
                Some(HistoryStep::PatientsThenManyVersions { .. })
            ) {
                exports.push(ExportChoice {
                    level: LevelChoice::System,
                    types: None,
                    since: None,
                    until: None,
                    patients: None,
                    interruption: Some(part_way_interruption),
                });
            }
            ExportScenario {
                engine,
                history,
                exports,
            }
        })
}

/// Every case agrees with the model, and across the cases at least one interruption
/// stopped a job with a unit part-way written, so every run resumes from a part
/// checkpoint.
#[test]
fn exports_match_the_snapshot_model_across_restarts_and_resumptions() {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: EXPORT_SCENARIO_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let mid_unit_interruptions = AtomicUsize::new(0);
    let outcome = runner.run(&export_scenario_strategy(), |scenario| {
        let stopped_mid_unit = run_export_scenario(&scenario);
        mid_unit_interruptions.fetch_add(stopped_mid_unit, Ordering::Relaxed);
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    assert!(
        mid_unit_interruptions.load(Ordering::Relaxed) > 0,
        "no interruption in {EXPORT_SCENARIO_CASES} cases stopped a job part-way through a unit"
    );
}
