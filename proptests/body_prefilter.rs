//! The raw-body prefilter of search and `_typeFilter` never rejects a match: for random
//! Patients (names with accents, case changes and the Kelvin sign, from an alphabet small
//! enough that queries often hit, some characters written as `\u` escapes
//! or `\/`) and random queries over string, token and reference parameters, whenever the
//! parsed body matches the query the raw bytes pass the prefilter.

use fhirlog::fhir::ResourceType;
use fhirlog::search::matching::prefilter::RawBody;
use fhirlog::search::query::SearchQuery;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};

const PREFILTER_CASES: u32 = 1024;

fn word() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        select(vec!["a", "A", "e", "é", "É", "/", "k", "\u{212A}"]),
        1..4,
    )
    .prop_map(|parts| parts.concat())
}

/// Serialises `resource`, then writes some characters of its strings as `\u` escapes or
/// `/` as `\/`, as another JSON writer may.
fn raw_body(resource: &Value, escape_letters: bool, escape_slashes: bool) -> Vec<u8> {
    let mut text = String::new();
    let mut inside_string = false;
    let mut previous_backslash = false;
    for character in resource.to_string().chars() {
        if inside_string && !previous_backslash {
            if escape_letters && matches!(character, 'e' | 'S' | 'é') {
                text.push_str(&format!("\\u{:04x}", character as u32));
                continue;
            }
            if escape_slashes && character == '/' {
                text.push_str("\\/");
                continue;
            }
        }
        if character == '"' && !previous_backslash {
            inside_string = !inside_string;
        }
        previous_backslash = character == '\\' && !previous_backslash;
        text.push(character);
    }
    text.into_bytes()
}

/// The query parameters, each with a `{}` where the searched word goes.
const QUERY_TEMPLATES: [&str; 10] = [
    "family={}",
    "name:contains={}",
    "given:exact={}",
    "identifier=http://x.org/ids|{}",
    "identifier={}",
    "general-practitioner=Practitioner/{}",
    "gender=female",
    "gender=male",
    "active=true",
    "active=false",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: PREFILTER_CASES, ..ProptestConfig::default() })]

    #[test]
    fn a_body_that_matches_always_passes_the_prefilter(
        family in word(),
        given in word(),
        identifier in word(),
        practitioner in word(),
        active in any::<bool>(),
        escape_letters in any::<bool>(),
        escape_slashes in any::<bool>(),
        template in select(QUERY_TEMPLATES.to_vec()),
        searched_word_source in 0..5usize,
        random_word in word(),
    ) {
        let searched_word = [&family, &given, &identifier, &practitioner, &random_word][searched_word_source];
        let query_text = template.replace("{}", searched_word);
        let resource = json!({
            "resourceType": "Patient",
            "id": "p",
            "active": active,
            "gender": "female",
            "name": [{"family": family, "given": [given]}],
            "identifier": [{"system": "http://x.org/ids", "value": identifier}],
            "generalPractitioner": [{"reference": format!("Practitioner/{practitioner}")}],
        });
        let encoded = percent_encoding::utf8_percent_encode(&query_text, percent_encoding::NON_ALPHANUMERIC)
            .to_string()
            .replace("%3D", "=");
        let Ok(query) = SearchQuery::parse(ResourceType::PATIENT, &encoded) else {
            return Ok(());
        };
        let raw = raw_body(&resource, escape_letters, escape_slashes);
        let reparsed: Value = serde_json::from_slice(&raw).expect("the escaped body is JSON");
        prop_assert_eq!(&reparsed, &resource);
        if query.matches(&resource) {
            prop_assert!(
                query.may_match_body(&RawBody::new(&raw)),
                "{} matches {} but the prefilter rejected it",
                query_text,
                String::from_utf8_lossy(&raw)
            );
        }
    }
}
