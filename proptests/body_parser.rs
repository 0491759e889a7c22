//! `ParsedResource::parse_bytes` on untrusted input: it never panics, and accepts exactly
//! the JSON objects with a known `resourceType`, a valid `id` if any, an object `meta` if
//! any, and nesting within the limit. The oracle reads JSON with its own reader
//! ([`crate::json_oracle`]), not with the parser's JSON library.

use fhirlog::fhir::canonical::{DEFAULT_MAX_JSON_DEPTH, ParsedResource, ResourceBodyError};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::Value;

use crate::json_oracle::{JsonReading, JsonTree, bracket_nesting, read_json_text};

const PARSER_CASES: u32 = 1024;

const R4_RESOURCE_TYPE_LIST: &str = include_str!("../data/r4/resource-types.txt");

const MALFORMED_JSON: &str = "malformed json";
const NESTED_TOO_DEEP: &str = "nested too deep";

fn is_r4_resource_type_name(name: &str) -> bool {
    R4_RESOURCE_TYPE_LIST
        .lines()
        .map(str::trim)
        .any(|listed| !listed.is_empty() && listed == name)
}

fn is_valid_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.chars().count())
        && id
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '.'))
}

fn body_error_kind(error: &ResourceBodyError) -> &'static str {
    match error {
        ResourceBodyError::MalformedJson(_) => MALFORMED_JSON,
        ResourceBodyError::NotAnObject { .. } => "not an object",
        ResourceBodyError::MissingResourceType => "missing resourceType",
        ResourceBodyError::ResourceTypeNotAString => "resourceType not a string",
        ResourceBodyError::UnknownResourceType(_) => "unknown resourceType",
        ResourceBodyError::NestedTooDeep { .. } => NESTED_TOO_DEEP,
        ResourceBodyError::IdNotAString => "id not a string",
        ResourceBodyError::InvalidId(_) => "invalid id",
        ResourceBodyError::MetaNotAnObject => "meta not an object",
        ResourceBodyError::UnexpectedResourceType { .. } => "unexpected resourceType",
    }
}

/// What the oracle expects of the parser for one input.
struct OracleVerdict {
    /// The value the text holds, when it is well-formed and not nested too deep.
    tree: Option<JsonTree>,
    /// Every reason the parser may give for refusing; empty when it must accept.
    refusal_kinds: Vec<&'static str>,
}

/// Nesting is measured on the text first, over its brackets outside string literals,
/// whether or not the text is well-formed: deeper than the limit is refused as nested too
/// deep and for no other reason.
fn oracle_verdict(bytes: &[u8]) -> OracleVerdict {
    if bracket_nesting(bytes) > DEFAULT_MAX_JSON_DEPTH {
        return OracleVerdict {
            tree: None,
            refusal_kinds: vec![NESTED_TOO_DEEP],
        };
    }
    let tree = match read_json_text(bytes) {
        JsonReading::WellFormed { tree, .. } => tree,
        JsonReading::Malformed => {
            return OracleVerdict {
                tree: None,
                refusal_kinds: vec![MALFORMED_JSON],
            };
        }
        JsonReading::NestedBeyondTheGuard => {
            unreachable!("the reader's guard is deeper than the limit the text is within")
        }
    };
    let mut refusal_kinds = Vec::new();
    if let JsonTree::Object(members) = &tree {
        match members.get("resourceType") {
            None => refusal_kinds.push("missing resourceType"),
            Some(JsonTree::String(name)) if !is_r4_resource_type_name(name) => {
                refusal_kinds.push("unknown resourceType");
            }
            Some(JsonTree::String(_)) => {}
            Some(_) => refusal_kinds.push("resourceType not a string"),
        }
        match members.get("id") {
            None => {}
            Some(JsonTree::String(id)) if !is_valid_fhir_id(id) => refusal_kinds.push("invalid id"),
            Some(JsonTree::String(_)) => {}
            Some(_) => refusal_kinds.push("id not a string"),
        }
        if members
            .get("meta")
            .is_some_and(|meta| !matches!(meta, JsonTree::Object(_)))
        {
            refusal_kinds.push("meta not an object");
        }
    } else {
        refusal_kinds.push("not an object");
    }
    OracleVerdict {
        tree: Some(tree),
        refusal_kinds,
    }
}

/// The parser's output in the oracle's terms, to compare the two.
fn tree_of_parsed_value(value: &Value) -> JsonTree {
    match value {
        Value::Null => JsonTree::Null,
        Value::Bool(boolean) => JsonTree::Boolean(*boolean),
        Value::Number(number) => JsonTree::Number(number.to_string().to_ascii_lowercase()),
        Value::String(text) => JsonTree::String(text.clone()),
        Value::Array(items) => JsonTree::Array(items.iter().map(tree_of_parsed_value).collect()),
        Value::Object(members) => JsonTree::Object(
            members
                .iter()
                .map(|(name, member)| (name.clone(), tree_of_parsed_value(member)))
                .collect(),
        ),
    }
}

fn check_parser_against_oracle(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = ParsedResource::parse_bytes(bytes, DEFAULT_MAX_JSON_DEPTH);
    let verdict = oracle_verdict(bytes);
    match parsed {
        Ok(resource) => {
            prop_assert!(
                verdict.refusal_kinds.is_empty(),
                "accepted input that should be refused for {:?}: {}",
                verdict.refusal_kinds,
                String::from_utf8_lossy(bytes)
            );
            let Some(JsonTree::Object(expected_members)) = verdict.tree else {
                return Err(TestCaseError::fail("accepted input is not a JSON object"));
            };
            prop_assert_eq!(
                Some(resource.resource_type.as_str()),
                match expected_members.get("resourceType") {
                    Some(JsonTree::String(name)) => Some(name.as_str()),
                    _ => None,
                }
            );
            prop_assert_eq!(
                resource.id.as_ref().map(|id| id.as_str()),
                match expected_members.get("id") {
                    Some(JsonTree::String(id)) => Some(id.as_str()),
                    _ => None,
                }
            );
            prop_assert_eq!(
                tree_of_parsed_value(&Value::Object(resource.json)),
                JsonTree::Object(expected_members)
            );
        }
        Err(error) => {
            let kind = body_error_kind(&error);
            prop_assert!(
                verdict.refusal_kinds.contains(&kind),
                "refused with {error:?}, but the applicable refusals are {:?}: {}",
                verdict.refusal_kinds,
                String::from_utf8_lossy(bytes)
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Nesting {
    Arrays(usize),
    Objects(usize),
}

impl Nesting {
    fn render(self) -> String {
        match self {
            Nesting::Arrays(levels) => format!("{}1{}", "[".repeat(levels), "]".repeat(levels)),
            Nesting::Objects(levels) => {
                format!("{}1{}", r#"{"a":"#.repeat(levels), "}".repeat(levels))
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ByteMutation {
    None,
    Truncate(Index),
    Replace(Index, u8),
    Insert(Index, u8),
}

impl ByteMutation {
    fn apply(self, text: String) -> Vec<u8> {
        let mut bytes = text.into_bytes();
        match self {
            ByteMutation::None => {}
            ByteMutation::Truncate(position) => bytes.truncate(position.index(bytes.len() + 1)),
            ByteMutation::Replace(position, byte) => {
                if !bytes.is_empty() {
                    let replaced = position.index(bytes.len());
                    bytes[replaced] = byte;
                }
            }
            ByteMutation::Insert(position, byte) => {
                bytes.insert(position.index(bytes.len() + 1), byte);
            }
        }
        bytes
    }
}

/// One byte damaged: JSON punctuation, or a byte that starts, continues or can never be
/// part of a UTF-8 sequence.
fn byte_mutation_strategy() -> impl Strategy<Value = ByteMutation> {
    let mutation_byte = select(b"{}[]\":, a0\\\xc3\xa9\xed\xff".to_vec());
    prop_oneof![
        4 => Just(ByteMutation::None),
        1 => any::<Index>().prop_map(ByteMutation::Truncate),
        1 => (any::<Index>(), mutation_byte.clone())
            .prop_map(|(position, byte)| ByteMutation::Replace(position, byte)),
        1 => (any::<Index>(), mutation_byte)
            .prop_map(|(position, byte)| ByteMutation::Insert(position, byte)),
    ]
}

fn nesting_strategy() -> impl Strategy<Value = Nesting> {
    prop_oneof![
        (0usize..300).prop_map(Nesting::Arrays),
        (0usize..300).prop_map(Nesting::Objects),
    ]
}

/// Resource-shaped JSON text: each member is either right or wrong in one of the ways the
/// parser distinguishes, in random order, possibly deeply nested, possibly not an object
/// at the top, possibly damaged by one byte.
fn resource_shaped_bytes_strategy() -> impl Strategy<Value = Vec<u8>> {
    let resource_type_member = proptest::option::weighted(
        0.9,
        select(vec![
            r#""Patient""#,
            r#""Observation""#,
            r#""Basic""#,
            r#""patient""#,
            r#""Resource""#,
            r#""""#,
            "3",
            "null",
            r#"["Patient"]"#,
        ]),
    );
    let id_member = proptest::option::of(prop_oneof![
        select(vec![
            r#""p1""#.to_owned(),
            r#""a.b-C9""#.to_owned(),
            r#""a b""#.to_owned(),
            r#""""#.to_owned(),
            r#""é""#.to_owned(),
            "7".to_owned(),
            "null".to_owned(),
        ]),
        (60usize..70).prop_map(|length| format!("\"{}\"", "x".repeat(length))),
    ]);
    let meta_member = proptest::option::of(select(vec![
        "{}",
        "[]",
        r#""meta""#,
        r#"{"versionId":"1","lastUpdated":"2020-01-01T00:00:00Z"}"#,
    ]));
    let extra_members = proptest::collection::vec(
        (
            "[a-z]{1,6}",
            select(vec![
                "1",
                "1.50",
                "-2E+3",
                "true",
                r#""text""#,
                r#""é\u00e9\ud83d\ude00\n""#,
                "{}",
                "[]",
                "null",
            ]),
        ),
        0..4,
    );
    (
        resource_type_member,
        id_member,
        meta_member,
        proptest::option::of(nesting_strategy()),
        extra_members,
        any::<u64>(),
        proptest::bool::weighted(0.1),
        byte_mutation_strategy(),
    )
        .prop_map(
            |(
                resource_type,
                id,
                meta,
                nesting,
                extra,
                member_order_seed,
                wrap_in_array,
                mutation,
            )| {
                let mut members: Vec<(String, String)> = Vec::new();
                members
                    .extend(resource_type.map(|raw| ("resourceType".to_owned(), raw.to_owned())));
                members.extend(id.map(|raw| ("id".to_owned(), raw)));
                members.extend(meta.map(|raw| ("meta".to_owned(), raw.to_owned())));
                members.extend(nesting.map(|nesting| ("contained".to_owned(), nesting.render())));
                members.extend(extra.into_iter().map(|(key, raw)| (key, raw.to_owned())));
                let rotation = (member_order_seed as usize) % (members.len() + 1);
                members.rotate_left(rotation);
                let body_members: Vec<String> = members
                    .iter()
                    .map(|(key, raw)| format!("\"{key}\":{raw}"))
                    .collect();
                let object_text = format!("{{{}}}", body_members.join(","));
                let text = if wrap_in_array {
                    format!("[{object_text}]")
                } else {
                    object_text
                };
                mutation.apply(text)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: PARSER_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn parse_bytes_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        check_parser_against_oracle(&bytes)?;
    }

    #[test]
    fn parse_bytes_never_panics_on_json_punctuation_soup(
        text in r#"[{}\[\]":, a-zA-Z0-9]{0,300}"#
    ) {
        check_parser_against_oracle(text.as_bytes())?;
    }

    #[test]
    fn parse_bytes_never_panics_on_deeply_nested_json(
        nesting in nesting_strategy(),
        prefix in r#"[{}\[\]":,a-z0-9]{0,8}"#
    ) {
        let body = format!(r#"{{"resourceType":"Basic","x":{}}}"#, nesting.render());
        check_parser_against_oracle(body.as_bytes())?;
        let bare = nesting.render();
        check_parser_against_oracle(bare.as_bytes())?;
        let prefixed = format!("{prefix}{bare}");
        check_parser_against_oracle(prefixed.as_bytes())?;
    }

    #[test]
    fn parse_bytes_accepts_exactly_the_well_formed_resources(
        bytes in resource_shaped_bytes_strategy()
    ) {
        check_parser_against_oracle(&bytes)?;
    }
}
