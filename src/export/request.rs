//! Turning a kick-off (query or `Parameters` body plus headers, or `fhirlog export` flags)
//! into a typed [`ExportRequest`] through one constructor, with a clear error for anything
//! it cannot honour.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fhir::compartment::{LiteralReference, PatientCompartment};
use crate::fhir::{Instant, LocalBase, ResourceId, ResourceType};
use crate::search::elements::ElementsSelection;
use crate::search::matching::prefilter::RawBody;
use crate::search::query::{SearchQuery, SearchQueryError};
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
    /// `_typeFilter`: per type, the queries a resource must meet one of.
    pub type_filters: TypeFilters,
    /// `includeAssociatedData` as given; `None` when the kick-off did not name it, so the
    /// server's default applies ([`ExportRequest::with_default_associated_data`]).
    pub associated_data: Option<AssociatedData>,
}

/// What a Patient or Group export holds besides the patients' compartments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssociatedData {
    /// `_referenced` (this server's own value): every resource outside the Patient
    /// compartment that an exported compartment resource references, one hop, once.
    pub referenced: bool,
    /// `RelevantProvenanceResources` (v3): every Provenance whose target is an exported
    /// resource, the referenced ones included (without it, only those targeting a
    /// compartment resource).
    pub relevant_provenance: bool,
    /// `LatestProvenanceResources` (v3): for each exported non-Provenance resource, only
    /// the most recent Provenance naming it; `RelevantProvenanceResources` overrides it.
    #[serde(default)]
    pub latest_provenance: bool,
}

/// Our custom `includeAssociatedData` value: the resources the compartments reference.
pub const REFERENCED_VALUE: &str = "_referenced";
/// The Bulk Data v3 value for every Provenance whose target is an exported resource.
pub const RELEVANT_PROVENANCE_VALUE: &str = "RelevantProvenanceResources";
/// The Bulk Data v3 value for the most recent Provenance of each exported resource.
pub const LATEST_PROVENANCE_VALUE: &str = "LatestProvenanceResources";

/// The `_typeFilter` queries of a request, per resource type, kept as the query text after
/// `Type?` (so the job record stays plain data); each was parsed when the request was made
/// and is parsed again where it is applied. Types without a query are exported whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeFilters(BTreeMap<ResourceType, Vec<String>>);

/// The parsed `_typeFilter` queries for one type: a resource passes when it meets any.
#[derive(Debug)]
pub struct TypeFilter(Vec<SearchQuery>);

impl TypeFilter {
    /// False only when no query can match this stored body (see [`SearchQuery::may_match_body`]).
    pub fn may_match_body(&self, body: &RawBody<'_>) -> bool {
        self.0.iter().any(|query| query.may_match_body(body))
    }

    pub fn matches(&self, resource: &Value) -> bool {
        self.0.iter().any(|query| query.matches(resource))
    }
}

impl TypeFilters {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The types that have a filter, with their query texts.
    pub fn iter(&self) -> impl Iterator<Item = (ResourceType, &[String])> {
        self.0
            .iter()
            .map(|(resource_type, queries)| (*resource_type, queries.as_slice()))
    }

    /// The parsed filter for `resource_type`, run on the server at `local_base`; `None` when
    /// its resources are not filtered.
    pub fn filter_for(
        &self,
        resource_type: ResourceType,
        local_base: &LocalBase,
    ) -> Result<Option<TypeFilter>, SearchQueryError> {
        let Some(queries) = self.0.get(&resource_type) else {
            return Ok(None);
        };
        let parsed = queries
            .iter()
            .map(|query| {
                SearchQuery::parse(resource_type, query)
                    .map(|parsed| parsed.on_local_base(local_base.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(TypeFilter(parsed)))
    }
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
    /// This server's base: a `patient` reference must name a patient stored here.
    pub local_base: &'a LocalBase,
}

const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];
const UNSUPPORTED_PARAMETERS: [&str; 1] = ["organizeOutputBy"];

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
    /// `_typeFilter` values as given, each `Type?query`.
    pub type_filters: Vec<String>,
    /// `includeAssociatedData` values as given, each split on commas.
    pub include_associated_data: Vec<String>,
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
            type_filters: Vec::new(),
            include_associated_data: Vec::new(),
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
            type_filters: TypeFilters::default(),
            associated_data: None,
        }
    }

    /// The request with the server's default associated data when the kick-off named none:
    /// `_referenced` for Patient and Group exports under `--include-referenced`.
    pub fn with_default_associated_data(mut self, include_referenced: bool) -> ExportRequest {
        if self.associated_data.is_none() && include_referenced && self.level != ExportLevel::System
        {
            self.associated_data = Some(AssociatedData {
                referenced: true,
                relevant_provenance: false,
                latest_provenance: false,
            });
        }
        self
    }

    /// Whether Provenance targeting referenced resources is added too.
    pub fn wants_relevant_provenance(&self) -> bool {
        self.associated_data
            .is_some_and(|associated_data| associated_data.relevant_provenance)
    }

    /// Whether the export holds only the most recent Provenance of each exported
    /// non-Provenance resource: under `LatestProvenanceResources` unless
    /// `RelevantProvenanceResources` is named too (v3: the least restrictive value wins).
    pub fn wants_latest_provenance(&self) -> bool {
        self.associated_data.is_some_and(|associated_data| {
            associated_data.latest_provenance && !associated_data.relevant_provenance
        })
    }

    /// Whether the export adds the resources its compartment resources reference.
    pub fn wants_referenced(&self) -> bool {
        self.associated_data
            .is_some_and(|associated_data| associated_data.referenced)
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
            type_filters,
            include_associated_data,
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
        let type_filters = parse_type_filters(
            &type_filters,
            types.as_ref(),
            lenient,
            &mut ignored_under_lenient,
        )?;
        let associated_data = parse_associated_data(
            &include_associated_data,
            &level,
            lenient,
            &mut ignored_under_lenient,
        )?;
        Ok(ExportRequest {
            level,
            since,
            until,
            types,
            patients,
            container,
            elements,
            ignored_under_lenient,
            type_filters,
            associated_data,
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
                "patient" => typed.patients.push(parse_patient_reference(&value, kick_off.local_base)?),
                "_typeFilter" => typed.type_filters.push(value),
                "includeAssociatedData" => typed.include_associated_data.extend(
                    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned),
                ),
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

/// Reads the `includeAssociatedData` values: `_referenced`, `RelevantProvenanceResources`
/// and `LatestProvenanceResources` at Patient and Group level; unknown values and those
/// at system level (which already holds every resource) are refused, or
/// under lenient handling dropped and reported. `None` when no value was given.
fn parse_associated_data(
    values: &[String],
    level: &ExportLevel,
    lenient: bool,
    ignored_under_lenient: &mut Vec<String>,
) -> Result<Option<AssociatedData>, InvalidExportRequest> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut associated_data = AssociatedData::default();
    for value in values {
        let slot = match value.as_str() {
            REFERENCED_VALUE => Some(&mut associated_data.referenced),
            RELEVANT_PROVENANCE_VALUE => Some(&mut associated_data.relevant_provenance),
            LATEST_PROVENANCE_VALUE => Some(&mut associated_data.latest_provenance),
            _ => None,
        };
        let problem = if let Some(slot) = slot {
            if *level != ExportLevel::System {
                *slot = true;
                continue;
            }
            format!(
                "includeAssociatedData={value} applies to Patient and Group exports; a system export already holds every resource"
            )
        } else {
            format!(
                "includeAssociatedData value '{value}' is unknown; this server supports {REFERENCED_VALUE}, {RELEVANT_PROVENANCE_VALUE} and {LATEST_PROVENANCE_VALUE}"
            )
        };
        if !lenient {
            return Err(invalid(problem));
        }
        ignored_under_lenient.push(problem);
    }
    Ok(Some(associated_data))
}

/// Checks each `Type?query` value: the type must be one `_type` names (when given), and the
/// query must parse; a query that does not is refused, or under lenient handling dropped
/// and reported. Several queries for one type are kept side by side (ORed).
fn parse_type_filters(
    values: &[String],
    types: Option<&BTreeSet<ResourceType>>,
    lenient: bool,
    ignored_under_lenient: &mut Vec<String>,
) -> Result<TypeFilters, InvalidExportRequest> {
    let mut filters: BTreeMap<ResourceType, Vec<String>> = BTreeMap::new();
    for value in values {
        let (type_name, query) = value.split_once('?').unwrap_or((value.as_str(), ""));
        let resource_type = ResourceType::parse(type_name).map_err(|_| {
            invalid(format!(
                "_typeFilter '{value}' does not start with a resource type and '?', as in Observation?category=laboratory"
            ))
        })?;
        if types.is_some_and(|types| !types.contains(&resource_type)) {
            return Err(invalid(format!(
                "_typeFilter '{value}' filters {resource_type}, which _type does not include"
            )));
        }
        if let Err(problem) = SearchQuery::parse(resource_type, query) {
            let message = format!("_typeFilter '{value}': {problem}");
            if !lenient {
                return Err(invalid(message));
            }
            ignored_under_lenient.push(format!("{message}; this filter was ignored"));
            continue;
        }
        let queries = filters.entry(resource_type).or_default();
        if !queries.iter().any(|known| known == query) {
            queries.push(query.to_owned());
        }
    }
    Ok(TypeFilters(filters))
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

/// A `patient` reference: `Patient/id`, or an absolute URL under this server's base.
fn parse_patient_reference(
    value: &str,
    local_base: &LocalBase,
) -> Result<ResourceId, InvalidExportRequest> {
    let not_a_patient = || {
        invalid(format!(
            "patient '{value}' is not a reference like Patient/123"
        ))
    };
    let reference = LiteralReference::parse(value).ok_or_else(not_a_patient)?;
    if local_base.local_reference(value).is_none() {
        return Err(invalid(format!(
            "patient '{value}' names a resource on another server; use Patient/id or a URL under {}",
            local_base.base_url().unwrap_or("this server's base")
        )));
    }
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
            local_base: &TEST_BASE,
        }
    }

    fn parse(query: &str) -> Result<ExportRequest, InvalidExportRequest> {
        ExportRequest::parse(&kick_off(query, vec!["respond-async"]))
    }

    /// A POST kick-off at `level` with this Parameters body.
    static TEST_BASE: std::sync::LazyLock<LocalBase> =
        std::sync::LazyLock::new(|| LocalBase::at("https://ours.example/fhir"));

    fn parse_post(level: ExportLevel, body: &[u8]) -> Result<ExportRequest, InvalidExportRequest> {
        let mut post = kick_off("", vec!["respond-async"]);
        post.is_post = true;
        post.level = level;
        post.body = body;
        ExportRequest::parse(&post)
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
            (
                "_typeFilter=Observation%3Fstatus%3Dnope%26bogus%3D1",
                "bogus",
            ),
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
    fn include_associated_data_takes_referenced_at_patient_and_group_level_only() {
        let at_level = |level: ExportLevel, query: &'static str, lenient: bool| {
            let mut prefer = vec!["respond-async"];
            if lenient {
                prefer.push("handling=lenient");
            }
            let mut request = kick_off(query, prefer);
            request.level = level;
            ExportRequest::parse(&request)
        };
        let group = || ExportLevel::Group(ResourceId::parse("g").unwrap());
        for level in [ExportLevel::AllPatients, group()] {
            for query in [
                "includeAssociatedData=_referenced",
                "includeAssociatedData=_referenced,_referenced",
                "includeAssociatedData=_referenced&includeAssociatedData=_referenced",
            ] {
                let request = at_level(level.clone(), query, false).unwrap();
                assert!(request.wants_referenced(), "{query}");
                assert!(request.ignored_under_lenient.is_empty(), "{query}");
            }
            let plain = at_level(level.clone(), "", false).unwrap();
            assert_eq!(plain.associated_data, None);
            assert!(
                !plain
                    .clone()
                    .with_default_associated_data(false)
                    .wants_referenced()
            );
            assert!(plain.with_default_associated_data(true).wants_referenced());
            let latest = at_level(
                level.clone(),
                "includeAssociatedData=LatestProvenanceResources",
                false,
            )
            .unwrap();
            assert!(latest.wants_latest_provenance());
            let least_restrictive = at_level(
                level.clone(),
                "includeAssociatedData=LatestProvenanceResources,RelevantProvenanceResources",
                false,
            )
            .unwrap();
            assert!(!least_restrictive.wants_latest_provenance());
            assert!(least_restrictive.wants_relevant_provenance());
        }
        for (level, query, named) in [
            (
                ExportLevel::AllPatients,
                "includeAssociatedData=_nonsense",
                "_nonsense",
            ),
            (group(), "includeAssociatedData=_referenced,Bogus", "Bogus"),
            (
                ExportLevel::System,
                "includeAssociatedData=LatestProvenanceResources",
                "system",
            ),
            (
                ExportLevel::System,
                "includeAssociatedData=RelevantProvenanceResources",
                "system",
            ),
            (
                ExportLevel::System,
                "includeAssociatedData=_referenced",
                "system",
            ),
        ] {
            let refused = at_level(level.clone(), query, false).expect_err(query);
            assert!(refused.0.contains(named), "{query}: {refused}");
            let lenient = at_level(level, query, true).unwrap();
            assert_eq!(lenient.ignored_under_lenient.len(), 1, "{query}");
            assert!(lenient.ignored_under_lenient[0].contains(named), "{query}");
        }
        let lenient_mix =
            at_level(group(), "includeAssociatedData=_referenced,Bogus", true).unwrap();
        assert!(lenient_mix.wants_referenced());
        let system_default = at_level(ExportLevel::System, "", false)
            .unwrap()
            .with_default_associated_data(true);
        assert!(!system_default.wants_referenced());
        let named_otherwise = at_level(
            ExportLevel::AllPatients,
            "includeAssociatedData=_nonsense",
            true,
        )
        .unwrap()
        .with_default_associated_data(true);
        assert!(
            !named_otherwise.wants_referenced(),
            "a kick-off that names includeAssociatedData is not given the server's default"
        );
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
        let from_body = parse_post(ExportLevel::System, body).unwrap();
        assert!(from_body.elements.applies_to(observation));
        assert!(!from_body.elements.applies_to(ResourceType::PATIENT));
    }

    fn filter_texts(request: &ExportRequest) -> Vec<(String, Vec<String>)> {
        request
            .type_filters
            .iter()
            .map(|(resource_type, queries)| (resource_type.to_string(), queries.to_vec()))
            .collect()
    }

    #[test]
    fn type_filters_are_kept_per_type_with_their_inner_encoding() {
        let request = parse(
            "_type=Observation,Condition&_typeFilter=Observation%3Fcategory%3Dlaboratory%252Cvital-signs%26date%3Dge2015-01-01&_typeFilter=Observation%3Fstatus%3Dfinal&_typeFilter=Condition%3Fclinical-status%3Dactive",
        )
        .unwrap();
        assert_eq!(
            filter_texts(&request),
            vec![
                (
                    "Condition".to_owned(),
                    vec!["clinical-status=active".to_owned()]
                ),
                (
                    "Observation".to_owned(),
                    vec![
                        "category=laboratory%2Cvital-signs&date=ge2015-01-01".to_owned(),
                        "status=final".to_owned()
                    ]
                ),
            ]
        );
        let observation = ResourceType::parse("Observation").unwrap();
        let filter = request
            .type_filters
            .filter_for(observation, &LocalBase::relative_only())
            .unwrap()
            .unwrap();
        let vital = serde_json::json!({"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"code": "vital-signs"}]}], "effectiveDateTime": "2014-01-01"});
        assert!(filter.matches(&vital), "the second query matches");
        let amended = serde_json::json!({"resourceType": "Observation", "status": "amended",
            "category": [{"coding": [{"code": "vital-signs"}]}], "effectiveDateTime": "2016-01-01"});
        assert!(
            filter.matches(&amended),
            "the encoded comma ORs the categories"
        );
        let old = serde_json::json!({"resourceType": "Observation", "status": "amended",
            "category": [{"coding": [{"code": "laboratory"}]}], "effectiveDateTime": "2014-01-01"});
        assert!(!filter.matches(&old));
        assert!(
            request
                .type_filters
                .filter_for(ResourceType::PATIENT, &LocalBase::relative_only())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn type_filters_outside_type_or_malformed_are_refused_by_name() {
        for (query, named) in [
            (
                "_type=Patient&_typeFilter=Observation%3Fstatus%3Dfinal",
                "_type does not include",
            ),
            (
                "_typeFilter=Observation%3Fcode-value-quantity%3Dx",
                "code-value-quantity",
            ),
            ("_typeFilter=Observation%3F_sort%3Ddate", "_sort"),
            ("_typeFilter=Observation%3Fdate%3Dge2015-13", "ge2015-13"),
            ("_typeFilter=Observation%3Ffamily%3Dx", "family"),
            ("_typeFilter=status%3Dfinal", "status=final"),
            ("_typeFilter=Nonsense%3Fstatus%3Dfinal", "Nonsense"),
        ] {
            let refused = parse(query).unwrap_err();
            assert!(refused.0.contains(named), "{query}: {refused}");
        }
    }

    #[test]
    fn lenient_handling_drops_a_bad_type_filter_and_reports_it() {
        let request = ExportRequest::parse(&kick_off(
            "_typeFilter=Observation%3F_include%3DObservation%3Asubject&_typeFilter=Condition%3Fclinical-status%3Dactive",
            vec!["respond-async, handling=lenient"],
        ))
        .unwrap();
        assert_eq!(
            filter_texts(&request),
            vec![(
                "Condition".to_owned(),
                vec!["clinical-status=active".to_owned()]
            )]
        );
        assert_eq!(request.ignored_under_lenient.len(), 1);
        assert!(request.ignored_under_lenient[0].contains("_include"));
        let outside = ExportRequest::parse(&kick_off(
            "_type=Patient&_typeFilter=Observation%3Fstatus%3Dfinal",
            vec!["respond-async, handling=lenient"],
        ));
        assert!(
            outside.is_err(),
            "a filter outside _type is refused even when lenient"
        );
    }

    #[test]
    fn post_parameters_carry_type_filters() {
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_typeFilter","valueString":"Observation?category=laboratory%2Cvital-signs"}]}"#;
        let request = parse_post(ExportLevel::System, body).unwrap();
        assert_eq!(
            filter_texts(&request),
            vec![(
                "Observation".to_owned(),
                vec!["category=laboratory%2Cvital-signs".to_owned()]
            )]
        );
    }

    #[test]
    fn patient_references_must_name_a_patient_on_this_server() {
        let body_naming = |reference: &str| {
            format!(
                r#"{{"resourceType":"Parameters","parameter":[{{"name":"patient","valueReference":{{"reference":"{reference}"}}}}]}}"#
            )
        };
        for local in ["Patient/p1", "https://ours.example/fhir/Patient/p1"] {
            let request = parse_post(ExportLevel::AllPatients, body_naming(local).as_bytes())
                .unwrap_or_else(|error| panic!("{local}: {error:?}"));
            assert_eq!(request.patients[0].as_str(), "p1", "{local}");
        }
        for foreign in [
            "https://other.example/fhir/Patient/p1",
            "https://ours.example/Patient/p1",
        ] {
            let refused = parse_post(ExportLevel::AllPatients, body_naming(foreign).as_bytes())
                .expect_err(foreign);
            assert!(
                refused.0.contains("another server"),
                "{foreign}: {refused:?}"
            );
        }
        for malformed in ["Observation/o1", "p1", "#p1"] {
            let refused = parse_post(ExportLevel::AllPatients, body_naming(malformed).as_bytes())
                .expect_err(malformed);
            assert!(
                refused.0.contains("is not a reference like Patient/123"),
                "{malformed}"
            );
        }
    }

    #[test]
    fn post_parameters_carry_patients() {
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_type","valueString":"Observation"},
            {"name":"patient","valueReference":{"reference":"Patient/p2"}},
            {"name":"patient","valueReference":{"reference":"Patient/p1"}}]}"#;
        let request = parse_post(ExportLevel::AllPatients, body).unwrap();
        let patients: Vec<&str> = request.patients.iter().map(ResourceId::as_str).collect();
        assert_eq!(patients, vec!["p1", "p2"]);
        assert!(parse_post(ExportLevel::System, body).is_err());
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
                local_base: &TEST_BASE,
            })
            .unwrap()
        );
        parameters.level = ExportLevel::System;
        assert!(ExportRequest::new(parameters, now).is_err());
    }
}
