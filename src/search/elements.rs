//! `_elements`: which top-level elements of a resource a search or an export returns
//! (FHIR R4 search, Bulk Data v3). A name qualified by a type (`Observation.code`) applies
//! to that type only; a plain name (`code`) to every type that has it. A type no name
//! applies to comes back whole. A subsetted resource keeps `resourceType`, `id` and `meta`
//! and carries the `SUBSETTED` tag.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::fhir::ResourceType;

const TOP_LEVEL_ELEMENTS_JSON: &str = include_str!("../../data/r4/top-level-elements.json");

pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
pub const SUBSETTED_CODE: &str = "SUBSETTED";

/// Elements every subsetted resource keeps.
const ALWAYS_KEPT: [&str; 3] = ["resourceType", "id", "meta"];

/// Why an `_elements` value is refused; each names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElementsError {
    #[error("_elements is empty")]
    Empty,
    #[error("_elements '{0}': only top-level elements (Type.element or element) are allowed")]
    NotTopLevel(String),
    #[error("_elements '{0}': '{1}' is not a FHIR R4 resource type")]
    UnknownType(String, String),
    #[error("_elements '{element}': no such top-level element on {scope}")]
    UnknownElement { element: String, scope: String },
    #[error("_elements '{element}' names {named}, but this search is over {searched}")]
    OtherType {
        element: String,
        named: ResourceType,
        searched: ResourceType,
    },
}

/// One listed element, as the client named it (checked against the R4 definitions).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct ElementSelector {
    /// `None` for a plain name, which applies to every type.
    resource_type: Option<ResourceType>,
    element: String,
}

/// A parsed `_elements` selection (one or more values, merged).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ElementsSelection {
    selectors: BTreeSet<ElementSelector>,
}

impl ElementsSelection {
    /// Adds the comma-separated names of one `_elements` value, all or none; a plain name
    /// must be a top-level element of some R4 type, a qualified one of its type.
    pub fn add_value(&mut self, value: &str) -> Result<(), ElementsError> {
        self.add_value_checked(value, None)
    }

    /// Like [`ElementsSelection::add_value`] for a search over `resource_type`: every
    /// name must be an element of that type.
    pub fn add_value_for_type(
        &mut self,
        value: &str,
        resource_type: ResourceType,
    ) -> Result<(), ElementsError> {
        self.add_value_checked(value, Some(resource_type))
    }

    fn add_value_checked(
        &mut self,
        value: &str,
        searched: Option<ResourceType>,
    ) -> Result<(), ElementsError> {
        let names: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .collect();
        if names.is_empty() {
            return Err(ElementsError::Empty);
        }
        let mut selectors = Vec::with_capacity(names.len());
        for name in names {
            let selector = parse_selector(name)?;
            match (selector.resource_type, searched) {
                (Some(named), Some(searched)) if named != searched => {
                    return Err(ElementsError::OtherType {
                        element: name.to_owned(),
                        named,
                        searched,
                    });
                }
                (Some(resource_type), _) | (None, Some(resource_type)) => {
                    if json_names(resource_type, &selector.element).is_none() {
                        return Err(ElementsError::UnknownElement {
                            element: name.to_owned(),
                            scope: resource_type.to_string(),
                        });
                    }
                }
                (None, None) => {
                    if !ResourceType::all()
                        .any(|resource_type| json_names(resource_type, &selector.element).is_some())
                    {
                        return Err(ElementsError::UnknownElement {
                            element: name.to_owned(),
                            scope: "any resource type".to_owned(),
                        });
                    }
                }
            }
            selectors.push(selector);
        }
        self.selectors.extend(selectors);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.selectors.is_empty()
    }

    /// Whether resources of `resource_type` are subsetted (some listed name applies).
    pub fn applies_to(&self, resource_type: ResourceType) -> bool {
        self.selectors.iter().any(|selector| {
            selector
                .resource_type
                .is_none_or(|named| named == resource_type)
        })
    }

    /// Subsets `resource` (a resource of `resource_type`) in place when the selection
    /// applies to its type; otherwise leaves it whole.
    pub fn apply(&self, resource_type: ResourceType, resource: &mut Map<String, Value>) {
        if !self.applies_to(resource_type) {
            return;
        }
        let mut kept: BTreeSet<&str> = ALWAYS_KEPT.into_iter().collect();
        for selector in &self.selectors {
            if selector
                .resource_type
                .is_none_or(|named| named == resource_type)
                && let Some(names) = json_names(resource_type, &selector.element)
            {
                kept.extend(names);
            }
        }
        resource.retain(|key, _| {
            let element = key.strip_prefix('_').unwrap_or(key);
            kept.contains(element)
        });
        add_subsetted_tag(resource);
    }

    /// [`ElementsSelection::apply`] on one stored JSON body, written like a stored body
    /// (`resourceType`, `id`, `meta` first, then the other keys sorted); `None` if the body
    /// is not a JSON object.
    pub fn apply_to_body(&self, resource_type: ResourceType, body: &[u8]) -> Option<Vec<u8>> {
        let mut resource: Map<String, Value> = serde_json::from_slice(body).ok()?;
        self.apply(resource_type, &mut resource);
        let leading = ALWAYS_KEPT
            .iter()
            .filter_map(|key| Some((*key, resource.get(*key)?)));
        let rest = resource
            .iter()
            .filter(|(key, _)| !ALWAYS_KEPT.contains(&key.as_str()))
            .map(|(key, value)| (key.as_str(), value));
        let mut written = vec![b'{'];
        for (index, (key, value)) in leading.chain(rest).enumerate() {
            if index > 0 {
                written.push(b',');
            }
            serde_json::to_writer(&mut written, key).ok()?;
            written.push(b':');
            serde_json::to_writer(&mut written, value).ok()?;
        }
        written.push(b'}');
        Some(written)
    }
}

fn parse_selector(name: &str) -> Result<ElementSelector, ElementsError> {
    match name.split_once('.') {
        None => Ok(ElementSelector {
            resource_type: None,
            element: name.to_owned(),
        }),
        Some((type_name, element)) => {
            if element.contains('.') || element.is_empty() {
                return Err(ElementsError::NotTopLevel(name.to_owned()));
            }
            let resource_type = ResourceType::parse(type_name)
                .map_err(|_| ElementsError::UnknownType(name.to_owned(), type_name.to_owned()))?;
            Ok(ElementSelector {
                resource_type: Some(resource_type),
                element: element.to_owned(),
            })
        }
    }
}

/// Adds `SUBSETTED` to `meta.tag` unless it is there already.
fn add_subsetted_tag(resource: &mut Map<String, Value>) {
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(meta) = meta else {
        return;
    };
    let tags = meta
        .entry("tag")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(tags) = tags else {
        return;
    };
    let tagged = tags.iter().any(|tag| {
        tag.get("system").and_then(Value::as_str) == Some(SUBSETTED_SYSTEM)
            && tag.get("code").and_then(Value::as_str) == Some(SUBSETTED_CODE)
    });
    if !tagged {
        tags.push(json!({"system": SUBSETTED_SYSTEM, "code": SUBSETTED_CODE}));
    }
}

/// One type's top-level elements as JSON names, and its choice elements.
#[derive(Deserialize)]
struct TypeElements {
    elements: BTreeSet<String>,
    choices: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct TopLevelElementsFile {
    types: HashMap<String, TypeElements>,
}

fn top_level_elements() -> &'static HashMap<ResourceType, TypeElements> {
    static ELEMENTS: OnceLock<HashMap<ResourceType, TypeElements>> = OnceLock::new();
    ELEMENTS.get_or_init(|| {
        let file: TopLevelElementsFile = serde_json::from_str(TOP_LEVEL_ELEMENTS_JSON)
            .expect("data/r4/top-level-elements.json is valid");
        file.types
            .into_iter()
            .filter_map(|(name, elements)| Some((ResourceType::parse(&name).ok()?, elements)))
            .collect()
    })
}

/// The JSON names `element` stands for on `resource_type`: a choice element (`value`)
/// stands for each of its typed names (`valueQuantity`, …); `None` if the type has no
/// such top-level element.
fn json_names(resource_type: ResourceType, element: &str) -> Option<Vec<&'static str>> {
    if ALWAYS_KEPT.contains(&element) {
        return Some(Vec::new());
    }
    let elements = top_level_elements().get(&resource_type)?;
    if let Some(choices) = elements.choices.get(element) {
        return Some(choices.iter().map(String::as_str).collect());
    }
    elements
        .elements
        .get(element)
        .map(|name| vec![name.as_str()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation() -> Map<String, Value> {
        serde_json::from_value(json!({
            "resourceType": "Observation",
            "id": "o1",
            "meta": {"versionId": "1", "tag": [{"system": "urn:x", "code": "keep"}]},
            "status": "final",
            "_status": {"extension": []},
            "code": {"text": "weight"},
            "subject": {"reference": "Patient/p1"},
            "valueQuantity": {"value": 70},
        }))
        .unwrap()
    }

    fn selection(value: &str) -> ElementsSelection {
        let mut selection = ElementsSelection::default();
        selection.add_value(value).unwrap();
        selection
    }

    fn keys(resource: &Map<String, Value>) -> Vec<&str> {
        resource.keys().map(String::as_str).collect()
    }

    #[test]
    fn keeps_listed_elements_and_the_mandatory_three_and_tags_once() {
        let observation_type = ResourceType::parse("Observation").unwrap();
        let selection = selection("status,value");
        let mut resource = observation();
        selection.apply(observation_type, &mut resource);
        let mut kept = keys(&resource);
        kept.sort_unstable();
        assert_eq!(
            kept,
            [
                "_status",
                "id",
                "meta",
                "resourceType",
                "status",
                "valueQuantity"
            ]
        );
        selection.apply(observation_type, &mut resource);
        let tags = resource["meta"]["tag"].as_array().unwrap();
        assert_eq!(tags.len(), 2, "{tags:?}");
        assert_eq!(tags[1]["code"], SUBSETTED_CODE);
        assert_eq!(tags[1]["system"], SUBSETTED_SYSTEM);
    }

    #[test]
    fn a_qualified_name_applies_to_its_type_only() {
        let selection = selection("Observation.code");
        assert!(selection.applies_to(ResourceType::parse("Observation").unwrap()));
        assert!(!selection.applies_to(ResourceType::PATIENT));
        let mut patient: Map<String, Value> =
            serde_json::from_value(json!({"resourceType": "Patient", "id": "p", "gender": "male"}))
                .unwrap();
        let whole = patient.clone();
        selection.apply(ResourceType::PATIENT, &mut patient);
        assert_eq!(patient, whole);
        let mut resource = observation();
        selection.apply(ResourceType::parse("Observation").unwrap(), &mut resource);
        assert!(resource.contains_key("code"));
        assert!(!resource.contains_key("subject"));
    }

    #[test]
    fn refuses_unknown_and_nested_names_naming_them() {
        let refused = |value: &str| {
            ElementsSelection::default()
                .add_value(value)
                .unwrap_err()
                .to_string()
        };
        assert!(refused("code,nonsense").contains("nonsense"));
        assert!(refused("Observation.gender").contains("Observation.gender"));
        assert!(refused("Observation.code.text").contains("top-level"));
        assert!(refused("Nope.code").contains("Nope"));
        assert!(refused(" , ").contains("empty"));
        let for_patient = ElementsSelection::default()
            .add_value_for_type("code", ResourceType::PATIENT)
            .unwrap_err();
        assert!(for_patient.to_string().contains("code"), "{for_patient}");
        let other_type = ElementsSelection::default()
            .add_value_for_type("Observation.code", ResourceType::PATIENT)
            .unwrap_err();
        assert!(matches!(other_type, ElementsError::OtherType { .. }));
    }

    #[test]
    fn a_subsetted_body_leads_with_resource_type_id_and_meta() {
        let observation_type = ResourceType::parse("Observation").unwrap();
        let body = serde_json::to_vec(&Value::Object(observation())).unwrap();
        let subset = selection("code")
            .apply_to_body(observation_type, &body)
            .unwrap();
        let text = String::from_utf8(subset).unwrap();
        assert!(
            text.starts_with(r#"{"resourceType":"Observation","id":"o1","meta":{"#),
            "{text}"
        );
        assert!(text.ends_with(r#","code":{"text":"weight"}}"#), "{text}");
    }

    #[test]
    fn value_set_is_no_choice_of_value() {
        let value_set = ResourceType::parse("ValueSet").unwrap();
        assert!(json_names(value_set, "value").is_none());
        let observation_type = ResourceType::parse("Observation").unwrap();
        let names = json_names(observation_type, "value").unwrap();
        assert!(names.contains(&"valueQuantity") && names.contains(&"valueString"));
    }
}
