//! The in-memory model of the store: what every read should return after a sequence of
//! commits, and what each commit request should answer, computed without the store.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use fhirlog::fhir::canonical::{DEFAULT_MAX_JSON_DEPTH, ParsedResource};
use fhirlog::fhir::{Instant, LocalBase, ResourceId, ResourceType};
use fhirlog::store::{PreparedResource, UnchangedContent, WriteOperation, WriteRejection};
use serde_json::Value;

pub const PATIENT_IDS: [&str; 4] = ["p1", "p2", "p3", "p4"];
pub const OBSERVATION_IDS: [&str; 4] = ["o1", "o2", "o3", "o4"];
pub const ENCOUNTER_IDS: [&str; 3] = ["e1", "e2", "e3"];

const CLIENT_PROFILE_URL: &str = "http://example.org/fhir/StructureDefinition/proptest";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetKind {
    Patient,
    Observation,
    Encounter,
}

impl TargetKind {
    pub fn type_name(self) -> &'static str {
        match self {
            TargetKind::Patient => "Patient",
            TargetKind::Observation => "Observation",
            TargetKind::Encounter => "Encounter",
        }
    }

    pub fn resource_type(self) -> ResourceType {
        ResourceType::parse(self.type_name()).expect("the model only uses R4 resource types")
    }
}

/// One (type, id) of the small id space every generated operation picks from.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceTarget {
    pub kind: TargetKind,
    pub id: &'static str,
}

impl fmt::Debug for ResourceTarget {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.kind.type_name(), self.id)
    }
}

impl ResourceTarget {
    pub fn resource_type(self) -> ResourceType {
        self.kind.resource_type()
    }

    pub fn resource_id(self) -> ResourceId {
        ResourceId::parse(self.id).expect("the model only uses valid ids")
    }
}

pub fn every_resource_target() -> Vec<ResourceTarget> {
    let patients = PATIENT_IDS.iter().map(|id| ResourceTarget {
        kind: TargetKind::Patient,
        id,
    });
    let observations = OBSERVATION_IDS.iter().map(|id| ResourceTarget {
        kind: TargetKind::Observation,
        id,
    });
    let encounters = ENCOUNTER_IDS.iter().map(|id| ResourceTarget {
        kind: TargetKind::Encounter,
        id,
    });
    patients.chain(observations).chain(encounters).collect()
}

/// What an Observation's or Encounter's `subject` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectReference {
    Patient(&'static str),
    /// `Patient/{id}/_history/{version}`: in the compartment of `id` like a plain reference.
    PatientVersion(&'static str, u8),
    /// `Patient/{id}` followed by a NUL and more text: not a valid id, so in no compartment,
    /// and it must not disturb the compartment of `id`, whose key it starts with.
    PatientIdWithNul(&'static str),
    Group,
}

impl SubjectReference {
    fn json_text(self) -> String {
        match self {
            SubjectReference::Patient(patient_id) => {
                format!(r#"{{"reference":"Patient/{patient_id}"}}"#)
            }
            SubjectReference::PatientVersion(patient_id, version) => {
                format!(r#"{{"reference":"Patient/{patient_id}/_history/{version}"}}"#)
            }
            SubjectReference::PatientIdWithNul(patient_id) => {
                format!(r#"{{"reference":"Patient/{patient_id}\u0000x"}}"#)
            }
            SubjectReference::Group => r#"{"reference":"Group/g1"}"#.to_owned(),
        }
    }
}

/// The content a client sends, apart from `resourceType`, `id` and server metadata. Field
/// values are raw JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceContent {
    pub scalar_fields: Vec<(&'static str, &'static str)>,
    pub subject: Option<SubjectReference>,
    pub has_client_profile: bool,
}

impl ResourceContent {
    pub fn minimal(kind: TargetKind) -> ResourceContent {
        let scalar_fields = match kind {
            TargetKind::Patient => vec![("active", "true")],
            TargetKind::Observation => vec![("status", r#""final""#)],
            TargetKind::Encounter => vec![("status", r#""planned""#)],
        };
        ResourceContent {
            scalar_fields,
            subject: None,
            has_client_profile: false,
        }
    }
}

/// How one copy of a body travels: with bogus client `meta.versionId`/`meta.lastUpdated`
/// (which the server must drop) or not, and in which key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmission {
    pub sends_server_metadata: bool,
    pub key_order_seed: u64,
}

impl Transmission {
    pub const PLAIN: Transmission = Transmission {
        sends_server_metadata: false,
        key_order_seed: 0,
    };
}

pub fn render_body_text(
    target: ResourceTarget,
    content: &ResourceContent,
    transmission: Transmission,
) -> String {
    let mut entries: Vec<(&str, String)> = vec![
        ("resourceType", format!("\"{}\"", target.kind.type_name())),
        ("id", format!("\"{}\"", target.id)),
    ];
    let mut meta_entries = Vec::new();
    if transmission.sends_server_metadata {
        meta_entries.push(r#""versionId":"999""#.to_owned());
        meta_entries.push(r#""lastUpdated":"2001-02-03T04:05:06Z""#.to_owned());
    }
    if content.has_client_profile {
        meta_entries.push(format!(r#""profile":["{CLIENT_PROFILE_URL}"]"#));
    }
    if !meta_entries.is_empty() {
        entries.push(("meta", format!("{{{}}}", meta_entries.join(","))));
    }
    for (key, raw_value) in &content.scalar_fields {
        entries.push((key, (*raw_value).to_owned()));
    }
    if let Some(subject) = content.subject {
        entries.push(("subject", subject.json_text()));
    }
    let key_order_hasher = BuildHasherDefault::<DefaultHasher>::default();
    entries.sort_by_key(|(key, _)| key_order_hasher.hash_one((transmission.key_order_seed, *key)));
    let members: Vec<String> = entries
        .iter()
        .map(|(key, raw_value)| format!("\"{key}\":{raw_value}"))
        .collect();
    format!("{{{}}}", members.join(","))
}

/// The JSON a stored body must hold once `meta.versionId` and `meta.lastUpdated` are
/// removed (and `meta` with them when nothing else is left in it).
pub fn expected_content_json(target: ResourceTarget, content: &ResourceContent) -> Value {
    let text = render_body_text(target, content, Transmission::PLAIN);
    let value = serde_json::from_str(&text).expect("rendered bodies are valid JSON");
    without_server_metadata(value)
}

pub fn without_server_metadata(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        let meta_is_now_empty = match object.get_mut("meta").and_then(Value::as_object_mut) {
            Some(meta) => {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                meta.is_empty()
            }
            None => false,
        };
        if meta_is_now_empty {
            object.remove("meta");
        }
    }
    value
}

/// Goes through the production path: bytes → `ParsedResource` → `PreparedResource`.
pub fn prepare_resource_from_text(text: &str) -> PreparedResource {
    let parsed = ParsedResource::parse_bytes(text.as_bytes(), DEFAULT_MAX_JSON_DEPTH)
        .unwrap_or_else(|error| panic!("generated body {text} was refused: {error}"));
    let id = parsed
        .id
        .clone()
        .expect("generated bodies always carry an id");
    PreparedResource::new(
        parsed.resource_type,
        id,
        parsed.json,
        &LocalBase::at(crate::export_model::ABSOLUTE_REFERENCE_BASE),
    )
}

#[derive(Debug, Clone)]
pub enum BodyChoice {
    Fresh(ResourceContent),
    /// The content the resource has at that point of the request, sent again.
    RepeatCurrent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMatch {
    Absent,
    /// The live version at that point of the request (1 if there is none, which conflicts).
    CurrentVersion,
    Version(u64),
}

/// One generated operation of a commit request, resolved against the model when it runs.
#[derive(Debug, Clone)]
pub enum RequestOperation {
    Update {
        target: ResourceTarget,
        body: BodyChoice,
        transmission: Transmission,
        if_match: IfMatch,
        unchanged: UnchangedContent,
    },
    Create {
        target: ResourceTarget,
        content: ResourceContent,
        transmission: Transmission,
    },
    Delete {
        target: ResourceTarget,
        if_match: IfMatch,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PredictedOutcome {
    Created {
        target: ResourceTarget,
        version: u64,
        content: ResourceContent,
    },
    Updated {
        target: ResourceTarget,
        version: u64,
        content: ResourceContent,
    },
    Unchanged {
        target: ResourceTarget,
        version: u64,
    },
    Deleted {
        target: ResourceTarget,
        version: u64,
    },
    NothingToDelete,
}

impl PredictedOutcome {
    /// The version this outcome appends to the log, if any.
    pub fn appended_version(&self) -> Option<(ResourceTarget, u64, Option<&ResourceContent>)> {
        match self {
            PredictedOutcome::Created {
                target,
                version,
                content,
            }
            | PredictedOutcome::Updated {
                target,
                version,
                content,
            } => Some((*target, *version, Some(content))),
            PredictedOutcome::Deleted { target, version } => Some((*target, *version, None)),
            PredictedOutcome::Unchanged { .. } | PredictedOutcome::NothingToDelete => None,
        }
    }
}

/// A request turned into the store's operations, with what the model says it must answer.
#[derive(Debug, Clone)]
pub struct ResolvedRequest {
    pub operations: Vec<WriteOperation>,
    pub prediction: Result<Vec<PredictedOutcome>, WriteRejection>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVersion {
    pub version: u64,
    pub seq: u64,
    pub last_updated: Instant,
    /// `None` for a delete.
    pub content: Option<ResourceContent>,
}

/// One commit that appended events: its instant and the seq of its last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCommit {
    pub instant: Instant,
    pub last_seq: u64,
}

/// A version the store appended, with the seq and instant it reported.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    pub target: ResourceTarget,
    pub version: u64,
    pub seq: u64,
    pub last_updated: Instant,
    pub content: Option<ResourceContent>,
}

#[derive(Debug, Clone, Default)]
pub struct StoreModel {
    pub versions_by_target: BTreeMap<ResourceTarget, Vec<ModelVersion>>,
    pub compartment_members_by_patient: BTreeMap<&'static str, BTreeSet<ResourceTarget>>,
    pub commits: Vec<ModelCommit>,
}

/// The newest version of a resource as seen inside one request: its number and its content
/// (`None` once deleted).
type RequestLocalState = (u64, Option<ResourceContent>);

impl StoreModel {
    pub fn last_seq(&self) -> u64 {
        self.commits.last().map_or(0, |commit| commit.last_seq)
    }

    pub fn last_commit_instant(&self) -> Option<Instant> {
        self.commits.last().map(|commit| commit.instant)
    }

    pub fn versions_of(&self, target: ResourceTarget) -> &[ModelVersion] {
        self.versions_by_target
            .get(&target)
            .map_or(&[], Vec::as_slice)
    }

    fn newest_state(&self, target: ResourceTarget) -> Option<RequestLocalState> {
        self.versions_of(target)
            .last()
            .map(|newest| (newest.version, newest.content.clone()))
    }

    /// Builds the store operations for `request` and predicts the store's answer, treating
    /// the request as all-or-nothing and each operation as seeing the earlier ones.
    pub fn resolve_request(&self, request: &[RequestOperation]) -> ResolvedRequest {
        let mut request_states: BTreeMap<ResourceTarget, RequestLocalState> = BTreeMap::new();
        let mut operations = Vec::with_capacity(request.len());
        let mut outcomes = Vec::with_capacity(request.len());
        let mut rejection: Option<WriteRejection> = None;
        for operation in request {
            let target = match operation {
                RequestOperation::Update { target, .. }
                | RequestOperation::Create { target, .. }
                | RequestOperation::Delete { target, .. } => *target,
            };
            let state = request_states
                .get(&target)
                .cloned()
                .or_else(|| self.newest_state(target));
            let live = state
                .clone()
                .and_then(|(version, content)| content.map(|content| (version, content)));
            let live_version = live.as_ref().map(|(version, _)| *version);
            let next_version = state.as_ref().map_or(1, |(version, _)| version + 1);
            let resolve_if_match = |if_match: IfMatch| match if_match {
                IfMatch::Absent => None,
                IfMatch::CurrentVersion => Some(live_version.unwrap_or(1)),
                IfMatch::Version(version) => Some(version),
            };
            let conflict = |expected_version: Option<u64>| match expected_version {
                Some(expected_version) if live_version != Some(expected_version) => {
                    Some(WriteRejection::VersionConflict {
                        resource_type: target.resource_type(),
                        id: target.resource_id(),
                        expected_version,
                        current_version: live_version,
                    })
                }
                _ => None,
            };
            match operation {
                RequestOperation::Update {
                    body,
                    transmission,
                    if_match,
                    unchanged,
                    ..
                } => {
                    let content = match body {
                        BodyChoice::Fresh(content) => content.clone(),
                        BodyChoice::RepeatCurrent => match &live {
                            Some((_, content)) => content.clone(),
                            None => ResourceContent::minimal(target.kind),
                        },
                    };
                    let expected_version = resolve_if_match(*if_match);
                    operations.push(WriteOperation::Update {
                        resource: prepare_resource_from_text(&render_body_text(
                            target,
                            &content,
                            *transmission,
                        )),
                        expected_version,
                        unchanged: *unchanged,
                    });
                    if rejection.is_some() {
                        continue;
                    }
                    if let Some(refused) = conflict(expected_version) {
                        rejection = Some(refused);
                        continue;
                    }
                    if *unchanged == UnchangedContent::Skip
                        && let Some((version, live_content)) = &live
                        && expected_content_json(target, live_content)
                            == expected_content_json(target, &content)
                    {
                        outcomes.push(PredictedOutcome::Unchanged {
                            target,
                            version: *version,
                        });
                        continue;
                    }
                    outcomes.push(if live.is_some() {
                        PredictedOutcome::Updated {
                            target,
                            version: next_version,
                            content: content.clone(),
                        }
                    } else {
                        PredictedOutcome::Created {
                            target,
                            version: next_version,
                            content: content.clone(),
                        }
                    });
                    request_states.insert(target, (next_version, Some(content)));
                }
                RequestOperation::Create {
                    content,
                    transmission,
                    ..
                } => {
                    operations.push(WriteOperation::Create(prepare_resource_from_text(
                        &render_body_text(target, content, *transmission),
                    )));
                    if rejection.is_some() {
                        continue;
                    }
                    if state.is_some() {
                        rejection = Some(WriteRejection::AlreadyExists {
                            resource_type: target.resource_type(),
                            id: target.resource_id(),
                        });
                        continue;
                    }
                    outcomes.push(PredictedOutcome::Created {
                        target,
                        version: 1,
                        content: content.clone(),
                    });
                    request_states.insert(target, (1, Some(content.clone())));
                }
                RequestOperation::Delete { if_match, .. } => {
                    let expected_version = resolve_if_match(*if_match);
                    operations.push(WriteOperation::Delete {
                        resource_type: target.resource_type(),
                        id: target.resource_id(),
                        expected_version,
                    });
                    if rejection.is_some() {
                        continue;
                    }
                    if let Some(refused) = conflict(expected_version) {
                        rejection = Some(refused);
                        continue;
                    }
                    if live.is_none() {
                        outcomes.push(PredictedOutcome::NothingToDelete);
                        continue;
                    }
                    outcomes.push(PredictedOutcome::Deleted {
                        target,
                        version: next_version,
                    });
                    request_states.insert(target, (next_version, None));
                }
            }
        }
        ResolvedRequest {
            operations,
            prediction: match rejection {
                Some(refused) => Err(refused),
                None => Ok(outcomes),
            },
        }
    }

    /// Records the events of one commit, in log order.
    pub fn record_commit(&mut self, events: Vec<RecordedEvent>) {
        let Some(last_event) = events.last() else {
            return;
        };
        self.commits.push(ModelCommit {
            instant: last_event.last_updated,
            last_seq: last_event.seq,
        });
        for event in events {
            if let Some(content) = &event.content {
                for patient_id in compartment_patients_of(event.target, content) {
                    self.compartment_members_by_patient
                        .entry(patient_id)
                        .or_default()
                        .insert(event.target);
                }
            }
            self.versions_by_target
                .entry(event.target)
                .or_default()
                .push(ModelVersion {
                    version: event.version,
                    seq: event.seq,
                    last_updated: event.last_updated,
                    content: event.content,
                });
        }
    }

    /// Records a predicted commit with made-up seqs and instants, for predicting the
    /// requests queued behind it.
    pub fn record_prediction_without_log_positions(&mut self, outcomes: &[PredictedOutcome]) {
        let events = outcomes
            .iter()
            .filter_map(PredictedOutcome::appended_version)
            .map(|(target, version, content)| RecordedEvent {
                target,
                version,
                seq: 0,
                last_updated: Instant::from_micros_since_epoch(0),
                content: content.cloned(),
            })
            .collect();
        self.record_commit(events);
    }
}

/// The patients whose compartment a version with `content` is in: a Patient is in its own,
/// anything else in the one its `subject` references.
pub fn compartment_patients_of(
    target: ResourceTarget,
    content: &ResourceContent,
) -> Vec<&'static str> {
    match (target.kind, content.subject) {
        (TargetKind::Patient, _) => vec![target.id],
        (
            _,
            Some(
                SubjectReference::Patient(patient_id)
                | SubjectReference::PatientVersion(patient_id, _),
            ),
        ) => vec![patient_id],
        (_, Some(SubjectReference::PatientIdWithNul(_) | SubjectReference::Group) | None) => {
            Vec::new()
        }
    }
}
