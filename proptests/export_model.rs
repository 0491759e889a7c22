//! The model of `$export` snapshot semantics: a small id space of Patients, Observations,
//! Encounters, Organizations and Groups, every version committed to it, and what an export
//! request must produce, computed from that recorded history alone (never from the store's
//! indexes or the engine's plan).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::LazyLock;

use fhirlog::export::{ExportLevel, ExportRequest};
use fhirlog::fhir::{Instant, ResourceId, ResourceType};
use serde_json::{Value, json};

use crate::store_model::{ENCOUNTER_IDS, PATIENT_IDS, without_server_metadata};

pub const EXPORT_OBSERVATION_IDS: [&str; 5] = ["o1", "o2", "o3", "o4", "o5"];
pub const ORGANIZATION_IDS: [&str; 2] = ["org1", "org2"];
pub const EXPORTED_GROUP_ID: &str = "g1";
pub const NESTED_GROUP_ID: &str = "g2";
pub const GROUP_IDS: [&str; 2] = [EXPORTED_GROUP_ID, NESTED_GROUP_ID];

/// The server's base URL as writes and exports are told it: absolute references under it
/// name the same resources as relative ones.
pub const ABSOLUTE_REFERENCE_BASE: &str = "http://example.org/fhir";

const PATIENT_COMPARTMENT_DEFINITION_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fhir-r4/compartmentdefinition-patient.json"
);

/// The R4 Patient CompartmentDefinition as the specification publishes it: each resource
/// type listed with at least one `param`, and the names of those search parameters. A type
/// listed without a `param` cannot be in a patient's compartment.
struct PatientCompartmentDefinition {
    param_names_by_type_name: BTreeMap<String, Vec<String>>,
}

impl PatientCompartmentDefinition {
    fn read() -> PatientCompartmentDefinition {
        let text =
            std::fs::read_to_string(PATIENT_COMPARTMENT_DEFINITION_PATH).unwrap_or_else(|error| {
                panic!("reading {PATIENT_COMPARTMENT_DEFINITION_PATH}: {error}")
            });
        let definition: Value = serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!("{PATIENT_COMPARTMENT_DEFINITION_PATH} is not JSON: {error}")
        });
        let listed_resources = definition["resource"].as_array().unwrap_or_else(|| {
            panic!("{PATIENT_COMPARTMENT_DEFINITION_PATH} has no resource array")
        });
        let mut param_names_by_type_name = BTreeMap::new();
        for listed in listed_resources {
            let type_name = listed["code"].as_str().unwrap_or_else(|| {
                panic!("{PATIENT_COMPARTMENT_DEFINITION_PATH}: a resource without a code")
            });
            let param_names: Vec<String> = listed["param"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|param| {
                    param.as_str().map(str::to_owned).unwrap_or_else(|| {
                        panic!("{PATIENT_COMPARTMENT_DEFINITION_PATH}: {type_name} has a non-string param")
                    })
                })
                .collect();
            if !param_names.is_empty() {
                param_names_by_type_name.insert(type_name.to_owned(), param_names);
            }
        }
        PatientCompartmentDefinition {
            param_names_by_type_name,
        }
    }

    fn get() -> &'static PatientCompartmentDefinition {
        static DEFINITION: LazyLock<PatientCompartmentDefinition> =
            LazyLock::new(PatientCompartmentDefinition::read);
        &DEFINITION
    }

    /// Whether resources of `type_name` can be in a patient's compartment. Patient is, as
    /// the resource that defines the compartment, whether or not it is listed.
    fn covers_type(&self, type_name: &str) -> bool {
        type_name == "Patient" || self.param_names_by_type_name.contains_key(type_name)
    }

    fn param_names_of(&self, type_name: &str) -> &[String] {
        self.param_names_by_type_name
            .get(type_name)
            .map_or(&[], Vec::as_slice)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExportTargetKind {
    Patient,
    Observation,
    Encounter,
    Organization,
    Group,
}

impl ExportTargetKind {
    pub const ALL: [ExportTargetKind; 5] = [
        ExportTargetKind::Patient,
        ExportTargetKind::Observation,
        ExportTargetKind::Encounter,
        ExportTargetKind::Organization,
        ExportTargetKind::Group,
    ];

    pub fn type_name(self) -> &'static str {
        match self {
            ExportTargetKind::Patient => "Patient",
            ExportTargetKind::Observation => "Observation",
            ExportTargetKind::Encounter => "Encounter",
            ExportTargetKind::Organization => "Organization",
            ExportTargetKind::Group => "Group",
        }
    }

    pub fn resource_type(self) -> ResourceType {
        ResourceType::parse(self.type_name()).expect("the model only uses R4 resource types")
    }

    pub fn ids(self) -> &'static [&'static str] {
        match self {
            ExportTargetKind::Patient => &PATIENT_IDS,
            ExportTargetKind::Observation => &EXPORT_OBSERVATION_IDS,
            ExportTargetKind::Encounter => &ENCOUNTER_IDS,
            ExportTargetKind::Organization => &ORGANIZATION_IDS,
            ExportTargetKind::Group => &GROUP_IDS,
        }
    }
}

/// One (type, id) of the id space the generated histories write to.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExportTarget {
    pub kind: ExportTargetKind,
    pub id: &'static str,
}

impl fmt::Debug for ExportTarget {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.kind.type_name(), self.id)
    }
}

impl ExportTarget {
    pub fn resource_type(self) -> ResourceType {
        self.kind.resource_type()
    }

    pub fn resource_id(self) -> ResourceId {
        ResourceId::parse(self.id).expect("the model only uses valid ids")
    }

    pub fn relative_url(self) -> String {
        format!("{}/{}", self.kind.type_name(), self.id)
    }
}

pub fn every_export_target() -> Vec<ExportTarget> {
    ExportTargetKind::ALL
        .iter()
        .flat_map(|kind| kind.ids().iter().map(|id| ExportTarget { kind: *kind, id }))
        .collect()
}

/// A literal reference, written relative (`Patient/p1`) or absolute
/// (`http://example.org/fhir/Patient/p1`); both name the same resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralReferenceTo {
    pub target: ExportTarget,
    pub absolute: bool,
}

impl LiteralReferenceTo {
    fn json(self) -> Value {
        let relative = self.target.relative_url();
        let reference = if self.absolute {
            format!("{ABSOLUTE_REFERENCE_BASE}/{relative}")
        } else {
            relative
        };
        json!({ "reference": reference })
    }

    fn patient_id(self) -> Option<&'static str> {
        (self.target.kind == ExportTargetKind::Patient).then_some(self.target.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// A Patient or a Group.
    pub entity: LiteralReferenceTo,
    pub inactive: bool,
}

/// The content of one live version, apart from `resourceType`, `id` and server metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportContent {
    Patient {
        active: bool,
        gender: Option<&'static str>,
        /// `link.other`: puts this Patient in the linked patient's compartment too.
        linked_patient: Option<LiteralReferenceTo>,
    },
    Observation {
        status: &'static str,
        subject: Option<LiteralReferenceTo>,
        /// Patients or Organizations.
        performers: Vec<LiteralReferenceTo>,
    },
    Encounter {
        status: &'static str,
        subject: LiteralReferenceTo,
    },
    Organization {
        name: &'static str,
    },
    Group {
        members: Vec<GroupMember>,
    },
}

impl ExportContent {
    /// The resource as a client sends it.
    pub fn body_json(&self, target: ExportTarget) -> Value {
        let mut body = json!({
            "resourceType": target.kind.type_name(),
            "id": target.id,
        });
        let fields = body.as_object_mut().expect("built as an object");
        match self {
            ExportContent::Patient {
                active,
                gender,
                linked_patient,
            } => {
                fields.insert("active".to_owned(), json!(active));
                if let Some(gender) = gender {
                    fields.insert("gender".to_owned(), json!(gender));
                }
                if let Some(linked_patient) = linked_patient {
                    fields.insert(
                        "link".to_owned(),
                        json!([{"other": linked_patient.json(), "type": "seealso"}]),
                    );
                }
            }
            ExportContent::Observation {
                status,
                subject,
                performers,
            } => {
                fields.insert("status".to_owned(), json!(status));
                fields.insert("code".to_owned(), json!({"text": "weight"}));
                if let Some(subject) = subject {
                    fields.insert("subject".to_owned(), subject.json());
                }
                if !performers.is_empty() {
                    let performers: Vec<Value> = performers
                        .iter()
                        .map(|performer| performer.json())
                        .collect();
                    fields.insert("performer".to_owned(), Value::Array(performers));
                }
            }
            ExportContent::Encounter { status, subject } => {
                fields.insert("status".to_owned(), json!(status));
                fields.insert("class".to_owned(), json!({"code": "AMB"}));
                fields.insert("subject".to_owned(), subject.json());
            }
            ExportContent::Organization { name } => {
                fields.insert("name".to_owned(), json!(name));
            }
            ExportContent::Group { members } => {
                fields.insert("type".to_owned(), json!("person"));
                fields.insert("actual".to_owned(), json!(true));
                if !members.is_empty() {
                    let members: Vec<Value> = members
                        .iter()
                        .map(|member| {
                            let mut entry = json!({ "entity": member.entity.json() });
                            if member.inactive {
                                entry["inactive"] = json!(true);
                            }
                            entry
                        })
                        .collect();
                    fields.insert("member".to_owned(), Value::Array(members));
                }
            }
        }
        body
    }

    /// The references this content writes into the element that search parameter
    /// `param_name` of its type searches: `subject` is `subject`, `performer` is
    /// `performer[]`, `link` is `link[].other` and `member` is `member[].entity` (inactive
    /// members included). `None` when the generator writes no such element for this type.
    fn references_searched_by(&self, param_name: &str) -> Option<Vec<LiteralReferenceTo>> {
        match (self, param_name) {
            (ExportContent::Patient { linked_patient, .. }, "link") => {
                Some(linked_patient.iter().copied().collect())
            }
            (ExportContent::Observation { subject, .. }, "subject") => {
                Some(subject.iter().copied().collect())
            }
            (ExportContent::Observation { performers, .. }, "performer") => {
                Some(performers.clone())
            }
            (ExportContent::Encounter { subject, .. }, "subject") => Some(vec![*subject]),
            (ExportContent::Group { members }, "member") => {
                Some(members.iter().map(|member| member.entity).collect())
            }
            _ => None,
        }
    }

    /// The patients whose R4 compartment a version with this content is in: a Patient is
    /// in its own; any resource is in the compartment of each Patient it references through
    /// a `param` the Patient CompartmentDefinition lists for its type.
    pub fn compartment_patients(&self, target: ExportTarget) -> BTreeSet<&'static str> {
        let type_name = target.kind.type_name();
        let mut patients = BTreeSet::new();
        if target.kind == ExportTargetKind::Patient {
            patients.insert(target.id);
        }
        for param_name in PatientCompartmentDefinition::get().param_names_of(type_name) {
            let references = self.references_searched_by(param_name).unwrap_or_else(|| {
                panic!(
                    "the compartment definition lists {type_name}.{param_name}, which the model \
                     does not map to an element the generator writes"
                )
            });
            patients.extend(
                references
                    .iter()
                    .filter_map(|reference| reference.patient_id()),
            );
        }
        patients
    }
}

/// Whether `stored_body` holds exactly `content` once server metadata is removed.
pub fn stored_body_holds_content(
    stored_body: &str,
    target: ExportTarget,
    content: &ExportContent,
) -> bool {
    serde_json::from_str::<Value>(stored_body)
        .is_ok_and(|parsed| without_server_metadata(parsed) == content.body_json(target))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedVersion {
    pub version: u64,
    pub last_updated: Instant,
    /// The content and the stored canonical body; `None` for a delete.
    pub live: Option<(ExportContent, String)>,
}

/// Every version committed so far, and the instant of every commit that appended one.
#[derive(Debug, Clone, Default)]
pub struct ExportHistory {
    pub versions_by_target: BTreeMap<ExportTarget, Vec<RecordedVersion>>,
    pub commit_instants: Vec<Instant>,
}

/// Why the engine must refuse a request, by the error it answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedRefusal {
    /// `ExportError::NotFound`: the Group does not exist as of the snapshot.
    GroupMissingAtSnapshot,
    /// `ExportError::InvalidRequest`: a `patient` is not a member of the level.
    PatientOutsideTheLevel,
}

/// What a completed export must hold. Output bodies and deleted entries are sorted, so
/// two exports compare equal exactly when they hold the same lines the same number of times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedExport {
    pub transaction_time: Instant,
    pub output_bodies_by_type: BTreeMap<String, Vec<String>>,
    /// (`Type/id`, instant of the delete).
    pub deleted_entries: Vec<(String, Instant)>,
}

impl ExportHistory {
    pub fn versions_of(&self, target: ExportTarget) -> &[RecordedVersion] {
        self.versions_by_target
            .get(&target)
            .map_or(&[], Vec::as_slice)
    }

    pub fn newest_version_number(&self, target: ExportTarget) -> u64 {
        self.versions_of(target)
            .last()
            .map_or(0, |newest| newest.version)
    }

    pub fn last_commit_instant(&self) -> Option<Instant> {
        self.commit_instants.last().copied()
    }

    pub fn record_commit(
        &mut self,
        instant: Instant,
        versions: Vec<(ExportTarget, RecordedVersion)>,
    ) {
        if versions.is_empty() {
            return;
        }
        self.commit_instants.push(instant);
        for (target, version) in versions {
            self.versions_by_target
                .entry(target)
                .or_default()
                .push(version);
        }
    }

    /// The index of the version of `target` current as of `snapshot` (the newest one
    /// written at or before it, or the newest of all without a snapshot instant).
    fn version_index_as_of(
        &self,
        target: ExportTarget,
        snapshot: Option<Instant>,
    ) -> Option<usize> {
        self.versions_of(target)
            .iter()
            .rposition(|version| snapshot.is_none_or(|until| version.last_updated <= until))
    }

    fn live_content_as_of(
        &self,
        target: ExportTarget,
        snapshot: Option<Instant>,
    ) -> Option<&ExportContent> {
        let index = self.version_index_as_of(target, snapshot)?;
        self.versions_of(target)[index]
            .live
            .as_ref()
            .map(|(content, _)| content)
    }

    pub fn patients_live_as_of(&self, snapshot: Option<Instant>) -> BTreeSet<&'static str> {
        PATIENT_IDS
            .iter()
            .copied()
            .filter(|patient_id| {
                let target = ExportTarget {
                    kind: ExportTargetKind::Patient,
                    id: patient_id,
                };
                self.live_content_as_of(target, snapshot).is_some()
            })
            .collect()
    }

    /// The active Patient members of Group `group_id` as of `snapshot`, following active
    /// nested Groups that are live then; `None` when `group_id` itself is not live then.
    pub fn group_members_as_of(
        &self,
        group_id: &'static str,
        snapshot: Option<Instant>,
    ) -> Option<BTreeSet<&'static str>> {
        let group_target = |id| ExportTarget {
            kind: ExportTargetKind::Group,
            id,
        };
        self.live_content_as_of(group_target(group_id), snapshot)?;
        let mut members = BTreeSet::new();
        let mut visited_groups = BTreeSet::new();
        let mut pending_groups = vec![group_id];
        while let Some(current_group) = pending_groups.pop() {
            if !visited_groups.insert(current_group) {
                continue;
            }
            let Some(ExportContent::Group {
                members: group_members,
            }) = self.live_content_as_of(group_target(current_group), snapshot)
            else {
                continue;
            };
            for member in group_members.iter().filter(|member| !member.inactive) {
                match member.entity.target.kind {
                    ExportTargetKind::Patient => {
                        members.insert(member.entity.target.id);
                    }
                    ExportTargetKind::Group => pending_groups.push(member.entity.target.id),
                    _ => {}
                }
            }
        }
        Some(members)
    }

    /// The patients a request's level covers as of its snapshot: `None` when it covers
    /// every resource that references any patient (or, at system level, everything).
    fn covered_patients(
        &self,
        request: &ExportRequest,
    ) -> Result<Option<BTreeSet<&'static str>>, ExpectedRefusal> {
        let level_members = match &request.level {
            ExportLevel::System => return Ok(None),
            ExportLevel::AllPatients if request.patients.is_empty() => return Ok(None),
            ExportLevel::AllPatients => self.patients_live_as_of(request.until),
            ExportLevel::Group(group_id) => {
                let group_id = GROUP_IDS
                    .iter()
                    .copied()
                    .find(|known| *known == group_id.as_str())
                    .ok_or(ExpectedRefusal::GroupMissingAtSnapshot)?;
                self.group_members_as_of(group_id, request.until)
                    .ok_or(ExpectedRefusal::GroupMissingAtSnapshot)?
            }
        };
        if request.patients.is_empty() {
            return Ok(Some(level_members));
        }
        let mut narrowed = BTreeSet::new();
        for patient in &request.patients {
            let member = level_members
                .iter()
                .copied()
                .find(|member| *member == patient.as_str())
                .ok_or(ExpectedRefusal::PatientOutsideTheLevel)?;
            narrowed.insert(member);
        }
        Ok(Some(narrowed))
    }

    /// What `request` must export from this history, or how it must be refused.
    pub fn expected_export(
        &self,
        request: &ExportRequest,
    ) -> Result<ExpectedExport, ExpectedRefusal> {
        let covered_patients = self.covered_patients(request)?;
        let is_covered = |compartment: &BTreeSet<&'static str>| match &covered_patients {
            None if request.level == ExportLevel::System => true,
            None => !compartment.is_empty(),
            Some(patients) => !compartment.is_disjoint(patients),
        };
        let mut output_bodies_by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut deleted_entries = Vec::new();
        for target in every_export_target() {
            if !request_covers_type(request, target.kind) {
                continue;
            }
            let Some(index) = self.version_index_as_of(target, request.until) else {
                continue;
            };
            let versions = self.versions_of(target);
            let snapshot_version = &versions[index];
            if request
                .since
                .is_some_and(|since| snapshot_version.last_updated <= since)
            {
                continue;
            }
            match &snapshot_version.live {
                Some((content, body)) => {
                    if is_covered(&content.compartment_patients(target)) {
                        output_bodies_by_type
                            .entry(target.kind.type_name().to_owned())
                            .or_default()
                            .push(body.clone());
                    }
                }
                None => {
                    let last_live_content = versions[..index]
                        .iter()
                        .rev()
                        .find_map(|version| version.live.as_ref())
                        .map(|(content, _)| content);
                    let was_covered = last_live_content
                        .is_some_and(|content| is_covered(&content.compartment_patients(target)));
                    if request.since.is_some() && was_covered {
                        deleted_entries
                            .push((target.relative_url(), snapshot_version.last_updated));
                    }
                }
            }
        }
        for bodies in output_bodies_by_type.values_mut() {
            bodies.sort();
        }
        deleted_entries.sort();
        let transaction_time = match request.until {
            Some(until) => until,
            None => self
                .last_commit_instant()
                .expect("every generated history commits at least once"),
        };
        Ok(ExpectedExport {
            transaction_time,
            output_bodies_by_type,
            deleted_entries,
        })
    }
}

/// Whether the request's level and `_type` cover `target_kind`: every type at system
/// level, the types the R4 Patient CompartmentDefinition lists at patient level, and those
/// but Group at group level.
pub fn request_covers_type(request: &ExportRequest, target_kind: ExportTargetKind) -> bool {
    let in_patient_compartment =
        PatientCompartmentDefinition::get().covers_type(target_kind.type_name());
    let level_covers = match request.level {
        ExportLevel::System => true,
        ExportLevel::AllPatients => in_patient_compartment,
        ExportLevel::Group(_) => in_patient_compartment && target_kind != ExportTargetKind::Group,
    };
    level_covers
        && request
            .types
            .as_ref()
            .is_none_or(|types| types.contains(&target_kind.resource_type()))
}
