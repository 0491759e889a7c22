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
