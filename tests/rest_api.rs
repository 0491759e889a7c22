//! The FHIR REST API over real sockets: an in-process server on port 0 per test.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use fhirlog::config::RequestLimits;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{FhirClient, SeededRandom, TestApp, spawn_app, spawn_app_with_limits};

const BULK_DATA_CAPABILITY: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const R4_CONCRETE_RESOURCE_TYPE_COUNT: usize = 147;

fn patient(id: &str, family_name: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "active": true, "name": [{"family": family_name}]})
}

fn resource_version(resource: &Value) -> u64 {
    resource["meta"]["versionId"]
        .as_str()
        .unwrap_or_else(|| panic!("resource has no meta.versionId: {resource}"))
        .parse()
        .expect("meta.versionId is a number")
}

fn family_name(resource: &Value) -> &str {
    resource["name"][0]["family"]
        .as_str()
        .unwrap_or_else(|| panic!("resource has no name[0].family: {resource}"))
}

fn put_sentinel_patient(app: &TestApp) {
    let reply = app
        .client
        .put_json("/Patient/sentinel", &patient("sentinel", "Original"));
    reply.expect_json(StatusCode::CREATED);
}

/// The sentinel is still at version 1 with its original content and nothing was
/// committed since `high_water_seq_before`.
fn assert_store_unchanged(app: &TestApp, high_water_seq_before: u64, case: &str) {
    assert_eq!(
        app.high_water_seq(),
        high_water_seq_before,
        "case '{case}' committed something"
    );
    let read = app.client.get("/Patient/sentinel");
    let sentinel = read.expect_json(StatusCode::OK);
    assert_eq!(resource_version(&sentinel), 1, "case '{case}'");
    assert_eq!(family_name(&sentinel), "Original", "case '{case}'");
}

fn parse_http_date_seconds(text: &str) -> i64 {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(text, &format)
        .unwrap_or_else(|error| panic!("'{text}' is not an HTTP date: {error}"))
        .assume_utc()
        .unix_timestamp()
}

fn parse_fhir_instant_seconds(text: &str) -> i64 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|error| panic!("'{text}' is not a FHIR instant: {error}"))
        .unix_timestamp()
}

/// `[Base/]Type/id/_history/n` → (Type, id, n).
fn split_version_location(location: &str) -> (String, String, u64) {
    let segments: Vec<&str> = location.rsplitn(4, '/').collect();
    assert!(
        segments.len() == 4 && segments[1] == "_history",
        "'{location}' is not a version location"
    );
    let resource_type = segments[3].rsplit('/').next().unwrap_or_default();
    (
        resource_type.to_owned(),
        segments[2].to_owned(),
        segments[0].parse().expect("a version number"),
    )
}

fn server_root(app: &TestApp) -> FhirClient {
    FhirClient::new(app.base_url.trim_end_matches("/fhir"))
}

#[test]
fn metadata_is_a_fhir_4_0_1_capability_statement_instantiating_bulk_data() {
    let app = spawn_app();

    let statement = app.client.get("/metadata").expect_json(StatusCode::OK);

    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    assert_eq!(statement["kind"], "instance");
    let instantiates = statement["instantiates"]
        .as_array()
        .expect("instantiates is an array");
    assert!(
        instantiates.contains(&json!(BULK_DATA_CAPABILITY)),
        "{instantiates:?}"
    );
    assert_eq!(statement["implementation"]["url"], app.base_url.as_str());
    let rest = &statement["rest"][0];
    assert_eq!(rest["mode"], "server");
    let system_interactions: BTreeSet<&str> = rest["interaction"]
        .as_array()
        .expect("rest.interaction is an array")
        .iter()
        .filter_map(|interaction| interaction["code"].as_str())
        .collect();
    assert_eq!(
        system_interactions,
        BTreeSet::from(["batch", "history-system", "transaction"])
    );
    let resources = rest["resource"]
        .as_array()
        .expect("rest.resource is an array");
    assert_eq!(resources.len(), R4_CONCRETE_RESOURCE_TYPE_COUNT);
    let listed_types: BTreeSet<&str> = resources
        .iter()
        .filter_map(|resource| resource["type"].as_str())
        .collect();
    assert_eq!(listed_types.len(), R4_CONCRETE_RESOURCE_TYPE_COUNT);
    for expected_type in ["Patient", "Observation", "Encounter", "Group", "Bundle"] {
        assert!(
            listed_types.contains(expected_type),
            "{expected_type} missing"
        );
    }
    for resource in resources {
        let interactions: BTreeSet<&str> = resource["interaction"]
            .as_array()
            .unwrap_or_else(|| panic!("no interactions for {}", resource["type"]))
            .iter()
            .filter_map(|interaction| interaction["code"].as_str())
            .collect();
        for expected in [
            "read",
            "vread",
            "update",
            "delete",
            "history-instance",
            "history-type",
            "search-type",
            "create",
        ] {
            assert!(
                interactions.contains(expected),
                "{} does not list {expected}",
                resource["type"]
            );
        }
    }
}

#[test]
fn post_creates_with_a_server_assigned_id_location_etag_and_last_modified() {
    let app = spawn_app();
    let submitted = json!({
        "resourceType": "Patient",
        "id": "client-chosen",
        "meta": {"versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z"},
        "active": true,
        "name": [{"family": "Created"}],
    });

    let reply = app.client.post_json("/Patient", &submitted);

    let created = reply.expect_json(StatusCode::CREATED);
    let assigned_id = created["id"].as_str().expect("the body has an id");
    assert_ne!(assigned_id, "client-chosen");
    assert!(!assigned_id.is_empty() && assigned_id.len() <= 64);
    assert_eq!(
        reply.required_header("location"),
        format!("{}/Patient/{assigned_id}/_history/1", app.base_url)
    );
    assert_eq!(reply.required_header("etag"), "W/\"1\"");
    assert_eq!(created["meta"]["versionId"], "1");
    let last_updated = created["meta"]["lastUpdated"]
        .as_str()
        .expect("meta.lastUpdated is a string");
    assert_ne!(last_updated, "2001-01-01T00:00:00Z");
    assert_eq!(
        parse_http_date_seconds(reply.required_header("last-modified")),
        parse_fhir_instant_seconds(last_updated)
    );
    assert_eq!(created["active"], true);
    assert_eq!(family_name(&created), "Created");

    app.client
        .get("/Patient/client-chosen")
        .expect_operation_outcome(StatusCode::NOT_FOUND, &["client-chosen"]);
    let read_back = app
        .client
        .get(&format!("/Patient/{assigned_id}"))
        .expect_json(StatusCode::OK);
    assert_eq!(read_back, created);

    let second = app
        .client
        .post_json("/Patient", &submitted)
        .expect_json(StatusCode::CREATED);
    assert_ne!(second["id"], created["id"]);
}

#[test]
fn put_creates_at_version_1_then_updates_to_version_2() {
    let app = spawn_app();

    let first = app
        .client
        .put_json("/Patient/put-target", &patient("put-target", "First"));
    let first_body = first.expect_json(StatusCode::CREATED);
    assert_eq!(first.required_header("etag"), "W/\"1\"");
    assert_eq!(first_body["id"], "put-target");
    assert_eq!(resource_version(&first_body), 1);
    assert_eq!(
        first.required_header("location"),
        format!("{}/Patient/put-target/_history/1", app.base_url)
    );

    let second = app
        .client
        .put_json("/Patient/put-target", &patient("put-target", "Second"));
    let second_body = second.expect_json(StatusCode::OK);
    assert_eq!(second.required_header("etag"), "W/\"2\"");
    assert_eq!(resource_version(&second_body), 2);
    assert_eq!(family_name(&second_body), "Second");
    assert!(
        second_body["meta"]["lastUpdated"].as_str() > first_body["meta"]["lastUpdated"].as_str()
    );

    let read = app.client.get("/Patient/put-target");
    let current = read.expect_json(StatusCode::OK);
    assert_eq!(read.required_header("etag"), "W/\"2\"");
    assert!(read.header("last-modified").is_some());
    assert_eq!(current, second_body);
}

#[test]
fn put_with_a_stale_if_match_is_412_and_leaves_the_resource_unchanged() {
    let app = spawn_app();
    app.client
        .put_json("/Patient/guarded", &patient("guarded", "Original"))
        .expect_json(StatusCode::CREATED);
    let high_water_seq_before = app.high_water_seq();

    let stale = app.client.send_json(
        Method::PUT,
        "/Patient/guarded",
        &[("If-Match", "W/\"2\"")],
        &patient("guarded", "Stale"),
    );

    stale.expect_operation_outcome(StatusCode::PRECONDITION_FAILED, &["guarded", "2"]);
    assert_eq!(app.high_water_seq(), high_water_seq_before);
    let unchanged = app.client.get("/Patient/guarded");
    assert_eq!(unchanged.etag_version(), 1);
    assert_eq!(
        family_name(&unchanged.expect_json(StatusCode::OK)),
        "Original"
    );
    let history = app
        .client
        .get("/Patient/guarded/_history")
        .expect_json(StatusCode::OK);
    assert_eq!(history["total"], 1);

    let fresh = app.client.send_json(
        Method::PUT,
        "/Patient/guarded",
        &[("If-Match", "W/\"1\"")],
        &patient("guarded", "Fresh"),
    );
    let fresh_body = fresh.expect_json(StatusCode::OK);
    assert_eq!(fresh.etag_version(), 2);
    assert_eq!(family_name(&fresh_body), "Fresh");

    let strong_etag = app.client.send_json(
        Method::PUT,
        "/Patient/guarded",
        &[("If-Match", "\"2\"")],
        &patient("guarded", "Strong"),
    );
    strong_etag.expect_json(StatusCode::OK);
    assert_eq!(strong_etag.etag_version(), 3);
}

#[test]
fn if_match_on_a_resource_that_does_not_exist_is_412_and_creates_nothing() {
    let app = spawn_app();
    let high_water_seq_before = app.high_water_seq();

    let reply = app.client.send_json(
        Method::PUT,
        "/Patient/not-there",
        &[("If-Match", "W/\"1\"")],
        &patient("not-there", "Ghost"),
    );

    reply.expect_operation_outcome(StatusCode::PRECONDITION_FAILED, &["not-there"]);
    assert_eq!(app.high_water_seq(), high_water_seq_before);
    assert_eq!(
        app.client.get("/Patient/not-there").status,
        StatusCode::NOT_FOUND
    );
}

#[test]
fn read_vread_history_and_delete_follow_fhir_semantics() {
    let app = spawn_app();
    let version_1 = app
        .client
        .put_json("/Patient/lifecycle", &patient("lifecycle", "One"))
        .expect_json(StatusCode::CREATED);
    let version_2 = app
        .client
        .put_json("/Patient/lifecycle", &patient("lifecycle", "Two"))
        .expect_json(StatusCode::OK);

    let deleted = app.client.delete("/Patient/lifecycle");
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text);
    assert_eq!(deleted.etag_version(), 3);

    app.client
        .get("/Patient/lifecycle")
        .expect_operation_outcome(StatusCode::GONE, &["lifecycle", "deleted"]);
    let vread_1 = app.client.get("/Patient/lifecycle/_history/1");
    assert_eq!(vread_1.etag_version(), 1);
    assert_eq!(vread_1.expect_json(StatusCode::OK), version_1);
    assert_eq!(
        app.client
            .get("/Patient/lifecycle/_history/2")
            .expect_json(StatusCode::OK),
        version_2
    );
    app.client
        .get("/Patient/lifecycle/_history/3")
        .expect_operation_outcome(StatusCode::GONE, &["lifecycle"]);
    app.client
        .get("/Patient/lifecycle/_history/4")
        .expect_operation_outcome(StatusCode::NOT_FOUND, &["lifecycle"]);

    let history = app
        .client
        .get("/Patient/lifecycle/_history")
        .expect_json(StatusCode::OK);
    assert_eq!(history["resourceType"], "Bundle");
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 3);
    let entries = history["entry"].as_array().expect("history entries");
    let etags: Vec<&str> = entries
        .iter()
        .map(|entry| entry["response"]["etag"].as_str().expect("an etag"))
        .collect();
    assert_eq!(etags, ["W/\"3\"", "W/\"2\"", "W/\"1\""]);
    assert_eq!(entries[0]["request"]["method"], "DELETE");
    assert!(entries[0].get("resource").is_none(), "{}", entries[0]);
    assert_eq!(entries[1]["resource"], version_2);
    assert_eq!(entries[2]["resource"], version_1);
    for entry in entries {
        assert_eq!(
            entry["fullUrl"],
            format!("{}/Patient/lifecycle", app.base_url)
        );
    }

    let recreated = app
        .client
        .put_json("/Patient/lifecycle", &patient("lifecycle", "Again"));
    recreated.expect_json(StatusCode::CREATED);
    assert_eq!(recreated.etag_version(), 4);
}

#[test]
fn deleting_a_resource_that_never_existed_appends_nothing() {
    let app = spawn_app();
    let high_water_seq_before = app.high_water_seq();

    let reply = app.client.delete("/Patient/never-created");

    assert!(reply.status.is_success(), "{}", reply.text);
    assert_eq!(app.high_water_seq(), high_water_seq_before);
    assert_eq!(
        app.client.get("/Patient/never-created").status,
        StatusCode::NOT_FOUND
    );
}

#[test]
fn reads_of_an_id_that_never_existed_are_404_operation_outcomes() {
    let app = spawn_app();

    app.client
        .get("/Patient/never-existed")
        .expect_operation_outcome(StatusCode::NOT_FOUND, &["never-existed"]);
    app.client
        .get("/Patient/never-existed/_history/1")
        .expect_operation_outcome(StatusCode::NOT_FOUND, &["never-existed"]);
    app.client
        .get("/Patient/never-existed/_history")
        .expect_operation_outcome(StatusCode::NOT_FOUND, &["never-existed"]);
    for not_a_version in ["0", "abc", "-1"] {
        app.client
            .get(&format!("/Patient/never-existed/_history/{not_a_version}"))
            .expect_operation_outcome(StatusCode::NOT_FOUND, &[not_a_version]);
    }
}

#[test]
fn history_of_an_id_excludes_versions_of_longer_ids_it_is_a_prefix_of() {
    let app = spawn_app();
    app.client
        .put_json("/Patient/p1", &patient("p1", "Short"))
        .expect_json(StatusCode::CREATED);
    for family in ["LongerOne", "LongerTwo"] {
        let reply = app.client.put_json("/Patient/p10", &patient("p10", family));
        assert!(reply.status.is_success(), "{}", reply.text);
    }

    let history = app
        .client
        .get("/Patient/p1/_history")
        .expect_json(StatusCode::OK);

    assert_eq!(history["total"], 1, "{history}");
    assert_eq!(history["entry"][0]["resource"]["id"], "p1");
    assert_eq!(
        app.client.get("/Patient/p1").expect_json(StatusCode::OK)["id"],
        "p1"
    );
}

struct InvalidRequestCase {
    name: &'static str,
    method: Method,
    path: String,
    headers: &'static [(&'static str, &'static str)],
    body: String,
    status: StatusCode,
    diagnostics_fragments: &'static [&'static str],
}

fn invalid_request(
    name: &'static str,
    method: Method,
    path: &str,
    body: &str,
    status: StatusCode,
    diagnostics_fragments: &'static [&'static str],
) -> InvalidRequestCase {
    InvalidRequestCase {
        name,
        method,
        path: path.to_owned(),
        headers: &[],
        body: body.to_owned(),
        status,
        diagnostics_fragments,
    }
}

#[test]
fn each_invalid_request_gets_a_4xx_operation_outcome_naming_the_problem_and_changes_nothing() {
    let app = spawn_app();
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();
    let too_long_id = "a".repeat(65);
    let bad_request = StatusCode::BAD_REQUEST;
    let cases = vec![
        invalid_request(
            "malformed JSON on create",
            Method::POST,
            "/Patient",
            r#"{"resourceType":"Patient","#,
            bad_request,
            &["json"],
        ),
        invalid_request(
            "malformed JSON on update",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":"Patient","id":"sentinel",,}"#,
            bad_request,
            &["json"],
        ),
        invalid_request(
            "JSON array body",
            Method::PUT,
            "/Patient/sentinel",
            r#"[{"resourceType":"Patient","id":"sentinel"}]"#,
            bad_request,
            &["array"],
        ),
        invalid_request(
            "JSON string body",
            Method::POST,
            "/Patient",
            r#""Patient""#,
            bad_request,
            &["string"],
        ),
        invalid_request(
            "missing resourceType",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"id":"sentinel","active":false}"#,
            bad_request,
            &["resourceType"],
        ),
        invalid_request(
            "resourceType is not a string",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":7,"id":"sentinel"}"#,
            bad_request,
            &["resourceType"],
        ),
        invalid_request(
            "unknown resourceType in the body",
            Method::POST,
            "/Patient",
            r#"{"resourceType":"Unicorn"}"#,
            bad_request,
            &["Unicorn"],
        ),
        invalid_request(
            "unknown resource type in the URL",
            Method::POST,
            "/Unicorn",
            r#"{"resourceType":"Unicorn"}"#,
            StatusCode::NOT_FOUND,
            &["Unicorn"],
        ),
        invalid_request(
            "body type differs from the URL type on update",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":"Observation","id":"sentinel","status":"final","code":{}}"#,
            bad_request,
            &["Observation", "Patient"],
        ),
        invalid_request(
            "body type differs from the URL type on create",
            Method::POST,
            "/Patient",
            r#"{"resourceType":"Observation","status":"final","code":{}}"#,
            bad_request,
            &["Observation", "Patient"],
        ),
        invalid_request(
            "body id differs from the URL id",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":"Patient","id":"someone-else"}"#,
            bad_request,
            &["someone-else", "sentinel"],
        ),
        invalid_request(
            "update body without an id",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":"Patient","active":false}"#,
            bad_request,
            &["id", "sentinel"],
        ),
        invalid_request(
            "id in the body is not a string",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":"Patient","id":42}"#,
            bad_request,
            &["id"],
        ),
        invalid_request(
            "invalid id in the body",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":"Patient","id":"sen tinel"}"#,
            bad_request,
            &["sen tinel"],
        ),
        invalid_request(
            "meta is not an object",
            Method::PUT,
            "/Patient/sentinel",
            r#"{"resourceType":"Patient","id":"sentinel","meta":"v9"}"#,
            bad_request,
            &["meta"],
        ),
        invalid_request(
            "invalid id in the URL on update",
            Method::PUT,
            "/Patient/a_b",
            r#"{"resourceType":"Patient","id":"a_b"}"#,
            bad_request,
            &["a_b"],
        ),
        invalid_request(
            "invalid id in the URL on read",
            Method::GET,
            "/Patient/a_b",
            "",
            bad_request,
            &["a_b"],
        ),
        invalid_request(
            "invalid id in the URL on delete",
            Method::DELETE,
            "/Patient/a_b",
            "",
            bad_request,
            &["a_b"],
        ),
        invalid_request(
            "65-character id in the URL on update",
            Method::PUT,
            &format!("/Patient/{too_long_id}"),
            &json!({"resourceType": "Patient", "id": too_long_id}).to_string(),
            bad_request,
            &["65", "64"],
        ),
        invalid_request(
            "65-character id in the URL on read",
            Method::GET,
            &format!("/Patient/{too_long_id}"),
            "",
            bad_request,
            &["65", "64"],
        ),
        InvalidRequestCase {
            headers: &[("If-Match", "version one")],
            ..invalid_request(
                "If-Match that is not a version ETag",
                Method::PUT,
                "/Patient/sentinel",
                r#"{"resourceType":"Patient","id":"sentinel"}"#,
                bad_request,
                &["If-Match", "version one"],
            )
        },
        InvalidRequestCase {
            headers: &[("If-Match", "W/\"5\"")],
            ..invalid_request(
                "delete with a stale If-Match",
                Method::DELETE,
                "/Patient/sentinel",
                "",
                StatusCode::PRECONDITION_FAILED,
                &["sentinel", "5"],
            )
        },
        invalid_request(
            "create of a non-Bundle at the base",
            Method::POST,
            "",
            r#"{"resourceType":"Patient"}"#,
            bad_request,
            &["Bundle"],
        ),
        invalid_request(
            "Bundle of a type that cannot be processed",
            Method::POST,
            "",
            r#"{"resourceType":"Bundle","type":"collection","entry":[]}"#,
            bad_request,
            &["collection"],
        ),
        invalid_request(
            "Bundle without a type",
            Method::POST,
            "",
            r#"{"resourceType":"Bundle","entry":[]}"#,
            bad_request,
            &["type"],
        ),
    ];

    for case in cases {
        let reply = app.client.send_bytes(
            case.method.clone(),
            &case.path,
            case.headers,
            case.body.into_bytes(),
        );
        assert_eq!(
            reply.status, case.status,
            "case '{}': unexpected status; body: {}",
            case.name, reply.text
        );
        reply.expect_operation_outcome(case.status, case.diagnostics_fragments);
        assert_store_unchanged(&app, high_water_seq_before, case.name);
    }
}

#[test]
fn unsupported_content_types_are_415_and_change_nothing() {
    let app = spawn_app();
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();
    let body = patient("sentinel", "Replaced").to_string();

    for (content_type, path, method) in [
        (Some("text/plain"), "/Patient/sentinel", Method::PUT),
        (Some("application/xml"), "/Patient", Method::POST),
        (Some("application/fhir+xml"), "", Method::POST),
        (None, "/Patient/sentinel", Method::PUT),
    ] {
        let mut headers = Vec::new();
        if let Some(content_type) = content_type {
            headers.push(("Content-Type", content_type));
        }
        let reply = app
            .client
            .send(method, path, &headers, Some(body.clone().into()));
        let case = content_type.unwrap_or("no content type");
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "case '{case}': {}",
            reply.text
        );
        let fragments: &[&str] = match content_type {
            Some(content_type) => &[content_type],
            None => &["content-type"],
        };
        reply.expect_operation_outcome(StatusCode::UNSUPPORTED_MEDIA_TYPE, fragments);
        assert_store_unchanged(&app, high_water_seq_before, case);
    }
}

#[test]
fn fhir_json_content_types_with_parameters_and_plain_json_are_accepted() {
    let app = spawn_app();

    for (index, content_type) in [
        "application/fhir+json; fhirVersion=4.0",
        "application/fhir+json;charset=UTF-8",
        "application/json",
        "APPLICATION/FHIR+JSON",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("typed-{index}");
        let reply = app.client.send(
            Method::PUT,
            &format!("/Patient/{id}"),
            &[("Content-Type", content_type)],
            Some(patient(&id, "Typed").to_string().into()),
        );
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "{content_type}: {}",
            reply.text
        );
    }
}

const SMALL_BODY_LIMIT: usize = 2048;

fn patient_json_of_exact_length(id: &str, length: usize) -> Vec<u8> {
    let prefix = format!(r#"{{"resourceType":"Patient","id":"{id}","name":[{{"text":""#);
    let suffix = r#""}]}"#;
    let padding = length - prefix.len() - suffix.len();
    let text = format!("{prefix}{}{suffix}", "x".repeat(padding));
    assert_eq!(text.len(), length);
    serde_json::from_str::<Value>(&text).expect("the padded patient is valid JSON");
    text.into_bytes()
}

/// Sends `body` with `Transfer-Encoding: chunked` over a raw socket (so no Content-Length
/// is declared) and returns the status code and the response body.
fn send_chunked(app: &TestApp, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let authority = app
        .base_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .expect("the base URL has an authority");
    let mut stream = TcpStream::connect(authority).expect("connecting to the server");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("setting a read timeout");
    let head = format!(
        "{method} /fhir{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .expect("writing the request head");
    let mut write_failed = false;
    for chunk in body.chunks(700) {
        let framed_chunk = [
            format!("{:x}\r\n", chunk.len()).as_bytes(),
            chunk,
            b"\r\n".as_slice(),
        ]
        .concat();
        if stream.write_all(&framed_chunk).is_err() {
            write_failed = true;
            break;
        }
    }
    if !write_failed {
        let _ = stream.write_all(b"0\r\n\r\n");
    }
    let mut response = Vec::new();
    let read_result = stream.read_to_end(&mut response);
    if response.is_empty() {
        panic!("no HTTP answer to the chunked {method} {path}: {read_result:?}");
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn bodies_over_max_body_bytes_are_413_with_content_length() {
    let app = spawn_app_with_limits(RequestLimits {
        max_body_bytes: SMALL_BODY_LIMIT,
        ..RequestLimits::default()
    });
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();

    let over_by_one = app.client.send_bytes(
        Method::PUT,
        "/Patient/sentinel",
        &[],
        patient_json_of_exact_length("sentinel", SMALL_BODY_LIMIT + 1),
    );
    over_by_one.expect_operation_outcome(StatusCode::PAYLOAD_TOO_LARGE, &["2048"]);
    assert_store_unchanged(&app, high_water_seq_before, "one byte over the limit");

    let far_over = app.client.send_bytes(
        Method::POST,
        "/Patient",
        &[],
        patient_json_of_exact_length("ignored", 3 * SMALL_BODY_LIMIT),
    );
    far_over.expect_operation_outcome(StatusCode::PAYLOAD_TOO_LARGE, &["2048"]);
    assert_store_unchanged(&app, high_water_seq_before, "far over the limit");

    let at_the_limit = app.client.send_bytes(
        Method::PUT,
        "/Patient/at-the-limit",
        &[],
        patient_json_of_exact_length("at-the-limit", SMALL_BODY_LIMIT),
    );
    at_the_limit.expect_json(StatusCode::CREATED);
}

#[test]
fn bodies_over_max_body_bytes_are_413_with_chunked_transfer() {
    let app = spawn_app_with_limits(RequestLimits {
        max_body_bytes: SMALL_BODY_LIMIT,
        ..RequestLimits::default()
    });
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();

    let (status, body) = send_chunked(
        &app,
        "PUT",
        "/Patient/sentinel",
        &patient_json_of_exact_length("sentinel", SMALL_BODY_LIMIT + 1),
    );
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("OperationOutcome") && body.contains("2048"),
        "{body}"
    );
    assert_store_unchanged(&app, high_water_seq_before, "chunked, one byte over");

    let (status, body) = send_chunked(
        &app,
        "POST",
        "/Patient",
        &patient_json_of_exact_length("ignored", 3 * SMALL_BODY_LIMIT),
    );
    assert_eq!(status, 413, "{body}");
    assert_store_unchanged(&app, high_water_seq_before, "chunked, far over");

    let (status, body) = send_chunked(
        &app,
        "PUT",
        "/Patient/chunked-at-the-limit",
        &patient_json_of_exact_length("chunked-at-the-limit", SMALL_BODY_LIMIT),
    );
    assert_eq!(status, 201, "{body}");
    assert!(app.client.is_serving());
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn json_nested_deeper_than_the_limit_is_400_and_extreme_nesting_does_not_crash() {
    let app = spawn_app();
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();
    let limit = RequestLimits::default().max_json_depth;

    let too_deep = format!(
        r#"{{"resourceType":"Patient","id":"sentinel","extension":{}}}"#,
        nested_arrays(limit + 10)
    );
    app.client
        .send_bytes(Method::PUT, "/Patient/sentinel", &[], too_deep.into_bytes())
        .expect_operation_outcome(StatusCode::BAD_REQUEST, &["nested", &limit.to_string()]);
    assert_store_unchanged(&app, high_water_seq_before, "nested past the limit");

    let too_deep_in_a_bundle = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [{
            "resource": serde_json::from_str::<Value>(&format!(
                r#"{{"resourceType":"Patient","extension":{}}}"#, nested_arrays(limit + 10)
            )).expect("valid JSON"),
            "request": {"method": "POST", "url": "Patient"},
        }],
    });
    let bundle_reply = app.client.post_json("", &too_deep_in_a_bundle);
    assert!(
        bundle_reply.status.is_client_error(),
        "{}",
        bundle_reply.text
    );
    assert_store_unchanged(
        &app,
        high_water_seq_before,
        "nested past the limit in a batch",
    );

    for extreme_depth in [10_000, 200_000] {
        let extreme = format!(
            r#"{{"resourceType":"Patient","id":"sentinel","extension":{}}}"#,
            nested_arrays(extreme_depth)
        );
        let reply =
            app.client
                .send_bytes(Method::PUT, "/Patient/sentinel", &[], extreme.into_bytes());
        reply.expect_operation_outcome(StatusCode::BAD_REQUEST, &[]);
        assert_store_unchanged(&app, high_water_seq_before, "extreme nesting");
    }

    let shallow = format!(
        r#"{{"resourceType":"Patient","id":"shallow","extension":{}}}"#,
        nested_arrays(limit / 2)
    );
    app.client
        .send_bytes(Method::PUT, "/Patient/shallow", &[], shallow.into_bytes())
        .expect_json(StatusCode::CREATED);
}

/// Depths around the limit, serde_json's own recursion guard (128) and far past both:
/// each is refused as nested too deep, never as malformed and never by a crash, for a
/// create, an update and a batch, even when the text is also cut short.
#[test]
fn json_nested_at_any_depth_past_the_limit_is_refused_as_nested_too_deep() {
    let app = spawn_app();
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();
    let limit = RequestLimits::default().max_json_depth;
    let nested_objects =
        |depth: usize| format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    for total_depth in [limit + 1, 127, 128, 129, 200, 200_001] {
        let below_the_root = total_depth - 1;
        for (shape, nested) in [
            ("arrays", nested_arrays(below_the_root)),
            ("objects", nested_objects(below_the_root)),
        ] {
            let update =
                format!(r#"{{"resourceType":"Patient","id":"sentinel","extension":{nested}}}"#);
            let create = format!(r#"{{"resourceType":"Patient","extension":{nested}}}"#);
            let cut_short = update[..update.len() - 2].to_owned();
            let batch = format!(
                r#"{{"resourceType":"Bundle","type":"batch","entry":[{{"request":{{"method":"POST","url":"Patient"}},"resource":{create}}}]}}"#
            );
            for (method, path, body) in [
                (Method::PUT, "/Patient/sentinel", update),
                (Method::PUT, "/Patient/sentinel", cut_short),
                (Method::POST, "/Patient", create),
                (Method::POST, "", batch),
            ] {
                let reply = app
                    .client
                    .send_bytes(method.clone(), path, &[], body.into_bytes());
                let text = reply.text.clone();
                reply.expect_operation_outcome(
                    StatusCode::BAD_REQUEST,
                    &["nested deeper than", &limit.to_string()],
                );
                assert!(
                    !text.contains("not valid JSON"),
                    "{method} {path} with {total_depth} levels of {shape}: {text}"
                );
            }
        }
    }
    assert_store_unchanged(&app, high_water_seq_before, "nested past the limit");
    assert!(app.client.is_serving());

    let brackets_in_a_string = format!(
        r#"{{"resourceType":"Patient","id":"brackets","name":[{{"text":"{}\"{}"}}]}}"#,
        "[{".repeat(100_000),
        "]".repeat(10)
    );
    app.client
        .send_bytes(
            Method::PUT,
            "/Patient/brackets",
            &[],
            brackets_in_a_string.into_bytes(),
        )
        .expect_json(StatusCode::CREATED);
}

#[test]
fn unknown_routes_are_404_operation_outcomes() {
    let app = spawn_app();
    let root = server_root(&app);

    for (client, method, path) in [
        (&app.client, Method::GET, "/Patient/x/y/z"),
        (&app.client, Method::PUT, "/Patient/x/y/z"),
        (&app.client, Method::GET, "/Patient/x/_history/1/extra"),
        (&app.client, Method::GET, "/Unicorn/1"),
        (&root, Method::GET, "/other"),
        (&root, Method::POST, "/other"),
        (&root, Method::GET, "/"),
        (&root, Method::GET, "/fhirx/metadata"),
    ] {
        let reply = client.send(method.clone(), path, &[], None);
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            reply.text
        );
        reply.expect_operation_outcome(StatusCode::NOT_FOUND, &[]);
    }
}

#[test]
fn wrong_methods_are_405_operation_outcomes() {
    let app = spawn_app();

    for (method, path) in [
        (Method::PATCH, "/Patient/x"),
        (Method::POST, "/Patient/x"),
        (Method::DELETE, "/metadata"),
        (Method::PUT, "/metadata"),
        (Method::GET, ""),
        (Method::PUT, "/Patient"),
        (Method::DELETE, "/Patient/x/_history"),
        (Method::PUT, "/Patient/x/_history/1"),
    ] {
        let reply = app.client.send(method.clone(), path, &[], None);
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {}",
            reply.text
        );
        reply.expect_operation_outcome(StatusCode::METHOD_NOT_ALLOWED, &[method.as_str()]);
    }
}

#[test]
fn method_not_allowed_responses_name_the_allowed_methods_in_an_allow_header() {
    let app = spawn_app();

    for (method, path, allowed) in [
        (
            Method::PATCH,
            "/Patient/x",
            ["GET", "PUT", "DELETE"].as_slice(),
        ),
        (Method::DELETE, "/metadata", ["GET"].as_slice()),
        (Method::GET, "", ["POST"].as_slice()),
    ] {
        let reply = app.client.send(method.clone(), path, &[], None);
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
        let allow_header = reply
            .header("allow")
            .unwrap_or_else(|| panic!("405 for {method} {path} has no Allow header"));
        for allowed_method in allowed {
            assert!(
                allow_header.contains(allowed_method),
                "Allow '{allow_header}' lacks {allowed_method}"
            );
        }
    }
}

#[test]
fn random_garbage_bodies_always_get_4xx_and_the_server_keeps_serving() {
    let app = spawn_app();
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();
    let mut random = SeededRandom::new(0x00f1_11e1_06ba_d5ee);
    let targets = [
        (Method::PUT, "/Patient/sentinel"),
        (Method::PUT, "/Observation/garbage"),
        (Method::POST, "/Patient"),
        (Method::POST, ""),
    ];

    for request_number in 0..200 {
        let (method, path) = &targets[request_number % targets.len()];
        let length = if random.below(10) == 0 {
            random.below(16 * 1024) as usize
        } else {
            random.below(512) as usize
        };
        let garbage = random.bytes(length);
        let reply = app
            .client
            .send_bytes(method.clone(), path, &[], garbage.clone());
        assert!(
            reply.status.is_client_error(),
            "request {request_number} ({method} {path}, {length} bytes starting {:?}) got {}: {}",
            &garbage[..length.min(16)],
            reply.status,
            reply.text
        );
        reply.expect_operation_outcome(reply.status, &[]);
    }

    assert_store_unchanged(&app, high_water_seq_before, "random garbage");
    assert!(app.client.is_serving());
}

#[test]
fn randomly_mutated_resources_never_get_a_5xx_and_accepted_ones_read_back() {
    let app = spawn_app();
    let mut random = SeededRandom::new(0x0bad_cafe_f00d_0001);
    let template = json!({
        "resourceType": "Patient", "id": "mutant", "active": true,
        "name": [{"family": "Mutant", "given": ["A", "B"]}],
        "birthDate": "1970-01-01",
        "meta": {"tag": [{"code": "x"}]},
    })
    .to_string()
    .into_bytes();

    for request_number in 0..150 {
        let mut mutated = template.clone();
        for _ in 0..=random.below(3) {
            let position = random.below(mutated.len() as u64) as usize;
            match random.below(3) {
                0 => mutated[position] = random.next_u64() as u8,
                1 => {
                    mutated.remove(position);
                }
                _ => mutated.insert(position, b"{}[]\",:\\"[random.below(8) as usize]),
            }
        }
        let (method, path) = if request_number % 2 == 0 {
            (Method::PUT, "/Patient/mutant")
        } else {
            (Method::POST, "/Patient")
        };
        let reply = app.client.send_bytes(method, path, &[], mutated.clone());
        assert!(
            !reply.status.is_server_error(),
            "request {request_number} ({}) got {}: {}",
            String::from_utf8_lossy(&mutated),
            reply.status,
            reply.text
        );
        if reply.status.is_success() {
            let written = reply.json();
            let location = reply.required_header("location");
            let (_, id, version) = split_version_location(location);
            let read_back = app
                .client
                .get(&format!("/Patient/{id}/_history/{version}"))
                .expect_json(StatusCode::OK);
            assert_eq!(read_back, written);
        } else {
            reply.expect_operation_outcome(reply.status, &[]);
        }
    }
    assert!(app.client.is_serving());
}

fn bundle_entry_statuses(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .expect("response Bundle entries")
        .iter()
        .map(|entry| {
            entry["response"]["status"]
                .as_str()
                .unwrap_or_else(|| panic!("entry without response.status: {entry}"))
                .to_owned()
        })
        .collect()
}

fn status_code_of(status_text: &str) -> u16 {
    status_text
        .split(' ')
        .next()
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("'{status_text}' does not start with a status code"))
}

#[test]
fn batch_commits_each_good_entry_and_gives_each_bad_entry_its_own_status() {
    let app = spawn_app();
    app.client
        .put_json(
            "/Patient/batch-existing",
            &patient("batch-existing", "Before"),
        )
        .expect_json(StatusCode::CREATED);
    let batch = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("batch-new", "New"),
             "request": {"method": "PUT", "url": "Patient/batch-new"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {},
                          "subject": {"reference": "Patient/batch-new"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": patient("someone-else", "Mismatch"),
             "request": {"method": "PUT", "url": "Patient/batch-mismatch"}},
            {"resource": patient("batch-existing", "Stale"),
             "request": {"method": "PUT", "url": "Patient/batch-existing", "ifMatch": "W/\"7\""}},
            {"resource": {"resourceType": "Unicorn"},
             "request": {"method": "POST", "url": "Unicorn"}},
            {"request": {"method": "GET", "url": "Patient/batch-existing"}},
            {"request": {"method": "GET", "url": "Patient/batch-missing"}},
            {"resource": {"resourceType": "Patient", "id": "a_b"},
             "request": {"method": "PUT", "url": "Patient/a_b"}},
        ],
    });

    let reply = app.client.post_json("", &batch);

    let response = reply.expect_json(StatusCode::OK);
    assert_eq!(response["resourceType"], "Bundle");
    assert_eq!(response["type"], "batch-response");
    let statuses: Vec<u16> = bundle_entry_statuses(&response)
        .iter()
        .map(|status| status_code_of(status))
        .collect();
    assert_eq!(statuses, [201, 201, 400, 412, 400, 200, 404, 400]);
    let entries = response["entry"].as_array().expect("entries");
    for failed_index in [2, 3, 4, 6, 7] {
        assert_eq!(
            entries[failed_index]["response"]["outcome"]["resourceType"], "OperationOutcome",
            "entry {failed_index}: {}",
            entries[failed_index]
        );
    }
    assert_eq!(
        entries[0]["response"]["location"],
        "Patient/batch-new/_history/1"
    );
    assert_eq!(entries[5]["resource"]["id"], "batch-existing");
    assert_eq!(entries[5]["response"]["etag"], "W/\"1\"");

    let stored_patient = app
        .client
        .get("/Patient/batch-new")
        .expect_json(StatusCode::OK);
    assert_eq!(family_name(&stored_patient), "New");
    let observation_location = entries[1]["response"]["location"]
        .as_str()
        .expect("the created Observation has a location");
    let (observation_type, observation_id, _) = split_version_location(observation_location);
    assert_eq!(observation_type, "Observation");
    let stored_observation = app
        .client
        .get(&format!("/Observation/{observation_id}"))
        .expect_json(StatusCode::OK);
    assert_eq!(
        stored_observation["subject"]["reference"],
        "Patient/batch-new"
    );
    for never_written in [
        "/Patient/batch-mismatch",
        "/Patient/someone-else",
        "/Patient/batch-missing",
    ] {
        assert_eq!(
            app.client.get(never_written).status,
            StatusCode::NOT_FOUND,
            "{never_written}"
        );
    }
    let existing = app.client.get("/Patient/batch-existing");
    assert_eq!(existing.etag_version(), 1);
    assert_eq!(family_name(&existing.expect_json(StatusCode::OK)), "Before");
}

#[test]
fn transaction_replaces_urn_uuid_references_with_the_assigned_ids() {
    let app = spawn_app();
    let patient_urn = "urn:uuid:0d5c1d2e-0000-4000-8000-000000000001";
    let encounter_urn = "urn:uuid:0d5c1d2e-0000-4000-8000-000000000002";
    let transaction = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_urn,
             "resource": {"resourceType": "Patient", "name": [{"family": "Transacted"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": encounter_urn,
             "resource": {"resourceType": "Encounter", "id": "tx-encounter", "status": "finished",
                          "class": {"code": "AMB"}, "subject": {"reference": patient_urn}},
             "request": {"method": "PUT", "url": "Encounter/tx-encounter"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {},
                          "subject": {"reference": patient_urn},
                          "encounter": {"reference": encounter_urn},
                          "hasMember": [{"reference": patient_urn}]},
             "request": {"method": "POST", "url": "Observation"}},
        ],
    });

    let reply = app.client.post_json("", &transaction);

    let response = reply.expect_json(StatusCode::OK);
    assert_eq!(response["type"], "transaction-response");
    let statuses: Vec<u16> = bundle_entry_statuses(&response)
        .iter()
        .map(|status| status_code_of(status))
        .collect();
    assert_eq!(statuses, [201, 201, 201]);
    let entries = response["entry"].as_array().expect("entries");
    let locations: Vec<(String, String, u64)> = entries
        .iter()
        .map(|entry| {
            split_version_location(entry["response"]["location"].as_str().expect("a location"))
        })
        .collect();
    let (patient_type, patient_id, _) = &locations[0];
    assert_eq!(patient_type, "Patient");
    assert_eq!(
        locations[1],
        ("Encounter".to_owned(), "tx-encounter".to_owned(), 1)
    );
    let (_, observation_id, _) = &locations[2];
    let commit_instants: BTreeSet<&str> = entries
        .iter()
        .filter_map(|entry| entry["response"]["lastModified"].as_str())
        .collect();
    assert_eq!(
        commit_instants.len(),
        1,
        "one commit, one instant: {response}"
    );

    let stored_patient = app
        .client
        .get(&format!("/Patient/{patient_id}"))
        .expect_json(StatusCode::OK);
    assert_eq!(family_name(&stored_patient), "Transacted");
    let stored_encounter = app.client.get("/Encounter/tx-encounter");
    assert!(!stored_encounter.text.contains("urn:uuid"));
    assert_eq!(
        stored_encounter.expect_json(StatusCode::OK)["subject"]["reference"],
        format!("Patient/{patient_id}")
    );
    let stored_observation = app.client.get(&format!("/Observation/{observation_id}"));
    assert!(
        !stored_observation.text.contains("urn:uuid"),
        "{}",
        stored_observation.text
    );
    let observation = stored_observation.expect_json(StatusCode::OK);
    assert_eq!(
        observation["subject"]["reference"],
        format!("Patient/{patient_id}")
    );
    assert_eq!(
        observation["encounter"]["reference"],
        "Encounter/tx-encounter"
    );
    assert_eq!(
        observation["hasMember"][0]["reference"],
        format!("Patient/{patient_id}")
    );
}

#[test]
fn transaction_with_one_failing_entry_is_4xx_and_commits_nothing() {
    let app = spawn_app();
    put_sentinel_patient(&app);
    let high_water_seq_before = app.high_water_seq();
    let good_entries = || {
        vec![
            json!({"fullUrl": "urn:uuid:7a0c0f9e-0000-4000-8000-000000000001",
                   "resource": {"resourceType": "Patient", "name": [{"family": "Posted"}]},
                   "request": {"method": "POST", "url": "Patient"}}),
            json!({"resource": patient("tx-new", "New"),
                   "request": {"method": "PUT", "url": "Patient/tx-new"}}),
            json!({"resource": patient("tx-other", "Other"),
                   "request": {"method": "PUT", "url": "Patient/tx-other"}}),
        ]
    };
    let failing_entries = [
        (
            "If-Match conflict",
            json!({"resource": patient("sentinel", "Conflict"),
                   "request": {"method": "PUT", "url": "Patient/sentinel", "ifMatch": "W/\"7\""}}),
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            "delete with a stale If-Match",
            json!({"request": {"method": "DELETE", "url": "Patient/sentinel", "ifMatch": "W/\"9\""}}),
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            "resource type differs from the URL type",
            json!({"resource": {"resourceType": "Observation", "id": "tx-bad", "status": "final", "code": {}},
                   "request": {"method": "PUT", "url": "Patient/tx-bad"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown resource type",
            json!({"resource": {"resourceType": "Unicorn"},
                   "request": {"method": "POST", "url": "Unicorn"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid id",
            json!({"resource": {"resourceType": "Patient", "id": "a_b"},
                   "request": {"method": "PUT", "url": "Patient/a_b"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "entry without a resource",
            json!({"request": {"method": "PUT", "url": "Patient/tx-empty"}}),
            StatusCode::BAD_REQUEST,
        ),
    ];

    for (case, failing_entry, expected_status) in failing_entries {
        for failing_position in [0, 3] {
            let mut entries = good_entries();
            entries.insert(failing_position, failing_entry.clone());
            let transaction =
                json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
            let reply = app.client.post_json("", &transaction);
            assert_eq!(
                reply.status, expected_status,
                "case '{case}' at {failing_position}: {}",
                reply.text
            );
            reply.expect_operation_outcome(expected_status, &[]);
            assert_store_unchanged(&app, high_water_seq_before, case);
            assert_eq!(
                app.client.get("/Patient/tx-new").status,
                StatusCode::NOT_FOUND,
                "case '{case}'"
            );
        }
    }

    let all_good =
        json!({"resourceType": "Bundle", "type": "transaction", "entry": good_entries()});
    let reply = app.client.post_json("", &all_good);
    reply.expect_json(StatusCode::OK);
    assert_eq!(app.client.get("/Patient/tx-new").status, StatusCode::OK);
    assert_eq!(app.client.get("/Patient/tx-other").etag_version(), 1);
    assert_eq!(app.client.get("/Patient/sentinel").etag_version(), 1);
}

#[test]
fn eight_concurrent_clients_each_putting_50_resources_all_succeed_at_version_1() {
    let app = spawn_app();
    let high_water_seq_before = app.high_water_seq();
    let client_count = 8;
    let resources_per_client = 50;

    let writers: Vec<_> = (0..client_count)
        .map(|client_number| {
            let client = FhirClient::new(&app.base_url);
            std::thread::spawn(move || {
                for resource_number in 0..resources_per_client {
                    let id = format!("concurrent-{client_number}-{resource_number}");
                    let reply = client.put_json(&format!("/Patient/{id}"), &patient(&id, &id));
                    assert_eq!(reply.status, StatusCode::CREATED, "{id}: {}", reply.text);
                    assert_eq!(reply.etag_version(), 1, "{id}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("a writer thread panicked");
    }

    assert_eq!(
        app.high_water_seq() - high_water_seq_before,
        (client_count * resources_per_client) as u64
    );
    for client_number in 0..client_count {
        for resource_number in 0..resources_per_client {
            let id = format!("concurrent-{client_number}-{resource_number}");
            let read = app.client.get(&format!("/Patient/{id}"));
            assert_eq!(read.etag_version(), 1, "{id}");
            let stored = read.expect_json(StatusCode::OK);
            assert_eq!(resource_version(&stored), 1);
            assert_eq!(family_name(&stored), id);
        }
    }
}

#[test]
fn concurrent_updates_of_one_resource_get_distinct_consecutive_versions() {
    let app = spawn_app();
    let client_count = 8;
    let updates_per_client = 20;

    let writers: Vec<_> = (0..client_count)
        .map(|client_number| {
            let client = FhirClient::new(&app.base_url);
            std::thread::spawn(move || {
                (0..updates_per_client)
                    .map(|update_number| {
                        let family = format!("writer-{client_number}-{update_number}");
                        let reply =
                            client.put_json("/Patient/contended", &patient("contended", &family));
                        assert!(reply.status.is_success(), "{}", reply.text);
                        let written = reply.json();
                        assert_eq!(family_name(&written), family);
                        reply.etag_version()
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut acknowledged_versions: Vec<u64> = writers
        .into_iter()
        .flat_map(|writer| writer.join().expect("a writer thread panicked"))
        .collect();
    acknowledged_versions.sort_unstable();

    let total = (client_count * updates_per_client) as u64;
    assert_eq!(acknowledged_versions, (1..=total).collect::<Vec<u64>>());
    assert_eq!(app.client.get("/Patient/contended").etag_version(), total);
    let history = app
        .client
        .get("/Patient/contended/_history")
        .expect_json(StatusCode::OK);
    assert_eq!(history["total"], total);
}

#[test]
fn stored_bodies_keep_unicode_escapes_and_the_exact_digits_of_numbers() {
    let app = spawn_app();
    let body = r#"{"resourceType":"Observation","id":"precise","status":"final",
        "code":{"text":"caf\u00e9 \ud83d\ude00 \"quoted\" back\\slash"},
        "valueQuantity":{"value":1.50,"unit":"mg"},
        "component":[{"code":{},"valueDecimal":3.14159265358979323846264338327950288}]}"#;

    let written_reply = app.client.send_bytes(
        Method::PUT,
        "/Observation/precise",
        &[],
        body.as_bytes().to_vec(),
    );
    let written = written_reply.expect_json(StatusCode::CREATED);

    let read = app.client.get("/Observation/precise");
    assert_eq!(read.text, written_reply.text);
    assert_eq!(
        written["code"]["text"],
        "caf\u{e9} \u{1f600} \"quoted\" back\\slash"
    );
    assert_eq!(written["valueQuantity"]["value"].to_string(), "1.50");
    assert_eq!(
        written["component"][0]["valueDecimal"].to_string(),
        "3.14159265358979323846264338327950288"
    );
}

#[test]
fn transaction_writing_the_same_resource_twice_fails_and_commits_nothing() {
    let app = spawn_app();
    let high_water_seq_before = app.high_water_seq();
    let transaction = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient("twice", "First"),
             "request": {"method": "PUT", "url": "Patient/twice"}},
            {"resource": patient("twice", "Second"),
             "request": {"method": "PUT", "url": "Patient/twice"}},
            {"request": {"method": "DELETE", "url": "Patient/twice"}},
        ],
    });

    let reply = app.client.post_json("", &transaction);

    reply.expect_operation_outcome(StatusCode::BAD_REQUEST, &["Patient/twice"]);
    assert_eq!(app.high_water_seq(), high_water_seq_before);
    assert_eq!(
        app.client.get("/Patient/twice").status,
        StatusCode::NOT_FOUND
    );
}

#[test]
fn create_ignores_an_invalid_id_in_the_body() {
    let app = spawn_app();
    let too_long_id = "a".repeat(65);

    for body_id in ["a_b", too_long_id.as_str()] {
        let reply = app
            .client
            .post_json("/Patient", &patient(body_id, "Ignored"));
        let created = reply.expect_json(StatusCode::CREATED);
        assert_ne!(created["id"], body_id);

        let batch = json!({
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"resource": patient(body_id, "Ignored"),
                       "request": {"method": "POST", "url": "Patient"}}],
        });
        let response = app.client.post_json("", &batch).expect_json(StatusCode::OK);
        assert_eq!(bundle_entry_statuses(&response), ["201 Created"]);
    }
}

#[test]
fn oversized_uploads_of_several_megabytes_always_receive_the_413() {
    let app = spawn_app_with_limits(RequestLimits {
        max_body_bytes: SMALL_BODY_LIMIT,
        ..RequestLimits::default()
    });
    let oversized_body = patient_json_of_exact_length("ignored", 4 * 1024 * 1024);

    let unanswered: Vec<String> = (0..20)
        .filter_map(|_| {
            let answer = app.client.try_send(
                Method::POST,
                "/Patient",
                &[("Content-Type", support::FHIR_JSON)],
                Some(oversized_body.clone().into()),
            );
            match answer {
                Ok(reply) => {
                    assert_eq!(
                        reply.status,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "{}",
                        reply.text
                    );
                    None
                }
                Err(error) => Some(format!("{error:?}")),
            }
        })
        .collect();

    assert!(
        unanswered.is_empty(),
        "{} of 20 uploads got no HTTP answer, e.g. {}",
        unanswered.len(),
        unanswered[0]
    );
}
