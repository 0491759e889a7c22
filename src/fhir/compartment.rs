//! The R4 Patient compartment: which resource types can be in a patient's compartment, and
//! which reference elements put a resource there. Built once from the official
//! CompartmentDefinition and SearchParameters shipped in `data/r4`.
//!
//! Each compartment parameter names a search parameter whose FHIRPath expression is compiled by
//! the search FHIRPath subset ([`crate::search::fhirpath`]) and reduced to the JSON member paths
//! it selects, which end at a Reference (see `collect_reference_paths`).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

use super::{LocalBase, ResourceType, UnknownResourceType};
use crate::search::fhirpath::{CompiledFhirPath, UnsupportedFhirPath};

const PATIENT_COMPARTMENT_DEFINITION_JSON: &str =
    include_str!("../../data/r4/compartmentdefinition-patient.json");
const SEARCH_PARAMETERS_JSON: &str = include_str!("../../data/r4/search-parameters.json");

/// The compartment parameter that stands for the compartment's own resource.
const SELF_PARAMETER: &str = "{def}";

/// For every resource type that can be in a patient's compartment, the reference elements that
/// put it in one.
#[derive(Debug)]
pub struct PatientCompartment {
    membership_by_type_code: Vec<Option<TypeMembership>>,
}

#[derive(Debug)]
struct TypeMembership {
    /// A Patient is in its own compartment: its id counts before any reference.
    includes_own_id: bool,
    reference_paths: Vec<ReferencePath>,
}

/// JSON property names from the resource root down to an element of type Reference.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReferencePath {
    property_names: Box<[Box<str>]>,
}

/// Why the compartment table could not be built from a pair of definition documents.
#[derive(Debug, thiserror::Error)]
enum CompartmentDefinitionError {
    #[error("{document} is not valid json")]
    InvalidJson {
        document: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{document} lacks {what}")]
    MissingElement {
        document: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    UnknownResourceType(#[from] UnknownResourceType),
    #[error("no search parameter '{parameter}' applies to {resource_type}")]
    MissingSearchParameter {
        resource_type: ResourceType,
        parameter: String,
    },
    #[error("search parameter '{parameter}' names no reference element of {resource_type}")]
    NoReferencePath {
        resource_type: ResourceType,
        parameter: String,
    },
    #[error("unsupported fhirpath in search parameter '{parameter}': {unsupported}")]
    UnsupportedExpression {
        parameter: String,
        unsupported: UnsupportedExpression,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{expression}' is not a path to a reference element: {reason}")]
struct UnsupportedExpression {
    expression: String,
    reason: String,
}

impl PatientCompartment {
    /// The table built from the shipped R4 definitions.
    pub fn r4() -> &'static PatientCompartment {
        static R4_PATIENT_COMPARTMENT: OnceLock<PatientCompartment> = OnceLock::new();
        R4_PATIENT_COMPARTMENT.get_or_init(|| {
            PatientCompartment::from_definitions(
                PATIENT_COMPARTMENT_DEFINITION_JSON,
                SEARCH_PARAMETERS_JSON,
            )
            .expect("the shipped r4 patient compartment definitions are understood")
        })
    }

    /// Whether resources of this type can be in a patient's compartment (Patient itself included).
    pub fn contains_type(&self, resource_type: ResourceType) -> bool {
        self.membership(resource_type).is_some()
    }

    /// The compartment types, in code order.
    pub fn types(&self) -> impl Iterator<Item = ResourceType> + '_ {
        ResourceType::all()
            .zip(&self.membership_by_type_code)
            .filter(|(_, membership)| membership.is_some())
            .map(|(resource_type, _)| resource_type)
    }

    /// Ids of the patients whose compartment contains this resource (for a Patient: its own id first,
    /// then `link` targets), deduplicated, in first-seen order; empty for non-compartment types.
    /// Only references `local_base` deems local count.
    pub fn patient_ids(
        &self,
        resource_type: ResourceType,
        resource: &Value,
        local_base: &LocalBase,
    ) -> Vec<String> {
        let mut patient_ids = Vec::new();
        let Some(membership) = self.membership(resource_type) else {
            return patient_ids;
        };
        if membership.includes_own_id
            && let Some(Value::String(own_id)) = resource.get("id")
            && is_valid_id(own_id)
        {
            patient_ids.push(own_id.clone());
        }
        for reference_path in &membership.reference_paths {
            collect_patient_ids(
                resource,
                &reference_path.property_names,
                local_base,
                &mut patient_ids,
            );
        }
        patient_ids
    }

    /// A collector for a resource of `resource_type` read member by member, counting only
    /// references `local_base` deems local.
    pub fn patient_id_collector(
        &self,
        resource_type: ResourceType,
        local_base: LocalBase,
    ) -> PatientIdCollector<'_> {
        PatientIdCollector {
            membership: self.membership(resource_type),
            local_base,
            cursors: Vec::new(),
            found: Vec::new(),
            found_id_text: String::new(),
        }
    }

    fn membership(&self, resource_type: ResourceType) -> Option<&TypeMembership> {
        self.membership_by_type_code
            .get(usize::from(resource_type.code()))
            .and_then(Option::as_ref)
    }

    fn from_definitions(
        compartment_definition_json: &str,
        search_parameters_json: &str,
    ) -> Result<PatientCompartment, CompartmentDefinitionError> {
        let compartment_definition =
            parse_document("the compartment definition", compartment_definition_json)?;
        let search_parameter_bundle =
            parse_document("the search parameter bundle", search_parameters_json)?;
        let search_parameters = SearchParameterIndex::from_bundle(&search_parameter_bundle)?;
        let mut membership_by_type_code: Vec<Option<TypeMembership>> =
            ResourceType::all().map(|_| None).collect();
        for (resource_type, parameters) in compartment_members(&compartment_definition)? {
            let mut membership = TypeMembership {
                includes_own_id: resource_type == ResourceType::PATIENT,
                reference_paths: Vec::new(),
            };
            for parameter in parameters {
                if parameter == SELF_PARAMETER {
                    continue;
                }
                for reference_path in search_parameters.reference_paths(resource_type, parameter)? {
                    if !membership.reference_paths.contains(&reference_path) {
                        membership.reference_paths.push(reference_path);
                    }
                }
            }
            membership_by_type_code[usize::from(resource_type.code())] = Some(membership);
        }
        if let Some(patient_slot) =
            membership_by_type_code.get_mut(usize::from(ResourceType::PATIENT.code()))
            && patient_slot.is_none()
        {
            *patient_slot = Some(TypeMembership {
                includes_own_id: true,
                reference_paths: Vec::new(),
            });
        }
        Ok(PatientCompartment {
            membership_by_type_code,
        })
    }
}

fn parse_document(document: &'static str, json: &str) -> Result<Value, CompartmentDefinitionError> {
    serde_json::from_str(json)
        .map_err(|source| CompartmentDefinitionError::InvalidJson { document, source })
}

/// The member types of a CompartmentDefinition with their parameters; types without parameters
/// are not members.
fn compartment_members(
    compartment_definition: &Value,
) -> Result<Vec<(ResourceType, Vec<&str>)>, CompartmentDefinitionError> {
    const DOCUMENT: &str = "the compartment definition";
    let resources = compartment_definition
        .get("resource")
        .and_then(Value::as_array)
        .ok_or(CompartmentDefinitionError::MissingElement {
            document: DOCUMENT,
            what: "a resource array",
        })?;
    let mut members = Vec::new();
    for resource in resources {
        let type_name = resource.get("code").and_then(Value::as_str).ok_or(
            CompartmentDefinitionError::MissingElement {
                document: DOCUMENT,
                what: "a code on every resource",
            },
        )?;
        let parameters: Vec<&str> = resource
            .get("param")
            .and_then(Value::as_array)
            .map(|parameters| parameters.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !parameters.is_empty() {
            members.push((ResourceType::parse(type_name)?, parameters));
        }
    }
    Ok(members)
}

/// Search parameters by code, each with the types it applies to and its FHIRPath expression.
struct SearchParameterIndex<'bundle> {
    by_code: HashMap<&'bundle str, Vec<SearchParameterView<'bundle>>>,
}

struct SearchParameterView<'bundle> {
    base_type_names: Vec<&'bundle str>,
    expression: &'bundle str,
}

impl<'bundle> SearchParameterIndex<'bundle> {
    fn from_bundle(
        bundle: &'bundle Value,
    ) -> Result<SearchParameterIndex<'bundle>, CompartmentDefinitionError> {
        let entries = bundle.get("entry").and_then(Value::as_array).ok_or(
            CompartmentDefinitionError::MissingElement {
                document: "the search parameter bundle",
                what: "an entry array",
            },
        )?;
        let mut by_code: HashMap<&str, Vec<SearchParameterView>> = HashMap::new();
        for search_parameter in entries.iter().filter_map(|entry| entry.get("resource")) {
            let (Some(code), Some(expression)) = (
                search_parameter.get("code").and_then(Value::as_str),
                search_parameter.get("expression").and_then(Value::as_str),
            ) else {
                continue;
            };
            let base_type_names = search_parameter
                .get("base")
                .and_then(Value::as_array)
                .map(|bases| bases.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            by_code.entry(code).or_default().push(SearchParameterView {
                base_type_names,
                expression,
            });
        }
        Ok(SearchParameterIndex { by_code })
    }

    /// The reference paths of `resource_type` named by the search parameter `code`; never empty.
    fn reference_paths(
        &self,
        resource_type: ResourceType,
        code: &str,
    ) -> Result<Vec<ReferencePath>, CompartmentDefinitionError> {
        let applicable: Vec<&SearchParameterView> = self
            .by_code
            .get(code)
            .into_iter()
            .flatten()
            .filter(|view| view.base_type_names.contains(&resource_type.as_str()))
            .collect();
        if applicable.is_empty() {
            return Err(CompartmentDefinitionError::MissingSearchParameter {
                resource_type,
                parameter: code.to_owned(),
            });
        }
        let mut reference_paths = Vec::new();
        for view in applicable {
            collect_reference_paths(
                view.expression,
                resource_type.as_str(),
                &mut reference_paths,
            )
            .map_err(|unsupported| {
                CompartmentDefinitionError::UnsupportedExpression {
                    parameter: code.to_owned(),
                    unsupported,
                }
            })?;
        }
        if reference_paths.is_empty() {
            return Err(CompartmentDefinitionError::NoReferencePath {
                resource_type,
                parameter: code.to_owned(),
            });
        }
        Ok(reference_paths)
    }
}

/// Appends the reference paths of `expression` for `resource_type_name`, compiled by the
/// search FHIRPath subset: union branches of other types are dropped, `where(…)` filters are
/// dropped (the only one used, `resolve() is Patient`, is exactly the Patient check every
/// reference gets), `[n]` indexes widen to every repetition, and type casts select the JSON
/// name of a choice element (`Encounter.reasonReference`). A name that is no resource type has
/// no paths.
fn collect_reference_paths(
    expression: &str,
    resource_type_name: &str,
    reference_paths: &mut Vec<ReferencePath>,
) -> Result<(), UnsupportedExpression> {
    let Ok(resource_type) = ResourceType::parse(resource_type_name) else {
        return Ok(());
    };
    let unsupported = |reason: String| UnsupportedExpression {
        expression: expression.to_owned(),
        reason,
    };
    let compiled = match CompiledFhirPath::compile(expression, resource_type) {
        Ok(compiled) => compiled,
        Err(UnsupportedFhirPath::NoBranchForType { .. }) => return Ok(()),
        Err(refused) => return Err(unsupported(refused.to_string())),
    };
    let member_paths = compiled
        .member_paths()
        .ok_or_else(|| unsupported("it is a condition, not a path".to_owned()))?;
    for property_names in member_paths {
        if property_names.is_empty() {
            return Err(unsupported("it selects the resource itself".to_owned()));
        }
        reference_paths.push(ReferencePath {
            property_names: property_names.into_iter().map(Box::from).collect(),
        });
    }
    Ok(())
}

/// Follows `property_names` from `value`, stepping through arrays at every level, and appends
/// the ids of the Patients named by the references found at the end: each id once, in the
/// order first found, and none already in `patient_ids` (linear in the references found, so
/// a Group of many members stays cheap).
fn collect_patient_ids(
    value: &Value,
    property_names: &[Box<str>],
    local_base: &LocalBase,
    patient_ids: &mut Vec<String>,
) {
    fn referenced_patient_ids<'value>(
        value: &'value Value,
        property_names: &[Box<str>],
        local_base: &LocalBase,
        found: &mut Vec<&'value str>,
    ) {
        match value {
            Value::Array(items) => {
                for item in items {
                    referenced_patient_ids(item, property_names, local_base, found);
                }
            }
            Value::Object(object) => match property_names.split_first() {
                Some((property_name, remaining_property_names)) => {
                    if let Some(child) = object.get(&**property_name) {
                        referenced_patient_ids(child, remaining_property_names, local_base, found);
                    }
                }
                None => {
                    if let Some(Value::String(reference)) = object.get("reference")
                        && let Some(literal_reference) = local_base.local_reference(reference)
                        && literal_reference.resource_type_name == ResourceType::PATIENT.as_str()
                    {
                        found.push(literal_reference.id);
                    }
                }
            },
            _ => {}
        }
    }
    let mut found = Vec::new();
    referenced_patient_ids(value, property_names, local_base, &mut found);
    let mut known: std::collections::HashSet<&str> =
        patient_ids.iter().map(String::as_str).collect();
    let new_ids: Vec<String> = found
        .into_iter()
        .filter(|id| known.insert(id))
        .map(str::to_owned)
        .collect();
    patient_ids.extend(new_ids);
}

/// Finds, while a resource's JSON is read member by member (no tree is built), the
/// patients [`PatientCompartment::patient_ids`] would find in the tree: the reader reports
/// where it is as a [`PathPosition`] and hands over each `reference` string at the end of
/// a reference path. Members a later member of the same name replaced are forgotten with
/// [`PatientIdCollector::forget_found`], as a tree keeps only the last of them.
#[derive(Debug)]
pub struct PatientIdCollector<'compartment> {
    membership: Option<&'compartment TypeMembership>,
    local_base: LocalBase,
    /// Stack of the paths the values being read sit on; a [`PathPosition`] is a range of it.
    cursors: Vec<PathCursor>,
    /// References to Patients, in the order read.
    found: Vec<FoundPatient>,
    /// The ids of `found`, back to back.
    found_id_text: String,
}

#[derive(Debug, Clone, Copy)]
struct PathCursor {
    path_index: usize,
    steps_taken: usize,
}

#[derive(Debug, Clone, Copy)]
struct FoundPatient {
    path_index: usize,
    id_start: usize,
    id_end: usize,
}

/// The reference paths a JSON value sits on, and how far along each it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPosition {
    start: usize,
    end: usize,
}

impl PathPosition {
    /// On no path.
    pub const NOWHERE: PathPosition = PathPosition { start: 0, end: 0 };

    fn is_nowhere(self) -> bool {
        self.start == self.end
    }
}

impl PatientIdCollector<'_> {
    /// The position of the resource itself: at the start of every path.
    pub fn root(&mut self) -> PathPosition {
        let start = self.cursors.len();
        if let Some(membership) = self.membership {
            self.cursors
                .extend(
                    (0..membership.reference_paths.len()).map(|path_index| PathCursor {
                        path_index,
                        steps_taken: 0,
                    }),
                );
        }
        PathPosition {
            start,
            end: self.cursors.len(),
        }
    }

    /// The position of member `name` of an object at `parent` (array items share their
    /// array's position); hand it back to [`PatientIdCollector::leave`] once the member is read.
    pub fn enter_member(&mut self, parent: PathPosition, name: &str) -> PathPosition {
        let start = self.cursors.len();
        if let Some(membership) = self.membership {
            for index in parent.start..parent.end {
                let cursor = self.cursors[index];
                let property_names = &membership.reference_paths[cursor.path_index].property_names;
                if property_names
                    .get(cursor.steps_taken)
                    .is_some_and(|property_name| **property_name == *name)
                {
                    self.cursors.push(PathCursor {
                        path_index: cursor.path_index,
                        steps_taken: cursor.steps_taken + 1,
                    });
                }
            }
        }
        PathPosition {
            start,
            end: self.cursors.len(),
        }
    }

    pub fn leave(&mut self, position: PathPosition) {
        if !position.is_nowhere() {
            self.cursors.truncate(position.start);
        }
    }

    /// Whether an object at `position` is at the end of a path, so that its `reference`
    /// member names a compartment.
    pub fn ends_a_path(&self, position: PathPosition) -> bool {
        self.completed_paths(position).next().is_some()
    }

    /// Notes the `reference` of an object at `position`.
    pub fn reference_found(&mut self, position: PathPosition, reference: &str) {
        let Some(literal_reference) = self.local_base.local_reference(reference) else {
            return;
        };
        if literal_reference.resource_type_name != ResourceType::PATIENT.as_str() {
            return;
        }
        let id_start = self.found_id_text.len();
        self.found_id_text.push_str(literal_reference.id);
        let id_end = self.found_id_text.len();
        for index in position.start..position.end {
            let cursor = self.cursors[index];
            if self.is_complete(cursor) {
                self.found.push(FoundPatient {
                    path_index: cursor.path_index,
                    id_start,
                    id_end,
                });
            }
        }
    }

    /// How many references were noted so far: members read between two counts found those
    /// between them.
    pub fn found_count(&self) -> usize {
        self.found.len()
    }

    /// Forgets the references noted in `range` of counts; later ones move down.
    pub fn forget_found(&mut self, range: std::ops::Range<usize>) {
        self.found.drain(range);
    }

    /// The ids [`PatientCompartment::patient_ids`] gives for the resource read, whose id
    /// is `own_id`.
    pub fn into_patient_ids(self, own_id: &str) -> Vec<String> {
        let Some(membership) = self.membership else {
            return Vec::new();
        };
        let mut found = self.found;
        found.sort_by_key(|patient| patient.path_index);
        let mut known: std::collections::HashSet<&str> =
            std::collections::HashSet::with_capacity(found.len() + 1);
        let mut patient_ids = Vec::with_capacity(found.len() + 1);
        if membership.includes_own_id && is_valid_id(own_id) && known.insert(own_id) {
            patient_ids.push(own_id.to_owned());
        }
        for patient in found {
            let id = &self.found_id_text[patient.id_start..patient.id_end];
            if known.insert(id) {
                patient_ids.push(id.to_owned());
            }
        }
        patient_ids
    }

    fn completed_paths(&self, position: PathPosition) -> impl Iterator<Item = PathCursor> + '_ {
        self.cursors[position.start..position.end]
            .iter()
            .copied()
            .filter(|cursor| self.is_complete(*cursor))
    }

    fn is_complete(&self, cursor: PathCursor) -> bool {
        self.membership.is_some_and(|membership| {
            membership.reference_paths[cursor.path_index]
                .property_names
                .len()
                == cursor.steps_taken
        })
    }
}

/// A literal reference to a resource by type and id: relative (`Type/id`) or absolute
/// (`http://server/fhir/Type/id`), optionally versioned (`.../_history/version`). Contained
/// (`#id`), `urn:` and conditional references are not literal references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiteralReference<'reference> {
    pub(crate) resource_type_name: &'reference str,
    pub(crate) id: &'reference str,
    /// Byte offset of `id` in the reference string.
    pub(crate) id_offset: usize,
}

impl<'reference> LiteralReference<'reference> {
    pub(crate) fn parse(reference: &'reference str) -> Option<LiteralReference<'reference>> {
        const HISTORY_MARKER: &str = "/_history/";
        let unversioned = match reference.rfind(HISTORY_MARKER) {
            Some(marker_offset) => {
                if !is_valid_id(&reference[marker_offset + HISTORY_MARKER.len()..]) {
                    return None;
                }
                &reference[..marker_offset]
            }
            None => reference,
        };
        let (type_and_base, id) = unversioned.rsplit_once('/')?;
        let (base, resource_type_name) = match type_and_base.rsplit_once('/') {
            Some((base, resource_type_name)) => (Some(base), resource_type_name),
            None => (None, type_and_base),
        };
        let base_is_acceptable =
            base.is_none_or(|base| base.starts_with("http://") || base.starts_with("https://"));
        let type_name_is_plausible = resource_type_name
            .starts_with(|character: char| character.is_ascii_uppercase())
            && resource_type_name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric());
        (base_is_acceptable && type_name_is_plausible && is_valid_id(id)).then_some(
            LiteralReference {
                resource_type_name,
                id,
                id_offset: type_and_base.len() + 1,
            },
        )
    }
}

/// Whether `candidate` is a FHIR id: 1 to 64 characters from `[A-Za-z0-9\-\.]`.
fn is_valid_id(candidate: &str) -> bool {
    (1..=64).contains(&candidate.len())
        && candidate
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn resource_type(name: &str) -> ResourceType {
        ResourceType::parse(name).unwrap()
    }

    fn paths_of(compartment: &PatientCompartment, type_name: &str) -> Vec<Vec<String>> {
        compartment
            .membership(resource_type(type_name))
            .unwrap()
            .reference_paths
            .iter()
            .map(|path| {
                path.property_names
                    .iter()
                    .map(|name| name.to_string())
                    .collect()
            })
            .collect()
    }

    fn paths_in(
        expression: &str,
        type_name: &str,
    ) -> Result<Vec<Vec<String>>, UnsupportedExpression> {
        let mut reference_paths = Vec::new();
        collect_reference_paths(expression, type_name, &mut reference_paths)?;
        Ok(reference_paths
            .iter()
            .map(|path| {
                path.property_names
                    .iter()
                    .map(|name| name.to_string())
                    .collect()
            })
            .collect())
    }

    fn ids(type_name: &str, resource: &Value) -> Vec<String> {
        PatientCompartment::r4().patient_ids(
            resource_type(type_name),
            resource,
            &LocalBase::at("https://example.org/fhir"),
        )
    }

    #[test]
    fn every_parameter_of_every_compartment_type_yields_a_reference_path() {
        let definition: Value = serde_json::from_str(PATIENT_COMPARTMENT_DEFINITION_JSON).unwrap();
        let bundle: Value = serde_json::from_str(SEARCH_PARAMETERS_JSON).unwrap();
        let index = SearchParameterIndex::from_bundle(&bundle).unwrap();
        let members = compartment_members(&definition).unwrap();
        assert_eq!(members.len(), 67);
        let mut parameter_count = 0;
        for (member_type, parameters) in members {
            assert!(
                PatientCompartment::r4().contains_type(member_type),
                "{member_type}"
            );
            for parameter in parameters
                .into_iter()
                .filter(|parameter| *parameter != SELF_PARAMETER)
            {
                let reference_paths = index.reference_paths(member_type, parameter).unwrap();
                assert!(!reference_paths.is_empty(), "{member_type}.{parameter}");
                parameter_count += 1;
            }
        }
        assert_eq!(parameter_count, 102);
    }

    #[test]
    fn every_r4_reference_search_parameter_expression_is_understood() {
        let bundle: Value = serde_json::from_str(SEARCH_PARAMETERS_JSON).unwrap();
        let mut understood = 0;
        for search_parameter in bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| &entry["resource"])
        {
            if search_parameter["type"] != "reference" {
                continue;
            }
            let expression = search_parameter["expression"].as_str().unwrap();
            for base in search_parameter["base"].as_array().unwrap() {
                let paths = paths_in(expression, base.as_str().unwrap());
                assert!(paths.is_ok(), "{expression}: {paths:?}");
                understood += 1;
            }
        }
        assert!(understood > 500, "{understood}");
    }

    #[test]
    fn expression_forms_reduce_to_json_paths() {
        assert_eq!(
            paths_in(
                "AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient) | Observation.subject",
                "CarePlan"
            ),
            Ok(vec![vec!["subject".to_owned()]])
        );
        assert_eq!(
            paths_in(
                "AuditEvent.agent.who.where(resolve() is Patient) | AuditEvent.entity.what",
                "AuditEvent"
            ),
            Ok(vec![
                vec!["agent".to_owned(), "who".to_owned()],
                vec!["entity".to_owned(), "what".to_owned()]
            ])
        );
        assert_eq!(
            paths_in(
                "(DeviceRequest.code.ofType(Reference)) | (Observation.code)",
                "DeviceRequest"
            ),
            Ok(vec![vec!["codeReference".to_owned()]])
        );
        assert_eq!(
            paths_in(
                "(MedicationRequest.medication as Reference)",
                "MedicationRequest"
            ),
            Ok(vec![vec!["medicationReference".to_owned()]])
        );
        assert_eq!(
            paths_in("(Observation.value as Reference)", "Observation"),
            Ok(vec![]),
            "Observation.value has no Reference choice"
        );
        assert_eq!(
            paths_in("Observation.focus.as(Reference)", "Observation"),
            Ok(vec![vec!["focus".to_owned()]]),
            "Observation.focus is a Reference, not a choice element"
        );
        assert_eq!(
            paths_in("Bundle.entry[0].resource", "Bundle"),
            Ok(vec![vec!["entry".to_owned(), "resource".to_owned()]])
        );
        assert_eq!(
            paths_in(
                "Library.relatedArtifact.where(type='composed-of').resource",
                "Library"
            ),
            Ok(vec![vec![
                "relatedArtifact".to_owned(),
                "resource".to_owned()
            ]])
        );
        assert_eq!(
            paths_in("Encounter.subject", "EncounterDefinition"),
            Ok(vec![])
        );
        assert!(paths_in("Observation.subject.resolve()", "Observation").is_err());
        assert_eq!(
            paths_in("Observation.`subject`", "Observation"),
            Ok(vec![vec!["subject".to_owned()]])
        );
        assert!(paths_in("Observation.subjectt", "Observation").is_err());
        assert_eq!(
            paths_in("Observation.where(status='final').subject", "Observation"),
            Ok(vec![vec!["subject".to_owned()]])
        );
        assert!(paths_in("Observation.where(code='x').subject", "Observation").is_err());
        assert!(paths_in("Observation.subject.where()", "Observation").is_err());
        assert!(paths_in("Observation", "Observation").is_err());
    }

    #[test]
    fn the_table_lists_compartment_types_with_their_paths() {
        let compartment = PatientCompartment::r4();
        assert_eq!(
            paths_of(compartment, "Observation"),
            vec![vec!["subject".to_owned()], vec!["performer".to_owned()]]
        );
        assert_eq!(
            paths_of(compartment, "Provenance"),
            vec![vec!["target".to_owned()]]
        );
        assert_eq!(
            paths_of(compartment, "Patient"),
            vec![vec!["link".to_owned(), "other".to_owned()]]
        );
        assert_eq!(
            paths_of(compartment, "MedicationAdministration"),
            vec![
                vec!["subject".to_owned()],
                vec!["performer".to_owned(), "actor".to_owned()]
            ]
        );
        assert!(compartment.contains_type(ResourceType::PATIENT));
        assert!(compartment.contains_type(ResourceType::GROUP));
        assert!(!compartment.contains_type(resource_type("Practitioner")));
        assert!(!compartment.contains_type(resource_type("Organization")));
        assert!(!compartment.contains_type(resource_type("Device")));
        let types: Vec<ResourceType> = compartment.types().collect();
        assert_eq!(types.len(), 67);
        assert!(types.windows(2).all(|pair| pair[0].code() < pair[1].code()));
        assert_eq!(types.first().map(|first| first.as_str()), Some("Account"));
        assert!(
            types
                .iter()
                .all(|member_type| compartment.contains_type(*member_type))
        );
    }

    #[test]
    fn the_self_parameter_makes_no_path_and_patient_always_includes_itself() {
        let definition = json!({"resource": [
            {"code": "Patient", "param": ["{def}"]},
            {"code": "Encounter", "param": ["subject"]},
            {"code": "Practitioner"}
        ]})
        .to_string();
        let compartment =
            PatientCompartment::from_definitions(&definition, SEARCH_PARAMETERS_JSON).unwrap();
        assert_eq!(
            compartment.types().collect::<Vec<_>>(),
            vec![resource_type("Encounter"), ResourceType::PATIENT]
        );
        assert!(paths_of(&compartment, "Patient").is_empty());
        let patient = json!({"resourceType": "Patient", "id": "p1"});
        assert_eq!(
            compartment.patient_ids(ResourceType::PATIENT, &patient, &LocalBase::relative_only()),
            vec!["p1"]
        );
    }

    #[test]
    fn definitions_that_cannot_be_understood_are_errors() {
        let unknown_parameter =
            json!({"resource": [{"code": "Encounter", "param": ["no-such-param"]}]}).to_string();
        assert!(matches!(
            PatientCompartment::from_definitions(&unknown_parameter, SEARCH_PARAMETERS_JSON),
            Err(CompartmentDefinitionError::MissingSearchParameter { .. })
        ));
        let unknown_type =
            json!({"resource": [{"code": "Spaceship", "param": ["subject"]}]}).to_string();
        assert!(matches!(
            PatientCompartment::from_definitions(&unknown_type, SEARCH_PARAMETERS_JSON),
            Err(CompartmentDefinitionError::UnknownResourceType(_))
        ));
        let definition =
            json!({"resource": [{"code": "Encounter", "param": ["subject"]}]}).to_string();
        let odd_search_parameters = json!({"entry": [{"resource": {
            "code": "subject", "base": ["Encounter"], "expression": "Encounter.subject.resolve()"
        }}]})
        .to_string();
        let error =
            PatientCompartment::from_definitions(&definition, &odd_search_parameters).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unsupported fhirpath in search parameter 'subject': 'Encounter.subject.resolve()' is not a path to a reference element: resolve() other than in 'resolve() is T' is not in the supported fhirpath subset"
        );
        assert!(matches!(
            PatientCompartment::from_definitions("{", SEARCH_PARAMETERS_JSON),
            Err(CompartmentDefinitionError::InvalidJson { .. })
        ));
    }

    #[test]
    fn literal_references_parse_relative_absolute_and_versioned_forms() {
        let parsed = LiteralReference::parse("Patient/123").unwrap();
        assert_eq!(
            (parsed.resource_type_name, parsed.id, parsed.id_offset),
            ("Patient", "123", 8)
        );
        let absolute = "https://example.org/fhir/Patient/a-b.c/_history/7";
        let parsed = LiteralReference::parse(absolute).unwrap();
        assert_eq!((parsed.resource_type_name, parsed.id), ("Patient", "a-b.c"));
        assert_eq!(
            &absolute[parsed.id_offset..parsed.id_offset + parsed.id.len()],
            "a-b.c"
        );
        assert_eq!(
            LiteralReference::parse("Encounter/e1/_history/2")
                .unwrap()
                .id,
            "e1"
        );
        for not_literal in [
            "#p1",
            "urn:uuid:85c63cf3-278e-454c-b5ba-df5889815eb7",
            "Patient/",
            "Patient/has space",
            "Patient/123/_history/",
            "Patient?identifier=x|1",
            "patient/123",
            "relative/path/Patient/123",
            "Patient/123/extra",
            "",
        ] {
            assert_eq!(LiteralReference::parse(not_literal), None, "{not_literal}");
        }
        assert!(LiteralReference::parse(&format!("Patient/{}", "a".repeat(64))).is_some());
        assert!(LiteralReference::parse(&format!("Patient/{}", "a".repeat(65))).is_none());
    }

    const SYNTHEA_OBSERVATION: &str = r#"{"resourceType":"Observation","id":"c9b15dd6-77a5-4fe2-a6f0-17a1800a827a","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8302-2","display":"Body Height"}]},"subject":{"reference":"Patient/85c63cf3-278e-454c-b5ba-df5889815eb7"},"effectiveDateTime":"2016-08-21T14:16:10.995406+00:00","valueQuantity":{"value":55.9,"unit":"cm","system":"http://unitsofmeasure.org","code":"cm"},"encounter":{"reference":"Encounter/91a7eaf9-df30-4999-9b1f-61b8614d445b"},"meta":{"profile":["http://hl7.org/fhir/StructureDefinition/vitalsigns"]}}"#;
    const SYNTHEA_ENCOUNTER: &str = r#"{"resourceType":"Encounter","id":"91a7eaf9-df30-4999-9b1f-61b8614d445b","status":"finished","class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB","display":"ambulatory"},"type":[{"coding":[{"system":"http://snomed.info/sct","code":"162673000","display":"General examination of patient (procedure)"}]}],"subject":{"reference":"Patient/85c63cf3-278e-454c-b5ba-df5889815eb7","display":"Darrell Erdman"},"period":{"start":"2016-08-21T14:16:10.995406+00:00","end":"2016-08-21T14:16:10.995406+00:00"},"reasonCode":[{"text":"Medication_Review_Due"}],"serviceProvider":{"reference":"Organization/7bc0c0b1-55c4-4b75-b880-17c7025ec514"},"location":[{"location":{"reference":"Location/23ccb96b-4a44-41bb-b0c0-a5f9cef49ff9"}}],"participant":[{"type":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"PPRF","display":"primary performer"}]}],"individual":{"reference":"Practitioner/8d649035-3b1b-4bf0-8e03-71e3fd96f95f"}}],"meta":{"profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-encounter"]}}"#;
    const SYNTHEA_CLAIM: &str = r#"{"resourceType":"Claim","id":"4f297ea7-8e90-4a3f-8d7a-de0a73066347","status":"active","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/claim-type","code":"institutional"}]},"use":"claim","patient":{"reference":"Patient/85c63cf3-278e-454c-b5ba-df5889815eb7"},"created":"2016-08-21T14:16:10.995406+00:00","provider":{"reference":"Organization/7bc0c0b1-55c4-4b75-b880-17c7025ec514"},"priority":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/processpriority","code":"normal"}]},"item":[{"sequence":1,"productOrService":{"coding":[{"system":"http://snomed.info/sct","code":"162673000","display":"General examination of patient (procedure)"}]},"encounter":[{"reference":"Encounter/91a7eaf9-df30-4999-9b1f-61b8614d445b"}],"net":{"value":125.0,"currency":"USD"}}],"total":{"value":125.0,"currency":"USD"},"insurance":[{"sequence":1,"focal":true,"coverage":{"reference":"Coverage/099e2227-a65c-4f8b-a12f-a4bfa58f5d8b"}}],"insurer":{"reference":"Organization/143d7727-cc9b-470c-885a-21c893eb237e"}}"#;
    const SYNTHEA_COVERAGE_WITH_PATIENT_TWICE: &str = r#"{"resourceType":"Coverage","id":"5f34185e-74ea-4a2c-b6e2-230470233ea6","status":"active","beneficiary":{"reference":"Patient/cdb486b4-716b-4e83-9e27-8a68620dd1fe"},"period":{"start":"2004-05-19T03:58:07.551726+00:00"},"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"PUBLICPOL"}]},"payor":[{"reference":"Patient/cdb486b4-716b-4e83-9e27-8a68620dd1fe"}]}"#;

    #[test]
    fn real_synthea_resources_find_their_patient() {
        let darrell = "85c63cf3-278e-454c-b5ba-df5889815eb7";
        for (type_name, line) in [
            ("Observation", SYNTHEA_OBSERVATION),
            ("Encounter", SYNTHEA_ENCOUNTER),
            ("Claim", SYNTHEA_CLAIM),
        ] {
            let resource: Value = serde_json::from_str(line).unwrap();
            assert_eq!(resource["resourceType"], type_name);
            assert_eq!(ids(type_name, &resource), vec![darrell], "{type_name}");
        }
        let coverage: Value = serde_json::from_str(SYNTHEA_COVERAGE_WITH_PATIENT_TWICE).unwrap();
        assert_eq!(
            ids("Coverage", &coverage),
            vec!["cdb486b4-716b-4e83-9e27-8a68620dd1fe"]
        );
    }

    #[test]
    fn provenance_counts_only_the_patients_among_its_targets() {
        let provenance = json!({
            "resourceType": "Provenance",
            "id": "prov",
            "target": [
                {"reference": "Encounter/e1"},
                {"reference": "Patient/p1"},
                {"reference": "Encounter/e2"},
                {"reference": "Patient/p2/_history/3"},
                {"reference": "Patient/p1"}
            ],
            "agent": [{"who": {"reference": "Practitioner/dr"}}]
        });
        assert_eq!(ids("Provenance", &provenance), vec!["p1", "p2"]);
    }

    #[test]
    fn patients_are_in_their_own_compartment_and_in_linked_ones() {
        let patient = json!({
            "resourceType": "Patient",
            "id": "self",
            "link": [
                {"other": {"reference": "RelatedPerson/rp"}, "type": "seealso"},
                {"other": {"reference": "http://other.example/fhir/Patient/older"}, "type": "replaces"},
                {"other": {"reference": "Patient/self"}, "type": "seealso"}
            ]
        });
        assert_eq!(ids("Patient", &patient), vec!["self"]);
        let linked_here = json!({
            "resourceType": "Patient",
            "id": "self",
            "link": [{"other": {"reference": "https://example.org/fhir/Patient/older"}, "type": "replaces"}]
        });
        assert_eq!(ids("Patient", &linked_here), vec!["self", "older"]);
        assert_eq!(
            ids("Patient", &json!({"resourceType": "Patient"})),
            Vec::<String>::new()
        );
        assert_eq!(
            ids("Patient", &json!({"id": "bad id"})),
            Vec::<String>::new()
        );
    }

    #[test]
    fn references_that_do_not_name_a_patient_are_ignored() {
        let observation = json!({
            "resourceType": "Observation",
            "id": "o1",
            "contained": [{"resourceType": "Patient", "id": "inline"}],
            "subject": {"reference": "#inline"},
            "performer": [
                {"reference": "urn:uuid:85c63cf3-278e-454c-b5ba-df5889815eb7"},
                {"reference": "Practitioner/dr"},
                {"reference": "Patient/not valid"},
                {"reference": "Patient/"},
                {"display": "no reference at all"},
                {"reference": 42},
                {"reference": "https://example.org/fhir/Patient/abs/_history/2"},
                {"reference": "http://other.example/fhir/Patient/foreign"},
                {"reference": "https://example.org/other-fhir/Patient/foreign"},
                {"reference": "Patient/rel/_history/1"}
            ],
            "focus": [{"reference": "Patient/not-a-compartment-path"}]
        });
        assert_eq!(ids("Observation", &observation), vec!["abs", "rel"]);
    }

    #[test]
    fn arrays_are_walked_at_every_step() {
        let care_plan = json!({
            "resourceType": "CarePlan",
            "id": "cp",
            "subject": {"reference": "Patient/owner"},
            "activity": [
                {"detail": {"performer": [{"reference": "Patient/helper"}, {"reference": "Patient/owner"}]}},
                {"detail": {"performer": [{"reference": "Patient/third"}]}},
                {"reference": {"reference": "Patient/not-a-detail"}}
            ]
        });
        assert_eq!(
            ids("CarePlan", &care_plan),
            vec!["owner", "helper", "third"]
        );
        let group = json!({
            "resourceType": "Group",
            "member": [{"entity": {"reference": "Patient/m1"}}, {"entity": {"reference": "Patient/m2"}}]
        });
        assert_eq!(ids("Group", &group), vec!["m1", "m2"]);
    }

    #[test]
    fn a_large_group_lists_each_member_once_in_first_seen_order() {
        const MEMBERS: usize = 100_000;
        let members: Vec<Value> = (0..MEMBERS)
            .chain((0..MEMBERS).step_by(7))
            .map(|index| json!({"entity": {"reference": format!("Patient/m{index}")}}))
            .collect();
        let group = json!({"resourceType": "Group", "member": members});
        let expected: Vec<String> = (0..MEMBERS).map(|index| format!("m{index}")).collect();
        assert_eq!(ids("Group", &group), expected);
    }

    #[test]
    fn non_compartment_types_have_no_patients() {
        let practitioner = json!({
            "resourceType": "Practitioner",
            "id": "dr",
            "subject": {"reference": "Patient/p1"},
            "patient": {"reference": "Patient/p1"}
        });
        assert!(ids("Practitioner", &practitioner).is_empty());
        let device =
            json!({"resourceType": "Device", "id": "d", "patient": {"reference": "Patient/p1"}});
        assert!(ids("Device", &device).is_empty());
        assert!(ids("Observation", &json!({"resourceType": "Observation"})).is_empty());
        assert!(ids("Observation", &json!("not an object")).is_empty());
    }
}
