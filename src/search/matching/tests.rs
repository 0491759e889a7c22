//! Table-driven matcher tests over hand-built nodes: each row is a criterion, the node it is
//! tested on, and whether it should match.

use serde_json::{Value, json};

use super::date::{DateRange, DateSearchValue};
use super::prefix::Prefix;
use super::quantity::{NumberSearchValue, QuantitySearchValue};
use super::reference::ReferenceSearchValue;
use super::string::{StringMatch, StringSearchValue};
use super::text::fold;
use super::token::TokenSearchValue;
use super::uri::{UriMatch, UriSearchValue};
use super::*;
use crate::fhir::ResourceType;
use crate::search::fhirpath::TypedNode;

fn now() -> Instant {
    Instant::parse("2025-06-01T00:00:00Z").unwrap()
}

fn check(criterion: &Criterion, fhir_type: &'static str, value: &Value, expected: bool) {
    let nodes = [TypedNode { value, fhir_type }];
    assert_eq!(
        criterion.matches(&nodes, now()),
        expected,
        "{criterion:?} on {fhir_type} {value}"
    );
}

fn string(mode: StringMatch, text: &str) -> Criterion {
    Criterion::String(vec![StringSearchValue::new(mode, text)])
}

fn token(text: &str) -> Criterion {
    Criterion::Token(vec![TokenSearchValue::parse(text)])
}

#[test]
fn string_matching_by_mode() {
    let name = json!({"family": "Müller", "given": ["Anna", "Zoë"], "text": "Dr Anna Müller"});
    let address =
        json!({"line": ["1 Rue de l'Église"], "city": "Saint-Étienne", "postalCode": "42000"});
    let rows: &[(Criterion, &'static str, &Value, bool)] = &[
        (
            string(StringMatch::StartsWith, "mul"),
            "HumanName",
            &name,
            true,
        ),
        (
            string(StringMatch::StartsWith, "MÜLL"),
            "HumanName",
            &name,
            true,
        ),
        (
            string(StringMatch::StartsWith, "zoe"),
            "HumanName",
            &name,
            true,
        ),
        (
            string(StringMatch::StartsWith, "ller"),
            "HumanName",
            &name,
            false,
        ),
        (
            string(StringMatch::StartsWith, "anna m"),
            "HumanName",
            &name,
            false,
        ),
        (
            string(StringMatch::StartsWith, "dr anna"),
            "HumanName",
            &name,
            true,
        ),
        (
            string(StringMatch::Exact, "Müller"),
            "HumanName",
            &name,
            true,
        ),
        (
            string(StringMatch::Exact, "Muller"),
            "HumanName",
            &name,
            false,
        ),
        (
            string(StringMatch::Exact, "müller"),
            "HumanName",
            &name,
            false,
        ),
        (
            string(StringMatch::Contains, "LLE"),
            "HumanName",
            &name,
            true,
        ),
        (
            string(StringMatch::Contains, "xyz"),
            "HumanName",
            &name,
            false,
        ),
        (
            string(StringMatch::StartsWith, "saint-et"),
            "Address",
            &address,
            true,
        ),
        (
            string(StringMatch::Contains, "eglise"),
            "Address",
            &address,
            true,
        ),
        (
            string(StringMatch::StartsWith, "420"),
            "Address",
            &address,
            true,
        ),
        (
            string(StringMatch::StartsWith, "Lyon"),
            "Address",
            &address,
            false,
        ),
        (
            string(StringMatch::StartsWith, "gen"),
            "string",
            &json!("General Hospital"),
            true,
        ),
        (
            string(StringMatch::StartsWith, "hosp"),
            "string",
            &json!("General Hospital"),
            false,
        ),
        (
            string(StringMatch::Contains, "hosp"),
            "string",
            &json!("General Hospital"),
            true,
        ),
    ];
    for (criterion, fhir_type, value, expected) in rows {
        check(criterion, fhir_type, value, *expected);
    }
}

#[test]
fn token_matching_by_form_and_element_type() {
    let concept = json!({"coding": [{"system": "http://loinc.org", "code": "8302-2", "display": "Body height"}], "text": "Height"});
    let coding = json!({"system": "http://snomed.info/sct", "code": "123"});
    let bare_coding = json!({"code": "123"});
    let identifier =
        json!({"system": "urn:mrn", "value": "A-1", "type": {"text": "Medical record number"}});
    let contact = json!({"system": "phone", "value": "555-1234"});
    let rows: &[(Criterion, &'static str, &Value, bool)] = &[
        (token("8302-2"), "CodeableConcept", &concept, true),
        (
            token("http://loinc.org|8302-2"),
            "CodeableConcept",
            &concept,
            true,
        ),
        (
            token("http://snomed.info/sct|8302-2"),
            "CodeableConcept",
            &concept,
            false,
        ),
        (
            token("http://loinc.org|"),
            "CodeableConcept",
            &concept,
            true,
        ),
        (token("|8302-2"), "CodeableConcept", &concept, false),
        (token("8302"), "CodeableConcept", &concept, false),
        (token("123"), "Coding", &coding, true),
        (token("|123"), "Coding", &coding, false),
        (token("|123"), "Coding", &bare_coding, true),
        (
            token("http://snomed.info/sct|"),
            "Coding",
            &bare_coding,
            false,
        ),
        (token("urn:mrn|A-1"), "Identifier", &identifier, true),
        (token("A-1"), "Identifier", &identifier, true),
        (token("urn:other|A-1"), "Identifier", &identifier, false),
        (token("555-1234"), "ContactPoint", &contact, true),
        (token("phone|555-1234"), "ContactPoint", &contact, false),
        (token("final"), "code", &json!("final"), true),
        (token("Final"), "code", &json!("final"), false),
        (token("true"), "boolean", &json!(true), true),
        (token("false"), "boolean", &json!(true), false),
        (token("abc"), "id", &json!("abc"), true),
        (
            Criterion::NotToken(vec![TokenSearchValue::parse("final")]),
            "code",
            &json!("final"),
            false,
        ),
        (
            Criterion::NotToken(vec![TokenSearchValue::parse("final")]),
            "code",
            &json!("amended"),
            true,
        ),
        (
            Criterion::TokenText(vec![fold("HEIG")]),
            "CodeableConcept",
            &concept,
            true,
        ),
        (
            Criterion::TokenText(vec![fold("body h")]),
            "CodeableConcept",
            &concept,
            true,
        ),
        (
            Criterion::TokenText(vec![fold("weight")]),
            "CodeableConcept",
            &concept,
            false,
        ),
        (
            Criterion::TokenText(vec![fold("medical")]),
            "Identifier",
            &identifier,
            true,
        ),
    ];
    for (criterion, fhir_type, value, expected) in rows {
        check(criterion, fhir_type, value, *expected);
    }
}

#[test]
fn token_not_and_missing_hold_on_resources_without_the_element() {
    let not_final = Criterion::NotToken(vec![TokenSearchValue::parse("final")]);
    assert!(not_final.matches(&[], now()));
    assert!(Criterion::Missing(true).matches(&[], now()));
    assert!(!Criterion::Missing(false).matches(&[], now()));
    let value = json!("x");
    let nodes = [TypedNode {
        value: &value,
        fhir_type: "code",
    }];
    assert!(!Criterion::Missing(true).matches(&nodes, now()));
    assert!(Criterion::Missing(false).matches(&nodes, now()));
}

fn reference(text: &str, type_modifier: Option<&str>) -> Criterion {
    let type_modifier = type_modifier.map(|name| ResourceType::parse(name).unwrap());
    Criterion::Reference(vec![
        ReferenceSearchValue::parse(text, type_modifier).unwrap(),
    ])
}

#[test]
fn references_under_this_servers_base_match_their_relative_form() {
    let local_base = LocalBase::at("https://ours.example/fhir");
    let context = MatchContext {
        now: now(),
        local_base: &local_base,
    };
    let ours_absolute = json!({"reference": "https://ours.example/fhir/Patient/123"});
    let ours_relative = json!({"reference": "Patient/123"});
    let theirs = json!({"reference": "http://other.example/fhir/Patient/123"});
    let rows = [
        ("Patient/123", &ours_absolute, true),
        ("123", &ours_absolute, true),
        (
            "https://ours.example/fhir/Patient/123",
            &ours_relative,
            true,
        ),
        (
            "https://ours.example/fhir/Patient/123",
            &ours_absolute,
            true,
        ),
        ("Patient/123", &theirs, false),
        ("123", &theirs, false),
        ("https://ours.example/fhir/Patient/123", &theirs, false),
    ];
    for (searched, stored, expected) in rows {
        let nodes = [TypedNode {
            value: stored,
            fhir_type: "Reference",
        }];
        assert_eq!(
            reference(searched, None).matches_in(&nodes, &context),
            expected,
            "{searched} on {stored}"
        );
    }
    assert!(
        !reference("Patient/123", None).matches(
            &[TypedNode {
                value: &ours_absolute,
                fhir_type: "Reference",
            }],
            now()
        ),
        "without a known base only relative references are local"
    );
}

#[test]
fn reference_matching_by_form() {
    let local = json!({"reference": "Patient/123"});
    let versioned = json!({"reference": "Patient/123/_history/4"});
    let absolute = json!({"reference": "http://other.example/fhir/Patient/123"});
    let group = json!({"reference": "Group/123"});
    let rows: &[(Criterion, &'static str, &Value, bool)] = &[
        (reference("Patient/123", None), "Reference", &local, true),
        (
            reference("Patient/123", None),
            "Reference",
            &versioned,
            true,
        ),
        (reference("Patient/124", None), "Reference", &local, false),
        (reference("Group/123", None), "Reference", &local, false),
        (reference("123", None), "Reference", &local, true),
        (reference("123", None), "Reference", &group, true),
        (reference("123", Some("Patient")), "Reference", &local, true),
        (
            reference("123", Some("Patient")),
            "Reference",
            &group,
            false,
        ),
        (
            reference("Patient/123", None),
            "Reference",
            &absolute,
            false,
        ),
        (reference("123", None), "Reference", &absolute, false),
        (
            reference("http://other.example/fhir/Patient/123", None),
            "Reference",
            &absolute,
            true,
        ),
        (
            reference("http://other.example/fhir/Patient/123", None),
            "Reference",
            &local,
            false,
        ),
        (
            reference("http://example.org/ValueSet/x", None),
            "canonical",
            &json!("http://example.org/ValueSet/x"),
            true,
        ),
    ];
    for (criterion, fhir_type, value, expected) in rows {
        check(criterion, fhir_type, value, *expected);
    }
    assert_eq!(ReferenceSearchValue::parse("Nonsense/1", None), None);
    assert_eq!(
        ReferenceSearchValue::parse("Group/1", Some(ResourceType::PATIENT)),
        None
    );
}

fn date(prefix: Prefix, text: &str) -> Criterion {
    Criterion::Date(vec![DateSearchValue {
        prefix,
        range: DateRange::parse(text).unwrap(),
    }])
}

#[test]
fn date_matching_by_prefix_and_element_type() {
    let day = json!("2020-03-15");
    let moment = json!("2020-03-15T10:30:00Z");
    let period = json!({"start": "2020-03-10", "end": "2020-03-20"});
    let open_period = json!({"start": "2020-03-10"});
    let timing = json!({"event": ["2020-01-05T08:00:00Z", "2020-02-05T08:00:00Z"]});
    let rows: &[(Criterion, &'static str, &Value, bool)] = &[
        (date(Prefix::Eq, "2020-03-15"), "date", &day, true),
        (date(Prefix::Eq, "2020-03"), "date", &day, true),
        (date(Prefix::Eq, "2020"), "dateTime", &moment, true),
        (
            date(Prefix::Eq, "2020-03-15T10:30"),
            "dateTime",
            &moment,
            true,
        ),
        (
            date(Prefix::Eq, "2020-03-15T10:31"),
            "dateTime",
            &moment,
            false,
        ),
        (date(Prefix::Eq, "2020-03-15T10:30"), "date", &day, false),
        (date(Prefix::Ne, "2020-03-16"), "date", &day, true),
        (date(Prefix::Ne, "2020-03"), "date", &day, false),
        (date(Prefix::Gt, "2020-03-14"), "date", &day, true),
        (date(Prefix::Gt, "2020-03-15"), "date", &day, false),
        (date(Prefix::Ge, "2020-03-15"), "date", &day, true),
        (date(Prefix::Ge, "2020-03-16"), "date", &day, false),
        (date(Prefix::Lt, "2020-03-16"), "date", &day, true),
        (date(Prefix::Lt, "2020-03-15"), "date", &day, false),
        (date(Prefix::Le, "2020-03-15"), "date", &day, true),
        (date(Prefix::Le, "2020-03-14"), "date", &day, false),
        (date(Prefix::Sa, "2020-03-14"), "date", &day, true),
        (date(Prefix::Sa, "2020-03"), "date", &day, false),
        (date(Prefix::Eb, "2020-04"), "date", &day, true),
        (date(Prefix::Eb, "2020-03-15"), "date", &day, false),
        (date(Prefix::Ap, "2020-03-17"), "date", &day, true),
        (date(Prefix::Ap, "2019-01-01"), "date", &day, false),
        (date(Prefix::Eq, "2020-03"), "Period", &period, true),
        (date(Prefix::Eq, "2020-03-15"), "Period", &period, false),
        (date(Prefix::Gt, "2020-03-15"), "Period", &period, true),
        (date(Prefix::Lt, "2020-03-15"), "Period", &period, true),
        (date(Prefix::Sa, "2020-03-15"), "Period", &period, false),
        (date(Prefix::Gt, "2030"), "Period", &open_period, true),
        (
            date(Prefix::Lt, "2020-03-01"),
            "Period",
            &open_period,
            false,
        ),
        (date(Prefix::Eq, "2020"), "Period", &open_period, false),
        (date(Prefix::Eq, "2020-01"), "Timing", &timing, false),
        (date(Prefix::Ge, "2020-02"), "Timing", &timing, false),
        (date(Prefix::Le, "2020-02"), "Timing", &timing, true),
        (date(Prefix::Eb, "2020-03"), "Timing", &timing, true),
        (
            date(Prefix::Eq, "2020"),
            "string",
            &json!("2020-01-01"),
            false,
        ),
    ];
    for (criterion, fhir_type, value, expected) in rows {
        check(criterion, fhir_type, value, *expected);
    }
}

fn number(text: &str) -> Criterion {
    Criterion::Number(vec![NumberSearchValue::parse(text).unwrap()])
}

fn quantity(text: &str) -> Criterion {
    Criterion::Quantity(vec![QuantitySearchValue::parse(text).unwrap()])
}

#[test]
fn number_and_quantity_matching() {
    let weight =
        json!({"value": 72.4, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"});
    let unit_only = json!({"value": 5.4, "unit": "mmol/L"});
    let money = json!({"value": 100, "currency": "EUR"});
    let rows: &[(Criterion, &'static str, &Value, bool)] = &[
        (number("100"), "integer", &json!(100), true),
        (number("100"), "decimal", &json!(100.4), true),
        (number("100"), "decimal", &json!(100.5), false),
        (number("100.0"), "decimal", &json!(100.04), true),
        (number("100.0"), "decimal", &json!(100.06), false),
        (number("1e2"), "decimal", &json!(140), true),
        (number("gt100"), "integer", &json!(101), true),
        (number("gt100"), "integer", &json!(100), false),
        (number("ge100"), "integer", &json!(100), true),
        (number("lt100"), "integer", &json!(99), true),
        (number("le100"), "integer", &json!(101), false),
        (number("ne100"), "integer", &json!(100), false),
        (number("ap100"), "integer", &json!(109), true),
        (number("ap100"), "integer", &json!(111), false),
        (number("100"), "string", &json!("100"), false),
        (quantity("72.4"), "Quantity", &weight, true),
        (
            quantity("gt70|http://unitsofmeasure.org|kg"),
            "Quantity",
            &weight,
            true,
        ),
        (
            quantity("gt70|http://unitsofmeasure.org|g"),
            "Quantity",
            &weight,
            false,
        ),
        (quantity("gt70|http://other|kg"), "Quantity", &weight, false),
        (quantity("72.4||kg"), "Quantity", &weight, true),
        (quantity("lt70||kg"), "Quantity", &weight, false),
        (quantity("5.4||mmol/L"), "Quantity", &unit_only, true),
        (
            quantity("5.4|http://unitsofmeasure.org|mmol/L"),
            "Quantity",
            &unit_only,
            false,
        ),
        (
            quantity("100|urn:iso:std:iso:4217|EUR"),
            "Money",
            &money,
            true,
        ),
        (quantity("100||USD"), "Money", &money, false),
        (quantity("72.4"), "CodeableConcept", &weight, false),
    ];
    for (criterion, fhir_type, value, expected) in rows {
        check(criterion, fhir_type, value, *expected);
    }
    for malformed in ["", "abc", "1.", "xx10", "10|http://x", "1e", ".5"] {
        assert!(
            QuantitySearchValue::parse(malformed).is_err(),
            "{malformed}"
        );
    }
}

fn uri(mode: UriMatch, text: &str) -> Criterion {
    Criterion::Uri(vec![UriSearchValue {
        mode,
        uri: text.to_owned(),
    }])
}

#[test]
fn uri_matching_by_modifier() {
    let profile = json!("http://example.org/fhir/StructureDefinition/bp");
    let rows: &[(Criterion, &'static str, &Value, bool)] = &[
        (
            uri(
                UriMatch::Exact,
                "http://example.org/fhir/StructureDefinition/bp",
            ),
            "canonical",
            &profile,
            true,
        ),
        (
            uri(UriMatch::Exact, "http://example.org/fhir"),
            "canonical",
            &profile,
            false,
        ),
        (
            uri(UriMatch::Below, "http://example.org/fhir"),
            "canonical",
            &profile,
            true,
        ),
        (
            uri(UriMatch::Below, "http://other.org"),
            "canonical",
            &profile,
            false,
        ),
        (
            uri(
                UriMatch::Above,
                "http://example.org/fhir/StructureDefinition/bp/v2",
            ),
            "canonical",
            &profile,
            true,
        ),
        (
            uri(UriMatch::Above, "http://example.org/fhir"),
            "canonical",
            &profile,
            false,
        ),
    ];
    for (criterion, fhir_type, value, expected) in rows {
        check(criterion, fhir_type, value, *expected);
    }
}

#[test]
fn comma_values_are_ored_within_a_criterion() {
    let criterion = Criterion::Token(vec![
        TokenSearchValue::parse("laboratory"),
        TokenSearchValue::parse("vital-signs"),
    ]);
    let vital = json!({"coding": [{"code": "vital-signs"}]});
    let imaging = json!({"coding": [{"code": "imaging"}]});
    check(&criterion, "CodeableConcept", &vital, true);
    check(&criterion, "CodeableConcept", &imaging, false);
}
