//! The R4 search parameters this server evaluates, read from the compact table in
//! `data/r4/search-parameters.tsv` (derived from the official SearchParameter Bundle; a test
//! re-derives it). Each parameter's expression is compiled once per (resource type,
//! parameter), the first time a query uses it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use crate::fhir::ResourceType;
use crate::search::fhirpath::{CompiledFhirPath, UnsupportedFhirPath};

const SEARCH_PARAMETERS_TSV: &str = include_str!("../../data/r4/search-parameters.tsv");

/// Types that derive from `Resource` but not from `DomainResource` in R4.
const NON_DOMAIN_RESOURCE_TYPES: [&str; 3] = ["Binary", "Bundle", "Parameters"];

/// The search parameter types matching supports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SearchParameterType {
    String,
    Token,
    Reference,
    Date,
    Number,
    Quantity,
    Uri,
}

impl SearchParameterType {
    /// The FHIR code of the type, as in `SearchParameter.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            SearchParameterType::String => "string",
            SearchParameterType::Token => "token",
            SearchParameterType::Reference => "reference",
            SearchParameterType::Date => "date",
            SearchParameterType::Number => "number",
            SearchParameterType::Quantity => "quantity",
            SearchParameterType::Uri => "uri",
        }
    }

    fn parse(code: &str) -> Option<SearchParameterType> {
        Some(match code {
            "string" => SearchParameterType::String,
            "token" => SearchParameterType::Token,
            "reference" => SearchParameterType::Reference,
            "date" => SearchParameterType::Date,
            "number" => SearchParameterType::Number,
            "quantity" => SearchParameterType::Quantity,
            "uri" => SearchParameterType::Uri,
            _ => return None,
        })
    }
}

impl fmt::Display for SearchParameterType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One search parameter as it applies to one resource type.
pub struct SearchParameter {
    pub resource_type: ResourceType,
    pub code: &'static str,
    pub parameter_type: SearchParameterType,
    /// The canonical URL of the SearchParameter definition.
    pub definition_url: &'static str,
    /// The FHIRPath expression over every base type of the definition.
    pub expression: &'static str,
    /// The resource types a reference parameter may point to.
    pub targets: Vec<ResourceType>,
    compiled: OnceLock<Result<CompiledFhirPath, UnsupportedFhirPath>>,
}

impl SearchParameter {
    /// The expression compiled for this parameter's resource type, compiled on first use.
    pub fn compiled(&self) -> Result<&CompiledFhirPath, &UnsupportedFhirPath> {
        self.compiled
            .get_or_init(|| CompiledFhirPath::compile(self.expression, self.resource_type))
            .as_ref()
    }
}

impl fmt::Debug for SearchParameter {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SearchParameter")
            .field("resource_type", &self.resource_type)
            .field("code", &self.code)
            .field("parameter_type", &self.parameter_type)
            .finish_non_exhaustive()
    }
}

/// A parameter the registry knows but does not evaluate: composite and special parameters,
/// and those without an expression (`_text`, `_content`, `_query`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedSearchParameter {
    pub code: &'static str,
    /// The `SearchParameter.type` code, e.g. `composite`.
    pub type_code: &'static str,
}

/// What the registry knows of a parameter code on one resource type.
#[derive(Debug)]
pub enum ParameterLookup<'registry> {
    Supported(&'registry SearchParameter),
    Unsupported(UnsupportedSearchParameter),
    Unknown,
}

/// Every R4 search parameter per resource type.
pub struct SearchParameterRegistry {
    supported_by_type_code: Vec<BTreeMap<&'static str, SearchParameter>>,
    unsupported_by_type_code: Vec<BTreeMap<&'static str, UnsupportedSearchParameter>>,
}

/// One row of the shipped table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SearchParameterRow<'text> {
    code: &'text str,
    type_code: &'text str,
    bases: Vec<&'text str>,
    url: &'text str,
    targets: Vec<&'text str>,
    expression: &'text str,
}

impl<'text> SearchParameterRow<'text> {
    #[cfg(test)]
    fn to_tsv_line(&self) -> String {
        [
            self.code,
            self.type_code,
            &self.bases.join(","),
            self.url,
            &self.targets.join(","),
            self.expression,
        ]
        .join("\t")
    }

    fn parse_tsv_line(line: &'text str) -> SearchParameterRow<'text> {
        let mut fields = line.split('\t');
        let mut next = || fields.next().unwrap_or_default();
        let list = |field: &'text str| -> Vec<&'text str> {
            field.split(',').filter(|item| !item.is_empty()).collect()
        };
        let code = next();
        let type_code = next();
        let bases = list(next());
        let url = next();
        let targets = list(next());
        let expression = next();
        SearchParameterRow {
            code,
            type_code,
            bases,
            url,
            targets,
            expression,
        }
    }
}

fn shipped_rows() -> impl Iterator<Item = SearchParameterRow<'static>> {
    SEARCH_PARAMETERS_TSV
        .lines()
        .map(SearchParameterRow::parse_tsv_line)
}

fn types_for_base(base: &str) -> Vec<ResourceType> {
    match base {
        "Resource" => ResourceType::all().collect(),
        "DomainResource" => ResourceType::all()
            .filter(|resource_type| !NON_DOMAIN_RESOURCE_TYPES.contains(&resource_type.as_str()))
            .collect(),
        concrete => ResourceType::parse(concrete).into_iter().collect(),
    }
}

impl SearchParameterRegistry {
    /// The registry of the R4 parameters, built once.
    pub fn r4() -> &'static SearchParameterRegistry {
        static REGISTRY: OnceLock<SearchParameterRegistry> = OnceLock::new();
        REGISTRY.get_or_init(SearchParameterRegistry::from_shipped_table)
    }

    fn from_shipped_table() -> SearchParameterRegistry {
        let type_count = ResourceType::all().count();
        let mut supported_by_type_code: Vec<BTreeMap<&'static str, SearchParameter>> =
            (0..type_count).map(|_| BTreeMap::new()).collect();
        let mut unsupported_by_type_code: Vec<BTreeMap<&'static str, UnsupportedSearchParameter>> =
            (0..type_count).map(|_| BTreeMap::new()).collect();
        for row in shipped_rows() {
            let parameter_type =
                SearchParameterType::parse(row.type_code).filter(|_| !row.expression.is_empty());
            let targets: Vec<ResourceType> = row
                .targets
                .iter()
                .filter_map(|target| ResourceType::parse(target).ok())
                .collect();
            for resource_type in row.bases.iter().flat_map(|base| types_for_base(base)) {
                let index = resource_type.code() as usize;
                match parameter_type {
                    Some(parameter_type) => {
                        supported_by_type_code[index].insert(
                            row.code,
                            SearchParameter {
                                resource_type,
                                code: row.code,
                                parameter_type,
                                definition_url: row.url,
                                expression: row.expression,
                                targets: targets.clone(),
                                compiled: OnceLock::new(),
                            },
                        );
                    }
                    None => {
                        unsupported_by_type_code[index].insert(
                            row.code,
                            UnsupportedSearchParameter {
                                code: row.code,
                                type_code: row.type_code,
                            },
                        );
                    }
                }
            }
        }
        SearchParameterRegistry {
            supported_by_type_code,
            unsupported_by_type_code,
        }
    }

    /// What the registry knows of `code` on `resource_type`.
    pub fn lookup(&self, resource_type: ResourceType, code: &str) -> ParameterLookup<'_> {
        let index = resource_type.code() as usize;
        if let Some(parameter) = self.supported_by_type_code[index].get(code) {
            return ParameterLookup::Supported(parameter);
        }
        match self.unsupported_by_type_code[index].get(code) {
            Some(unsupported) => ParameterLookup::Unsupported(*unsupported),
            None => ParameterLookup::Unknown,
        }
    }

    /// Compiles every supported parameter's expression now, so that no request pays for it.
    pub fn compile_every_expression(&self) {
        for parameters in &self.supported_by_type_code {
            for parameter in parameters.values() {
                let _ = parameter.compiled();
            }
        }
    }

    /// The supported parameters of one type, by code.
    pub fn parameters_of(
        &self,
        resource_type: ResourceType,
    ) -> impl Iterator<Item = &SearchParameter> {
        self.supported_by_type_code[resource_type.code() as usize].values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFICIAL_SEARCH_PARAMETERS: &str = "../shared/fhir-r4/search-parameters.json";

    fn string_field<'value>(resource: &'value serde_json::Value, name: &str) -> &'value str {
        resource[name].as_str().unwrap_or_default()
    }

    fn string_list<'value>(resource: &'value serde_json::Value, name: &str) -> Vec<&'value str> {
        resource[name]
            .as_array()
            .map(|items| items.iter().filter_map(|item| item.as_str()).collect())
            .unwrap_or_default()
    }

    /// Re-derives the shipped table from the official Bundle; run with
    /// `FHIRLOG_REGENERATE_SEARCH_PARAMETERS=1` to rewrite it after changing the derivation.
    #[test]
    fn shipped_table_is_derived_from_the_official_search_parameters() {
        let manifest_dir = env!("CARGO_MANIFEST_DIR");
        let official_path = format!("{manifest_dir}/{OFFICIAL_SEARCH_PARAMETERS}");
        let Ok(official_text) = std::fs::read_to_string(&official_path) else {
            panic!(
                "{official_path} is missing: the shared FHIR R4 definitions must sit beside the repo"
            );
        };
        let bundle: serde_json::Value = serde_json::from_str(&official_text).unwrap();
        let derived: String = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                let resource = &entry["resource"];
                let row = SearchParameterRow {
                    code: string_field(resource, "code"),
                    type_code: string_field(resource, "type"),
                    bases: string_list(resource, "base"),
                    url: string_field(resource, "url"),
                    targets: string_list(resource, "target"),
                    expression: string_field(resource, "expression"),
                };
                row.to_tsv_line() + "\n"
            })
            .collect();
        if std::env::var_os("FHIRLOG_REGENERATE_SEARCH_PARAMETERS").is_some() {
            std::fs::write(
                format!("{manifest_dir}/data/r4/search-parameters.tsv"),
                &derived,
            )
            .unwrap();
        }
        assert_eq!(derived.lines().count(), 1378);
        assert!(
            derived == SEARCH_PARAMETERS_TSV,
            "data/r4/search-parameters.tsv differs from the official definitions"
        );
    }

    #[test]
    fn resource_level_parameters_apply_to_every_type() {
        let registry = SearchParameterRegistry::r4();
        let observation = ResourceType::parse("Observation").unwrap();
        let bundle = ResourceType::parse("Bundle").unwrap();
        for code in [
            "_id",
            "_lastUpdated",
            "_tag",
            "_profile",
            "_security",
            "_source",
        ] {
            for resource_type in [observation, bundle, ResourceType::PATIENT] {
                assert!(
                    matches!(
                        registry.lookup(resource_type, code),
                        ParameterLookup::Supported(_)
                    ),
                    "{code} on {resource_type}"
                );
            }
        }
        assert!(matches!(
            registry.lookup(observation, "_text"),
            ParameterLookup::Unsupported(UnsupportedSearchParameter { code: "_text", .. })
        ));
        assert!(matches!(
            registry.lookup(bundle, "_text"),
            ParameterLookup::Unknown
        ));
    }

    #[test]
    fn looks_up_typed_parameters_and_lists_them_per_type() {
        let registry = SearchParameterRegistry::r4();
        let observation = ResourceType::parse("Observation").unwrap();
        let ParameterLookup::Supported(code) = registry.lookup(observation, "code") else {
            panic!("Observation.code is a token parameter");
        };
        assert_eq!(code.parameter_type, SearchParameterType::Token);
        assert_eq!(
            code.definition_url,
            "http://hl7.org/fhir/SearchParameter/clinical-code"
        );
        let ParameterLookup::Supported(subject) = registry.lookup(observation, "subject") else {
            panic!("Observation.subject is a reference parameter");
        };
        assert!(subject.targets.contains(&ResourceType::PATIENT));
        assert!(matches!(
            registry.lookup(observation, "code-value-quantity"),
            ParameterLookup::Unsupported(UnsupportedSearchParameter {
                type_code: "composite",
                ..
            })
        ));
        assert!(matches!(
            registry.lookup(observation, "no-such-parameter"),
            ParameterLookup::Unknown
        ));
        let codes: Vec<&str> = registry
            .parameters_of(observation)
            .map(|parameter| parameter.code)
            .collect();
        assert!(codes.contains(&"category") && codes.contains(&"_lastUpdated"));
        assert!(!codes.contains(&"combo-code-value-quantity"));
    }
}
