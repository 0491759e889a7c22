//! Turning a kick-off (query or `Parameters` body plus headers, or `fhirlog export` flags)
//! into a typed [`ExportRequest`] through one constructor, with a clear error for anything
//! it cannot honour.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fhir::compartment::{LiteralReference, PatientCompartment};
use crate::fhir::{Instant, ResourceId, ResourceType};
use crate::search::elements::ElementsSelection;
use crate::sink::ContainerName;

/// What an export covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportLevel {
    System,
    AllPatients,
    Group(ResourceId),
}

/// A validated kick-off request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRequest {
    pub level: ExportLevel,
    pub since: Option<Instant>,
    pub until: Option<Instant>,
    /// `None` means every type the level covers.
    pub types: Option<BTreeSet<ResourceType>>,
    /// `patient=`: narrows a Patient or Group export to these patients.
    pub patients: Vec<ResourceId>,
    pub container: Option<ContainerName>,
    /// `_elements`: which top-level elements output resources keep (empty: all).
    #[serde(default)]
    pub elements: ElementsSelection,
    /// Parameters ignored under `Prefer: handling=lenient`, reported in the `error` files.
    pub ignored_under_lenient: Vec<String>,
}

/// Why a kick-off request is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidExportRequest(pub String);

/// The raw pieces of a kick-off the HTTP layer hands over.
pub struct KickOff<'a> {
    pub level: ExportLevel,
    pub is_post: bool,
    pub query: &'a str,
    pub accept: Option<&'a str>,
    pub prefer: Vec<&'a str>,
    pub body: &'a [u8],
    pub now: Instant,
}

const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];
const UNSUPPORTED_PARAMETERS: [&str; 3] =
    ["_typeFilter", "includeAssociatedData", "organizeOutputBy"];

fn invalid(message: impl Into<String>) -> InvalidExportRequest {
    InvalidExportRequest(message.into())
}

/// What a kick-off asks for, as typed values: filled by the HTTP parser from the query and
/// body, and by `fhirlog export` from its flags. [`ExportRequest::new`] checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportParameters {
    pub level: ExportLevel,
    pub since: Option<Instant>,
    pub until: Option<Instant>,
    /// `None` means every type the level covers.
    pub types: Option<BTreeSet<ResourceType>>,
    pub patients: Vec<ResourceId>,
    pub container: Option<ContainerName>,
    pub elements: ElementsSelection,
    /// Parameters this server does not honour, each with the reason; refused unless
    /// `lenient`.
    pub unsupported: Vec<String>,
    /// `Prefer: handling=lenient`: report what cannot be honoured instead of refusing.
    pub lenient: bool,
}

impl ExportParameters {
    /// Everything `level` covers, with no filter.
    pub fn new(level: ExportLevel) -> ExportParameters {
        ExportParameters {
            level,
            since: None,
            until: None,
            types: None,
            patients: Vec::new(),
            container: None,
            elements: ElementsSelection::default(),
            unsupported: Vec::new(),
            lenient: false,
        }
    }
}

impl ExportRequest {
    /// Every resource `level` covers, as of now, into the default container.
    pub fn everything_at(level: ExportLevel) -> ExportRequest {
        ExportRequest {
            level,
            since: None,
            until: None,
            types: None,
            patients: Vec::new(),
            container: None,
            elements: ElementsSelection::default(),
            ignored_under_lenient: Vec::new(),
        }
    }

    /// The one constructor of a request: checks the parameters against each other and
    /// against `now`, refusing (or, under lenient handling, reporting) what cannot be
    /// honoured.
    pub fn new(
        parameters: ExportParameters,
        now: Instant,
    ) -> Result<ExportRequest, InvalidExportRequest> {
        let ExportParameters {
            level,
            since,
            until,
            types,
            mut patients,
            container,
            elements,
            unsupported,
            lenient,
        } = parameters;
        if let Some(problem) = unsupported.first()
            && !lenient
        {
            return Err(invalid(problem.clone()));
        }
        let mut ignored_under_lenient = unsupported;
        if since.is_some_and(|since| since > now) {
            return Err(invalid("_since is in the future"));
        }
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(invalid("_since must be earlier than _until"));
        }
        if level != ExportLevel::System
            && let Some(types) = &types
            && !types.is_empty()
            && types
                .iter()
                .all(|resource_type| !PatientCompartment::r4().contains_type(*resource_type))
        {
            let problem = "_type names only types outside the Patient compartment, which a Patient or Group export cannot contain";
            if !lenient {
                return Err(invalid(problem));
            }
            ignored_under_lenient.push(problem.to_owned());
        }
        if level == ExportLevel::System && !patients.is_empty() {
            return Err(invalid(
                "the patient parameter applies to Patient and Group exports only",
            ));
        }
        patients.sort();
        patients.dedup();
        Ok(ExportRequest {
            level,
            since,
            until,
            types,
            patients,
            container,
            elements,
            ignored_under_lenient,
        })
    }

    /// Parses an HTTP kick-off: its headers first, then its query and `Parameters` body
    /// into [`ExportParameters`], then [`ExportRequest::new`].
    pub fn parse(kick_off: &KickOff<'_>) -> Result<ExportRequest, InvalidExportRequest> {
        require_headers(kick_off)?;
        let mut parameters: Vec<(String, String)> =
            form_urlencoded::parse(kick_off.query.as_bytes())
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect();
        if parameters.iter().any(|(name, _)| name == "patient") {
            return Err(invalid(
                "the patient parameter is only accepted in a POST Parameters body",
            ));
        }
        if kick_off.is_post {
            parameters.extend(parameters_from_body(kick_off.body)?);
        }
        let mut typed = ExportParameters::new(kick_off.level.clone());
        typed.lenient = kick_off
            .prefer
            .iter()
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("handling=lenient"));
        for (name, value) in parameters {
            match name.as_str() {
                "_outputFormat" => {
                    let unescaped_plus = value.replace(' ', "+");
                    if !OUTPUT_FORMATS.contains(&unescaped_plus.as_str()) {
                        return Err(invalid(format!(
                            "_outputFormat '{value}' is not supported; use application/fhir+ndjson, application/ndjson or ndjson"
                        )));
                    }
                }
                "_since" => set_once(&mut typed.since, parse_instant("_since", &value)?, "_since")?,
                "_until" | "_till" => set_once(&mut typed.until, parse_instant(&name, &value)?, "_until/_till")?,
                "_type" => {
                    let types = typed.types.get_or_insert_with(BTreeSet::new);
                    for name in value.split(',').map(str::trim).filter(|name| !name.is_empty()) {
                        let resource_type = ResourceType::parse(name)
                            .map_err(|error| invalid(format!("_type: {error}")))?;
                        types.insert(resource_type);
                    }
                }
                "patient" => typed.patients.push(parse_patient_reference(&value)?),
                "_container" => {
                    let container = ContainerName::parse(&value).map_err(|error| invalid(format!("_container: {error}")))?;
                    set_once(&mut typed.container, container, "_container")?;
                }
                "_elements" => {
                    let mut names: Vec<&str> = value.split(',').filter(|name| !name.trim().is_empty()).collect();
                    if names.is_empty() {
                        names.push(&value);
                    }
                    for name in names {
                        if let Err(error) = typed.elements.add_value(name) {
                            typed.unsupported.push(error.to_string());
                        }
                    }
                }
                "allowPartialManifests" => {
                    if value != "true" && value != "false" {
                        return Err(invalid(format!("allowPartialManifests must be true or false, not '{value}'")));
                    }
                }
                unsupported if UNSUPPORTED_PARAMETERS.contains(&unsupported) => typed.unsupported.push(format!(
                    "{unsupported} is not supported yet; resubmit without it or with Prefer: handling=lenient"
                )),
                unknown => typed.unsupported.push(format!("unknown parameter '{unknown}'")),
            }
        }
        ExportRequest::new(typed, kick_off.now)
    }
}

fn require_headers(kick_off: &KickOff<'_>) -> Result<(), InvalidExportRequest> {
    let accepts_fhir_json = kick_off.accept.is_some_and(|accept| {
        accept.split(',').any(|media| {
            media
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/fhir+json")
        })
    });
    if !accepts_fhir_json {
        return Err(invalid(
            "a $export kick-off needs the header Accept: application/fhir+json",
        ));
    }
    let respond_async = kick_off
        .prefer
        .iter()
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("respond-async"));
    if !respond_async {
        return Err(invalid(
            "a $export kick-off needs the header Prefer: respond-async",
        ));
    }
    Ok(())
}

fn set_once<T: PartialEq>(
    slot: &mut Option<T>,
    value: T,
    name: &str,
) -> Result<(), InvalidExportRequest> {
    match slot {
        Some(existing) if *existing != value => Err(invalid(format!(
            "{name} is given twice with different values"
        ))),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

fn parse_instant(name: &str, value: &str) -> Result<Instant, InvalidExportRequest> {
    Instant::parse(value).map_err(|error| invalid(format!("{name}: {error}")))
}

fn parse_patient_reference(value: &str) -> Result<ResourceId, InvalidExportRequest> {
    let not_a_patient = || {
        invalid(format!(
            "patient '{value}' is not a reference like Patient/123"
        ))
    };
    let reference = LiteralReference::parse(value).ok_or_else(not_a_patient)?;
    if reference.resource_type_name != "Patient" {
        return Err(not_a_patient());
    }
    ResourceId::parse(reference.id).map_err(|_| not_a_patient())
}

/// Reads a `Parameters` body into (name, value) pairs.
fn parameters_from_body(body: &[u8]) -> Result<Vec<(String, String)>, InvalidExportRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| invalid(format!("body is not valid JSON: {error}")))?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid("a POST $export body must be a Parameters resource"));
    }
    let mut pairs = Vec::new();
    let parameters = match value.get("parameter") {
        None => return Ok(pairs),
        Some(Value::Array(parameters)) => parameters,
        Some(_) => return Err(invalid("Parameters.parameter must be an array")),
    };
    for (index, parameter) in parameters.iter().enumerate() {
        let name = parameter
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("Parameters.parameter[{index}] has no name")))?;
        let value = parameter
            .as_object()
            .and_then(|fields| {
                fields.iter().find_map(|(key, field)| {
                    let kind = key.strip_prefix("value")?;
                    match (kind, field) {
                        ("Reference", reference) => reference
                            .get("reference")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        (_, Value::String(text)) => Some(text.clone()),
                        (_, Value::Bool(flag)) => Some(flag.to_string()),
                        _ => None,
                    }
                })
            })
            .ok_or_else(|| {
                invalid(format!(
                    "Parameters.parameter[{index}] ({name}) has no usable value[x]"
                ))
            })?;
        pairs.push((name.to_owned(), value));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick_off<'a>(query: &'a str, prefer: Vec<&'a str>) -> KickOff<'a> {
        KickOff {
            level: ExportLevel::System,
            is_post: false,
            query,
            accept: Some("application/fhir+json"),
            prefer,
            body: b"",
            now: Instant::parse("2030-01-01T00:00:00Z").unwrap(),
        }
    }

    fn parse(query: &str) -> Result<ExportRequest, InvalidExportRequest> {
        ExportRequest::parse(&kick_off(query, vec!["respond-async"]))
    }

    #[test]
    fn parses_every_supported_parameter() {
        let request = parse(
            "_outputFormat=application%2Ffhir%2Bndjson&_since=2020-01-01T00:00:00Z&_till=2021-01-01T00:00:00Z&_type=Patient,Observation&_type=Encounter&_container=my-exports",
        )
        .unwrap();
        assert_eq!(
            request.since,
            Some(Instant::parse("2020-01-01T00:00:00Z").unwrap())
        );
        assert_eq!(
            request.until,
            Some(Instant::parse("2021-01-01T00:00:00Z").unwrap())
        );
        let types: Vec<&str> = request
            .types
            .unwrap()
            .iter()
            .map(|resource_type| resource_type.as_str())
            .collect();
        assert_eq!(types, vec!["Encounter", "Observation", "Patient"]);
        assert_eq!(request.container.unwrap().as_str(), "my-exports");
    }

    #[test]
    fn rejects_each_bad_parameter_with_a_reason() {
        let cases = [
            ("_outputFormat=text/csv", "_outputFormat"),
            ("_since=yesterday", "_since"),
            ("_since=2099-01-01T00:00:00Z", "future"),
            (
                "_since=2021-01-01T00:00:00Z&_until=2020-01-01T00:00:00Z",
                "earlier",
            ),
            ("_type=Patient,Nope", "Nope"),
            ("_container=../etc", "container"),
            ("_typeFilter=Observation%3Fstatus%3Dfinal", "_typeFilter"),
            ("_elements=code,nonsense", "nonsense"),
            ("_elements=Observation.gender", "Observation.gender"),
            (
                "includeAssociatedData=LatestProvenanceResources",
                "includeAssociatedData",
            ),
            ("bogus=1", "bogus"),
            ("patient=Patient/1", "POST"),
            (
                "_since=2020-01-01T00:00:00Z&_since=2020-02-01T00:00:00Z",
                "twice",
            ),
        ];
        for (query, expected) in cases {
            let error = parse(query).expect_err(query);
            assert!(error.0.contains(expected), "{query}: {error}");
        }
    }

    #[test]
    fn patient_level_types_must_touch_the_compartment_and_a_raw_plus_is_accepted() {
        let mut patient_level = kick_off("_type=Organization,Practitioner", vec!["respond-async"]);
        patient_level.level = ExportLevel::AllPatients;
        assert!(
            ExportRequest::parse(&patient_level)
                .unwrap_err()
                .0
                .contains("Patient compartment")
        );
        patient_level.query = "_type=Organization,Observation";
        assert!(ExportRequest::parse(&patient_level).is_ok());
        patient_level.query = "_type=Organization";
        patient_level.prefer = vec!["respond-async", "handling=lenient"];
        assert_eq!(
            ExportRequest::parse(&patient_level)
                .unwrap()
                .ignored_under_lenient
                .len(),
            1
        );
        assert!(parse("_outputFormat=application/fhir+ndjson").is_ok());
    }

    #[test]
    fn headers_are_required() {
        let mut missing_prefer = kick_off("", vec![]);
        assert!(
            ExportRequest::parse(&missing_prefer)
                .unwrap_err()
                .0
                .contains("respond-async")
        );
        missing_prefer.prefer = vec!["respond-async"];
        missing_prefer.accept = Some("application/json");
        assert!(
            ExportRequest::parse(&missing_prefer)
                .unwrap_err()
                .0
                .contains("Accept")
        );
    }

    #[test]
    fn lenient_handling_ignores_and_reports() {
        let request = ExportRequest::parse(&kick_off(
            "_elements=code,Observation.bogus&zzz=1",
            vec!["respond-async, handling=lenient"],
        ))
        .unwrap();
        assert_eq!(request.ignored_under_lenient.len(), 2);
        assert!(request.ignored_under_lenient[0].contains("Observation.bogus"));
        let observation = ResourceType::parse("Observation").unwrap();
        assert!(request.elements.applies_to(observation));
    }

    #[test]
    fn elements_parse_from_the_query_and_from_a_parameters_body() {
        let observation = ResourceType::parse("Observation").unwrap();
        let from_query = parse("_elements=Observation.code&_elements=subject").unwrap();
        assert!(from_query.elements.applies_to(observation));
        assert!(from_query.elements.applies_to(ResourceType::PATIENT));
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_elements","valueString":"Observation.code,Observation.subject"}]}"#;
        let mut post = kick_off("", vec!["respond-async"]);
        post.is_post = true;
        post.body = body;
        let from_body = ExportRequest::parse(&post).unwrap();
        assert!(from_body.elements.applies_to(observation));
        assert!(!from_body.elements.applies_to(ResourceType::PATIENT));
    }

    #[test]
    fn post_parameters_carry_patients() {
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_type","valueString":"Observation"},
            {"name":"patient","valueReference":{"reference":"Patient/p2"}},
            {"name":"patient","valueReference":{"reference":"Patient/p1"}}]}"#;
        let mut post = kick_off("", vec!["respond-async"]);
        post.is_post = true;
        post.level = ExportLevel::AllPatients;
        post.body = body;
        let request = ExportRequest::parse(&post).unwrap();
        let patients: Vec<&str> = request.patients.iter().map(ResourceId::as_str).collect();
        assert_eq!(patients, vec!["p1", "p2"]);
        post.level = ExportLevel::System;
        assert!(ExportRequest::parse(&post).is_err());
    }

    #[test]
    fn typed_parameters_get_the_same_cross_checks_as_a_kick_off() {
        let now = Instant::parse("2030-01-01T00:00:00Z").unwrap();
        let mut parameters = ExportParameters::new(ExportLevel::AllPatients);
        parameters.types = Some(BTreeSet::from([
            ResourceType::parse("Organization").unwrap()
        ]));
        let refused = ExportRequest::new(parameters.clone(), now).unwrap_err();
        assert!(refused.0.contains("Patient compartment"), "{refused}");
        parameters.types = None;
        parameters.since = Some(Instant::parse("2031-01-01T00:00:00Z").unwrap());
        assert!(
            ExportRequest::new(parameters.clone(), now)
                .unwrap_err()
                .0
                .contains("future")
        );
        parameters.since = Some(Instant::parse("2020-01-01T00:00:00Z").unwrap());
        parameters.patients = vec![
            ResourceId::parse("b").unwrap(),
            ResourceId::parse("a").unwrap(),
            ResourceId::parse("b").unwrap(),
        ];
        let request = ExportRequest::new(parameters.clone(), now).unwrap();
        let patients: Vec<&str> = request.patients.iter().map(ResourceId::as_str).collect();
        assert_eq!(patients, vec!["a", "b"]);
        assert_eq!(
            request,
            ExportRequest::parse(&KickOff {
                level: ExportLevel::AllPatients,
                is_post: true,
                query: "_since=2020-01-01T00:00:00Z",
                accept: Some("application/fhir+json"),
                prefer: vec!["respond-async"],
                body: br#"{"resourceType":"Parameters","parameter":[
                    {"name":"patient","valueReference":{"reference":"Patient/b"}},
                    {"name":"patient","valueReference":{"reference":"Patient/a"}}]}"#,
                now,
            })
            .unwrap()
        );
        parameters.level = ExportLevel::System;
        assert!(ExportRequest::new(parameters, now).is_err());
    }
}
