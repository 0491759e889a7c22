use super::*;

fn observation() -> ResourceType {
    ResourceType::parse("Observation").unwrap()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

#[test]
fn splits_before_decoding_so_encoded_separators_stay_values() {
    assert_eq!(
        split_query("?category=laboratory%2Cvital-signs&code=http%3A%2F%2Floinc.org%7C8302-2&&_id")
            .unwrap(),
        pairs(&[
            ("category", "laboratory,vital-signs"),
            ("code", "http://loinc.org|8302-2"),
            ("_id", ""),
        ])
    );
    assert_eq!(
        split_query("name=a%26b%3Dc").unwrap(),
        pairs(&[("name", "a&b=c")])
    );
    assert_eq!(
        split_query("date=ge2020-01-01T00:00:00+01:00").unwrap(),
        pairs(&[("date", "ge2020-01-01T00:00:00+01:00")])
    );
    assert!(matches!(
        split_query("name=%FF"),
        Err(SearchQueryError::InvalidEncoding { fragment }) if fragment == "%FF"
    ));
}

#[test]
fn splits_or_values_on_unescaped_commas() {
    assert_eq!(split_or_values("a,b"), vec!["a", "b"]);
    assert_eq!(split_or_values(r"a\,b,c"), vec!["a,b", "c"]);
}

fn error_of(resource_type: ResourceType, raw: &str) -> SearchQueryError {
    match SearchQuery::parse(resource_type, raw) {
        Ok(query) => panic!("{raw} parsed to {query:?}"),
        Err(error) => error,
    }
}

#[test]
fn refuses_result_special_composite_chained_and_unknown_parameters_by_name() {
    for result in [
        "_sort=date",
        "_include=Observation:subject",
        "_revinclude=x",
        "_count=5",
        "_summary=count",
        "_elements=id",
        "_total=accurate",
        "_contained=true",
    ] {
        let name = result.split('=').next().unwrap();
        assert_eq!(
            error_of(observation(), result),
            SearchQueryError::ResultParameter {
                parameter: name.to_owned()
            }
        );
    }
    for (raw, parameter) in [
        ("code-value-quantity=x$1", "code-value-quantity"),
        (
            "_has:Observation:patient:code=1",
            "_has:Observation:patient:code",
        ),
        ("_text=fever", "_text"),
        ("_content=fever", "_content"),
        ("subject.name=peter", "subject.name"),
        ("_list=42", "_list"),
    ] {
        let error = error_of(observation(), raw);
        assert!(
            matches!(&error, SearchQueryError::UnsupportedParameter { parameter: named, .. } if named == parameter),
            "{raw}: {error:?}"
        );
    }
    assert_eq!(
        error_of(observation(), "family=smith"),
        SearchQueryError::UnknownParameter {
            resource_type: observation(),
            parameter: "family".to_owned()
        }
    );
}

#[test]
fn refuses_modifiers_the_parameter_type_does_not_take() {
    for (raw, parameter, modifier) in [
        ("code:exact=x", "code", "exact"),
        ("code:in=http://vs", "code", "in"),
        ("date:exact=2020", "date", "exact"),
        ("subject:Medication=1", "subject", "Medication"),
        ("subject:identifier=urn:x|1", "subject", "identifier"),
        ("value-quantity:below=5", "value-quantity", "below"),
    ] {
        let error = error_of(observation(), raw);
        assert!(
            matches!(&error, SearchQueryError::UnsupportedModifier { parameter: p, modifier: m, .. } if p == parameter && m == modifier),
            "{raw}: {error:?}"
        );
    }
}

#[test]
fn names_the_parameter_and_value_of_malformed_values() {
    for (raw, parameter, value) in [
        ("date=2020-13-01", "date", "2020-13-01"),
        ("date=xx2020", "date", "xx2020"),
        ("date=ge2020,yesterday", "date", "yesterday"),
        ("value-quantity=heavy", "value-quantity", "heavy"),
        ("subject=Nonsense/1", "subject", "Nonsense/1"),
        ("code:missing=maybe", "code:missing", "maybe"),
        ("code=a,,b", "code", ""),
        ("status=", "status", ""),
    ] {
        let error = error_of(observation(), raw);
        assert!(
            matches!(&error, SearchQueryError::MalformedValue { parameter: p, value: v, .. } if p == parameter && v == value),
            "{raw}: {error:?}"
        );
    }
}

fn patient_resource() -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"lastUpdated": "2024-05-01T10:00:00Z", "tag": [{"system": "urn:tags", "code": "synthetic"}],
                 "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "identifier": [{"system": "urn:mrn", "value": "MRN-7"}],
        "active": true,
        "name": [{"family": "Müller", "given": ["Zoë"]}],
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "gender": "female",
        "birthDate": "1980-07-14",
        "address": [{"city": "Saint-Étienne", "postalCode": "42000"}],
        "generalPractitioner": [{"reference": "Practitioner/dr1"}]
    })
}

fn observation_resource() -> Value {
    serde_json::json!({
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2", "display": "Body height"}], "text": "Height"},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2020-03-15T10:30:00Z",
        "valueQuantity": {"value": 172.5, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}
    })
}

fn assert_query(resource_type: &str, resource: &Value, raw: &str, expected: bool) {
    let resource_type = ResourceType::parse(resource_type).unwrap();
    let query =
        SearchQuery::parse(resource_type, raw).unwrap_or_else(|error| panic!("{raw}: {error}"));
    assert_eq!(query.matches(resource), expected, "{raw}");
}

#[test]
fn queries_match_whole_resources_per_parameter_type_and_modifier() {
    let patient = patient_resource();
    for (raw, expected) in [
        ("family=mul", true),
        ("family=MUELLER", false),
        ("family:exact=Müller", true),
        ("family:exact=muller", false),
        ("name:contains=LLE", true),
        ("given=zoe", true),
        ("address-city=saint-e", true),
        ("address=42000", true),
        ("address=lyon", false),
        ("identifier=urn:mrn|MRN-7", true),
        ("identifier=urn:other|MRN-7", false),
        ("active=true", true),
        ("active=false", false),
        ("gender=female", true),
        ("gender:not=female", false),
        ("gender:not=male", true),
        ("phone=555-0100", true),
        ("birthdate=1980", true),
        ("birthdate=gt1980-07-14", false),
        ("birthdate=ge1980-07-14", true),
        ("birthdate=lt1981", true),
        ("general-practitioner=Practitioner/dr1", true),
        ("general-practitioner=dr1", true),
        ("general-practitioner:Practitioner=dr1", true),
        ("general-practitioner:Organization=dr1", false),
        ("general-practitioner:missing=false", true),
        ("death-date:missing=true", true),
        ("deceased=false", true),
        ("deceased=true", false),
        ("email:missing=false", false),
        ("_id=p1", true),
        ("_id=p2,p1", true),
        ("_id=p2", false),
        ("_lastUpdated=ge2024-05-01", true),
        ("_lastUpdated=lt2024-05-01", false),
        ("_tag=urn:tags|synthetic", true),
        ("_tag=synthetic&_tag=other", false),
        (
            "_profile=http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient",
            true,
        ),
        ("_profile:below=http://hl7.org/fhir/us/core", true),
        ("_profile=http://hl7.org/fhir/us/core", false),
        ("family=mul&gender=male", false),
        ("family=xyz,mul&gender=female", true),
    ] {
        assert_query("Patient", &patient, raw, expected);
    }
    let observation = observation_resource();
    for (raw, expected) in [
        ("code=http://loinc.org|8302-2", true),
        ("code=http%3A%2F%2Floinc.org%7C8302-2", true),
        ("code=http://snomed.info/sct|8302-2", false),
        ("code:text=heig", true),
        ("category=laboratory%2Cvital-signs", true),
        ("category=laboratory", false),
        ("status=final,amended", true),
        ("subject=Patient/p1", true),
        ("patient=p1", true),
        ("patient=Patient/p2", false),
        ("subject:Patient=p1", true),
        ("date=2020-03", true),
        ("date=ge2020-03-15T10:30", true),
        ("date=sa2020-03-15", false),
        ("date=eb2020-03-16", true),
        ("value-quantity=172.5", true),
        ("value-quantity=gt170|http://unitsofmeasure.org|cm", true),
        ("value-quantity=lt170||cm", false),
        ("value-quantity=172.5||mm", false),
    ] {
        assert_query("Observation", &observation, raw, expected);
    }
}
