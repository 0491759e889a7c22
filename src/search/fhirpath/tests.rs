use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;

fn resource_type(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap()
}

fn compile(expression: &str, type_name: &str) -> CompiledFhirPath {
    CompiledFhirPath::compile(expression, resource_type(type_name))
        .unwrap_or_else(|refused| panic!("{expression}: {refused}"))
}

fn nodes<'r>(expression: &str, resource: &'r Value) -> Vec<(&'r Value, &'static str)> {
    let type_name = resource["resourceType"].as_str().unwrap();
    compile(expression, type_name)
        .evaluate(resource)
        .into_iter()
        .map(|node| (node.value, node.fhir_type))
        .collect()
}

fn refusal(expression: &str, type_name: &str) -> UnsupportedFhirPath {
    CompiledFhirPath::compile(expression, resource_type(type_name)).unwrap_err()
}

#[test]
fn choice_elements_come_from_the_choice_list_with_their_types() {
    let observation = json!({
        "resourceType": "Observation",
        "valueQuantity": {"value": 5, "unit": "mg"},
        "valueSet": "not a choice of value",
        "component": [
            {"code": {"text": "a"}, "valueString": "x"},
            {"code": {"text": "b"}, "valueCodeableConcept": {"text": "y"}}
        ]
    });
    assert_eq!(
        nodes("Observation.value", &observation),
        vec![(&observation["valueQuantity"], "Quantity")]
    );
    assert_eq!(
        nodes(
            "Observation.component.value.ofType(CodeableConcept)",
            &observation
        ),
        vec![(
            &observation["component"][1]["valueCodeableConcept"],
            "CodeableConcept"
        )]
    );
    assert_eq!(
        nodes("Observation.component.code", &observation),
        vec![
            (&observation["component"][0]["code"], "CodeableConcept"),
            (&observation["component"][1]["code"], "CodeableConcept")
        ]
    );
    assert_eq!(
        nodes("(Observation.value as Quantity).unit", &observation),
        vec![(&json!("mg"), "string")]
    );
    assert!(matches!(
        refusal("Observation.valueQuantity", "Observation"),
        UnsupportedFhirPath::UnknownElement { .. }
    ));
    assert!(matches!(
        refusal("Observation.valueSet", "Observation"),
        UnsupportedFhirPath::UnknownElement { .. }
    ));
}

#[test]
fn types_follow_backbone_paths_datatypes_and_resource_elements() {
    let patient = json!({
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"lastUpdated": "2024-01-01T00:00:00Z", "tag": [{"code": "t"}]},
        "name": [{"given": ["Ann", "Bo"], "family": "Z"}, {"given": ["Cy"]}],
        "contact": [{"name": {"family": "Q"}, "telecom": [{"system": "email", "value": "q@x"}]}],
        "active": true
    });
    assert_eq!(
        nodes("Patient.name.given", &patient),
        vec![
            (&json!("Ann"), "string"),
            (&json!("Bo"), "string"),
            (&json!("Cy"), "string")
        ]
    );
    assert_eq!(
        nodes("Resource.meta.lastUpdated", &patient),
        vec![(&json!("2024-01-01T00:00:00Z"), "instant")]
    );
    assert_eq!(
        nodes("Resource.id", &patient),
        vec![(&json!("p1"), "string")]
    );
    assert_eq!(
        nodes("DomainResource.meta.tag", &patient),
        vec![(&patient["meta"]["tag"][0], "Coding")]
    );
    assert_eq!(
        nodes(
            "Patient.contact.telecom.where(system='email').value",
            &patient
        ),
        vec![(&json!("q@x"), "string")]
    );
    assert_eq!(nodes("Patient.contact", &patient)[0].1, "BackboneElement");
    assert_eq!(
        nodes("Patient.name[1].given", &patient),
        vec![(&json!("Cy"), "string")]
    );
    assert_eq!(
        nodes("Patient.name.first().given", &patient),
        vec![(&json!("Ann"), "string"), (&json!("Bo"), "string")]
    );
    assert_eq!(
        nodes("Patient.active", &patient),
        vec![(&json!(true), "boolean")]
    );
}

#[test]
fn union_branches_for_other_types_are_dropped_at_compile_time() {
    let patient = json!({"resourceType": "Patient", "name": [{"family": "P"}]});
    assert_eq!(
        nodes("Patient.name | Practitioner.name", &patient),
        vec![(&patient["name"][0], "HumanName")]
    );
    assert_eq!(
        refusal("Practitioner.name | Person.name", "Patient"),
        UnsupportedFhirPath::NoBranchForType {
            resource_type: ResourceType::PATIENT
        }
    );
    assert_eq!(
        nodes("Patient.name | Patient.name", &patient),
        vec![(&patient["name"][0], "HumanName")]
    );
}

#[test]
fn resolve_is_reads_the_type_from_the_reference_string() {
    let observation = json!({
        "resourceType": "Observation",
        "contained": [{"resourceType": "Patient", "id": "inline"}, {"resourceType": "Device", "id": "d"}],
        "performer": [
            {"reference": "Patient/p1"},
            {"reference": "Practitioner/dr"},
            {"reference": "Patient/p2/_history/3"},
            {"reference": "https://elsewhere.example/fhir/Patient/p3"},
            {"reference": "#inline"},
            {"reference": "#d"},
            {"reference": "urn:uuid:85c63cf3-278e-454c-b5ba-df5889815eb7"},
            {"reference": "Patient?identifier=x"},
            {"display": "no reference"}
        ]
    });
    let patients: Vec<&Value> = nodes(
        "Observation.performer.where(resolve() is Patient)",
        &observation,
    )
    .into_iter()
    .map(|(value, fhir_type)| {
        assert_eq!(fhir_type, "Reference");
        &value["reference"]
    })
    .collect();
    assert_eq!(
        patients,
        vec![
            &json!("Patient/p1"),
            &json!("Patient/p2/_history/3"),
            &json!("https://elsewhere.example/fhir/Patient/p3"),
            &json!("#inline")
        ]
    );
    assert_eq!(
        ReferenceTarget::parse("https://elsewhere.example/fhir/Patient/p3/_history/2"),
        Some(ReferenceTarget::Absolute {
            base_url: "https://elsewhere.example/fhir",
            type_name: "Patient",
            id: "p3"
        })
    );
}

#[test]
fn boolean_conditions_and_comparisons() {
    let expression = "Patient.deceased.exists() and Patient.deceased != false";
    let deceased = |member: Value| {
        let mut patient = json!({"resourceType": "Patient"});
        if let Value::Object(fields) = member {
            patient.as_object_mut().unwrap().extend(fields);
        }
        compile(expression, "Patient")
            .evaluate(&patient)
            .iter()
            .map(|node| (node.value.clone(), node.fhir_type))
            .collect::<Vec<_>>()
    };
    assert_eq!(deceased(json!({})), vec![(json!(false), "boolean")]);
    assert_eq!(
        deceased(json!({"deceasedBoolean": false})),
        vec![(json!(false), "boolean")]
    );
    assert_eq!(
        deceased(json!({"deceasedBoolean": true})),
        vec![(json!(true), "boolean")]
    );
    assert_eq!(
        deceased(json!({"deceasedDateTime": "2020-01-01"})),
        vec![(json!(true), "boolean")]
    );
    assert!(matches!(
        refusal("Patient.birthDate = '2020'", "Patient"),
        UnsupportedFhirPath::UnsupportedConstruct { .. }
    ));
    assert!(matches!(
        refusal("Patient.name.count()", "Patient"),
        UnsupportedFhirPath::UnsupportedConstruct { construct } if construct.contains("count")
    ));
    assert!(matches!(
        refusal("Patient.name.given + 'x'", "Patient"),
        UnsupportedFhirPath::UnsupportedConstruct { construct } if construct.contains("'+'")
    ));
    assert!(matches!(
        refusal("Patient.name.", "Patient"),
        UnsupportedFhirPath::Syntax { .. }
    ));
    let patient = json!({"resourceType": "Patient", "name": [{"family": "it's"}, {"family": "b"}]});
    assert_eq!(
        nodes("Patient.name.where(family = 'it\\'s').`family`", &patient),
        vec![(&json!("it's"), "string")]
    );
}

#[test]
fn resources_inside_resources_take_their_type_from_resource_type() {
    let bundle = json!({
        "resourceType": "Bundle",
        "entry": [
            {"resource": {"resourceType": "Composition", "id": "c"}},
            {"resource": {"resourceType": "Patient", "id": "p", "name": [{"family": "F"}]}}
        ]
    });
    assert_eq!(
        nodes("Bundle.entry[0].resource", &bundle),
        vec![(&bundle["entry"][0]["resource"], "Composition")]
    );
    assert_eq!(
        nodes("Bundle.entry.resource.ofType(Patient).name.family", &bundle),
        vec![(&json!("F"), "string")]
    );
    assert_eq!(
        nodes("Bundle.entry.resource.id", &bundle),
        vec![(&json!("c"), "string"), (&json!("p"), "string")]
    );
    assert!(matches!(
        refusal("Bundle.entry.resource.name", "Bundle"),
        UnsupportedFhirPath::UnknownElement { .. }
    ));
}

#[test]
fn the_parser_keeps_fhirpath_precedence_comments_and_escapes() {
    let patient = json!({"resourceType": "Patient", "active": true, "gender": "male", "name": [{"family": "O'Neil\u{e9}"}]});
    let both = "Patient.active = true and Patient.gender = 'male' // trailing comment";
    assert_eq!(nodes(both, &patient), vec![(&json!(true), "boolean")]);
    assert_eq!(
        nodes(
            "Patient.name.where(family = 'O\\'Neil\\u00e9' /* inline */).family",
            &patient
        ),
        vec![(&patient["name"][0]["family"], "string")]
    );
    assert!(matches!(
        refusal("Patient.gender = 'male' or Patient.active = true", "Patient"),
        UnsupportedFhirPath::UnsupportedConstruct { construct } if construct.contains("'or'")
    ));
    assert!(matches!(
        refusal("Patient.name /* open", "Patient"),
        UnsupportedFhirPath::Syntax { .. }
    ));
    assert!(matches!(
        refusal("Patient.name.where(family = 'x", "Patient"),
        UnsupportedFhirPath::Syntax { .. }
    ));
    assert!(matches!(
        refusal("@2015-02-04T14:34:28.123.is(DateTime)", "Patient"),
        UnsupportedFhirPath::UnsupportedConstruct { .. }
    ));
    assert!(matches!(
        refusal("%resource.name", "Patient"),
        UnsupportedFhirPath::UnsupportedConstruct { construct } if construct.contains("%resource")
    ));
}

fn shared_fhir_r4() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fhir-r4")
}

/// The example resources, by file name.
fn examples() -> HashMap<String, Value> {
    let directory = shared_fhir_r4().join("fhirpath-tests/examples");
    std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect()
}

/// One test of the official FHIRPath suite.
struct ConformanceCase {
    name: String,
    input_file: Option<String>,
    expression: String,
    invalid: bool,
    predicate: bool,
    outputs: Vec<(String, String)>,
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[start..].find('"')? + start;
    Some(xml_unescape(&tag[start..end]))
}

/// The `<test>` elements of the suite outside comments (a small reader for this one file).
fn conformance_cases() -> Vec<ConformanceCase> {
    let mut text =
        std::fs::read_to_string(shared_fhir_r4().join("fhirpath-tests/tests-fhir-r4.xml")).unwrap();
    while let Some(start) = text.find("<!--") {
        let end = text[start..].find("-->").unwrap() + start + 3;
        text.replace_range(start..end, "");
    }
    let mut cases = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("<test ") {
        let body_end = rest[start..].find("</test>").unwrap() + start;
        let test = &rest[start..body_end];
        let tag = &test[..test.find('>').unwrap()];
        let expression_start = test.find("<expression").unwrap();
        let expression_tag_end = test[expression_start..].find('>').unwrap() + expression_start;
        let expression_end = test.find("</expression>").unwrap();
        let expression_tag = test[expression_start..expression_tag_end].replace(['\t', '\n'], " ");
        let mut outputs = Vec::new();
        let mut output_rest = &test[expression_end..];
        while let Some(output_start) = output_rest.find("<output") {
            let tag_end = output_rest[output_start..].find('>').unwrap() + output_start;
            let value_end = output_rest[tag_end..].find("</output>").unwrap() + tag_end;
            let output_tag = &output_rest[output_start..tag_end];
            outputs.push((
                attribute(output_tag, "type").unwrap_or_default(),
                xml_unescape(&output_rest[tag_end + 1..value_end]),
            ));
            output_rest = &output_rest[value_end..];
        }
        cases.push(ConformanceCase {
            name: attribute(tag, "name").unwrap_or_default(),
            input_file: attribute(tag, "inputfile"),
            expression: xml_unescape(&test[expression_tag_end + 1..expression_end]),
            invalid: attribute(&expression_tag, "invalid").is_some(),
            predicate: attribute(tag, "predicate").as_deref() == Some("true"),
            outputs,
        });
        rest = &rest[body_end..];
    }
    cases
}

/// Whether a value of ours is the expected `<output type="…">text</output>`.
fn matches_expected(
    value: &FhirPathValue,
    (expected_type, expected_text): &(String, String),
) -> bool {
    const STRING_TYPES: [&str; 9] = [
        "string",
        "code",
        "id",
        "uri",
        "url",
        "canonical",
        "markdown",
        "oid",
        "uuid",
    ];
    match value {
        FhirPathValue::String(text) => {
            STRING_TYPES.contains(&expected_type.as_str()) && text == expected_text
        }
        FhirPathValue::Boolean(boolean) => {
            expected_type == "boolean" && expected_text == &boolean.to_string()
        }
        FhirPathValue::Integer(integer) => {
            expected_type == "integer" && expected_text == &integer.to_string()
        }
        FhirPathValue::Decimal(decimal) => {
            expected_type == "decimal"
                && decimal.parse::<f64>().ok() == expected_text.parse::<f64>().ok()
        }
        FhirPathValue::Date(date) => {
            expected_type == "date" && expected_text == &format!("@{date}")
        }
        FhirPathValue::DateTime(date_time) => {
            expected_type == "dateTime" && expected_text == &format!("@{date_time}")
        }
        FhirPathValue::Time(time) => {
            expected_type == "time" && expected_text == &format!("@T{time}")
        }
        FhirPathValue::Complex(_) => false,
    }
}

/// Inputs of the suite that exist only as XML.
const XML_ONLY_INPUTS: [&str; 3] = [
    "parameters-example-types.xml",
    "patient-example-period.xml",
    "valueset-example-expansion.xml",
];

/// How many of the suite's expressions the subset answers; any change must be deliberate.
const ANSWERED_CONFORMANCE_EXPRESSIONS: usize = 48;

#[test]
fn the_official_fhirpath_suite_is_answered_exactly_or_refused() {
    let examples = examples();
    let cases = conformance_cases();
    assert_eq!(cases.len(), 935);
    let (mut answered, mut refused, mut skipped) = (0, 0, 0);
    let mut wrong = Vec::new();
    for case in &cases {
        let input_name = case.input_file.as_deref().unwrap_or("patient-example.xml");
        if XML_ONLY_INPUTS.contains(&input_name) {
            skipped += 1;
            continue;
        }
        let json_name = input_name.replace(".xml", ".json");
        let input = examples
            .get(&json_name)
            .unwrap_or_else(|| panic!("{}: no input {json_name}", case.name));
        let type_name = input["resourceType"].as_str().unwrap();
        let outcome = CompiledFhirPath::compile(&case.expression, resource_type(type_name))
            .map_err(|refused| refused.to_string())
            .and_then(|compiled| {
                compiled
                    .evaluate_values(input)
                    .map_err(|refused| refused.to_string())
            });
        let values = match outcome {
            Err(_) => {
                refused += 1;
                continue;
            }
            Ok(values) => values,
        };
        let values = if case.predicate {
            vec![FhirPathValue::Boolean(!values.is_empty())]
        } else {
            values
        };
        let correct = !case.invalid
            && values.len() == case.outputs.len()
            && values
                .iter()
                .zip(&case.outputs)
                .all(|(value, expected)| matches_expected(value, expected));
        if correct {
            answered += 1;
        } else {
            wrong.push(format!(
                "{} `{}`: gave {values:?}, expected {}{:?}",
                case.name,
                case.expression,
                if case.invalid { "a refusal " } else { "" },
                case.outputs
            ));
        }
    }
    println!(
        "fhirpath conformance: {answered} answered, {refused} refused, {skipped} skipped of {}",
        cases.len()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(skipped, 14);
    assert_eq!(answered, ANSWERED_CONFORMANCE_EXPRESSIONS);
}

/// R4 search parameters whose expressions name elements that R4 does not define as such:
/// `ConceptMap.group.element.target.product` is a content reference to `dependsOn` (not in the
/// element list), and R4's DeviceDefinition has no `classification`.
const PARAMETERS_NAMING_NO_R4_ELEMENT: [&str; 2] =
    ["ConceptMap-product", "DeviceDefinition-classification"];

/// The search parameter types whose expressions the subset must evaluate.
const SUPPORTED_PARAMETER_TYPES: [&str; 7] = [
    "string",
    "token",
    "reference",
    "date",
    "number",
    "quantity",
    "uri",
];

#[test]
fn every_supported_search_parameter_compiles_for_its_types_and_evaluates_on_the_examples() {
    let bundle: Value = serde_json::from_str(
        &std::fs::read_to_string(shared_fhir_r4().join("search-parameters.json")).unwrap(),
    )
    .unwrap();
    let mut examples_by_type: HashMap<String, Vec<Value>> = HashMap::new();
    for example in examples().into_values() {
        let type_name = example["resourceType"].as_str().unwrap().to_owned();
        examples_by_type.entry(type_name).or_default().push(example);
    }
    let (
        mut compiled_count,
        mut evaluations,
        mut nodes_found,
        mut without_expression,
        mut known_gaps,
    ) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    for parameter in bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| &entry["resource"])
    {
        if !SUPPORTED_PARAMETER_TYPES.contains(&parameter["type"].as_str().unwrap()) {
            continue;
        }
        let Some(expression) = parameter["expression"].as_str() else {
            without_expression += 1;
            continue;
        };
        for base in parameter["base"]
            .as_array()
            .unwrap()
            .iter()
            .map(|base| base.as_str().unwrap())
        {
            let applies_to: Vec<ResourceType> = match base {
                "Resource" => ResourceType::all().collect(),
                "DomainResource" => ResourceType::all()
                    .filter(|resource_type| {
                        !["Binary", "Bundle", "Parameters"].contains(&resource_type.as_str())
                    })
                    .collect(),
                name => vec![resource_type(name)],
            };
            for resource_type in applies_to {
                match CompiledFhirPath::compile(expression, resource_type) {
                    Err(UnsupportedFhirPath::UnknownElement { .. })
                        if PARAMETERS_NAMING_NO_R4_ELEMENT
                            .contains(&parameter["id"].as_str().unwrap()) =>
                    {
                        known_gaps += 1;
                    }
                    Err(refused) => {
                        failures.push(format!("{} on {resource_type}: {refused}", parameter["id"]))
                    }
                    Ok(compiled) => {
                        compiled_count += 1;
                        for example in examples_by_type
                            .get(resource_type.as_str())
                            .into_iter()
                            .flatten()
                        {
                            evaluations += 1;
                            nodes_found += compiled.evaluate(example).len();
                        }
                    }
                }
            }
        }
    }
    println!(
        "search parameters: {compiled_count} (parameter, type) pairs compiled, {evaluations} evaluations on examples, {nodes_found} nodes; {without_expression} parameters have no expression, {known_gaps} name no R4 element"
    );
    assert!(
        failures.is_empty(),
        "{} refused:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(known_gaps, PARAMETERS_NAMING_NO_R4_ELEMENT.len());
    assert!(nodes_found > 800, "{nodes_found}");
}
