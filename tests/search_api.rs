//! FHIR search and `_history` paging through the real server: searchset Bundles, paging
//! over one snapshot, `_summary=count`, `_count` limits, `_elements` (search and export),
//! history at three levels, refused parameters, and `_typeFilter` exports checked against
//! the same query through the search API.

mod support;

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::bulk::{BulkClient, Downloads, KickOffRequest, Polling, parameters};
use support::{TestApp, spawn_app};

const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "gender": "female", "name": [{"family": family}]})
}

fn observation(id: &str, patient_id: &str, code: &str, category: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "valueQuantity": {"value": 70, "unit": "kg"},
    })
}

fn put(app: &TestApp, resource: &Value) {
    app.client.put_resource(resource);
}

fn get_json(app: &TestApp, path: &str) -> Value {
    app.client.get(path).expect_json(StatusCode::OK)
}

/// Follows an absolute link of ours through the test client.
fn follow(app: &TestApp, url: &str) -> Value {
    let path = url
        .strip_prefix(&app.base_url)
        .unwrap_or_else(|| panic!("link '{url}' is not under {}", app.base_url));
    get_json(app, path)
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|link| link["relation"] == relation)
        .map(|link| link["url"].as_str().unwrap().to_owned())
}

fn entry_ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|entry| entry["resource"]["id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every page from `first_path` on, following `next`.
fn all_pages(app: &TestApp, first_path: &str) -> Vec<Value> {
    let mut pages = vec![get_json(app, first_path)];
    while let Some(next) = link(pages.last().unwrap(), "next") {
        pages.push(follow(app, &next));
        assert!(pages.len() < 100, "paging does not end");
    }
    pages
}

fn seed_patients(app: &TestApp, count: usize, family: &str) {
    for index in 0..count {
        put(app, &patient(&format!("{family}-{index}"), family));
    }
}

#[test]
fn search_pages_carry_total_and_links_and_cover_every_match_once() {
    let app = spawn_app();
    seed_patients(&app, 7, "Paged");
    seed_patients(&app, 3, "Other");

    let pages = all_pages(&app, "/Patient?family=paged&_count=3");

    assert_eq!(pages.len(), 3);
    let mut seen = Vec::new();
    for page in &pages {
        assert_eq!(page["resourceType"], "Bundle");
        assert_eq!(page["type"], "searchset");
        assert_eq!(page["total"], 7);
        assert!(link(page, "self").unwrap().contains("_count=3"));
        for entry in page["entry"].as_array().unwrap() {
            assert_eq!(entry["search"]["mode"], "match");
            let id = entry["resource"]["id"].as_str().unwrap();
            assert_eq!(entry["fullUrl"], format!("{}/Patient/{id}", app.base_url));
        }
        seen.extend(entry_ids(page));
    }
    assert_eq!(
        pages
            .iter()
            .map(|page| entry_ids(page).len())
            .collect::<Vec<_>>(),
        [3, 3, 1]
    );
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 7, "{seen:?}");
    assert!(seen.iter().all(|id| id.starts_with("Paged-")));
    assert!(link(&pages[2], "next").is_none());
}

#[test]
fn a_write_after_the_first_page_neither_shows_in_nor_shifts_the_next() {
    let app = spawn_app();
    seed_patients(&app, 4, "Stable");

    let first = get_json(&app, "/Patient?family=Stable&_count=2");
    let next = link(&first, "next").expect("a second page");
    let unchanged_second = follow(&app, &next);
    put(&app, &patient("Stable-new", "Stable"));
    put(&app, &patient("Stable-0", "Renamed"));
    app.client.delete("/Patient/Stable-3");
    let second = follow(&app, &next);

    assert_eq!(entry_ids(&second), entry_ids(&unchanged_second));
    assert_eq!(entry_ids(&second), ["Stable-2", "Stable-3"]);
    assert_eq!(second["total"], 4);
    let fresh = get_json(&app, "/Patient?family=Stable");
    assert_eq!(
        entry_ids(&fresh),
        ["Stable-1", "Stable-2", "Stable-new"],
        "a new search sees the writes"
    );
}

#[test]
fn summary_count_and_count_zero_answer_with_the_total_only() {
    let app = spawn_app();
    seed_patients(&app, 5, "Counted");
    for path in [
        "/Patient?family=Counted&_summary=count",
        "/Patient?family=Counted&_count=0",
    ] {
        let bundle = get_json(&app, path);
        assert_eq!(bundle["total"], 5, "{path}");
        assert!(bundle.get("entry").is_none(), "{path}: {bundle}");
        assert!(link(&bundle, "next").is_none(), "{path}");
    }
}

#[test]
fn count_defaults_to_50_and_is_clamped_to_1000() {
    let app = spawn_app();
    let bundle: Vec<Value> = (0..1_005)
        .map(|index| json!({"request": {"method": "PUT", "url": format!("Patient/many-{index}")}, "resource": patient(&format!("many-{index}"), "Many")}))
        .collect();
    let reply = app.client.post_json(
        "",
        &json!({"resourceType": "Bundle", "type": "batch", "entry": bundle}),
    );
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);

    let default_page = get_json(&app, "/Patient?family=Many");
    assert_eq!(entry_ids(&default_page).len(), 50);
    assert_eq!(default_page["total"], 1_005);
    let clamped = get_json(&app, "/Patient?family=Many&_count=5000");
    assert_eq!(entry_ids(&clamped).len(), 1_000);
    assert!(link(&clamped, "self").unwrap().contains("_count=1000"));
    let rest = follow(&app, &link(&clamped, "next").unwrap());
    assert_eq!(entry_ids(&rest).len(), 5);
}

#[test]
fn post_search_takes_a_form_body_like_get_takes_a_query() {
    let app = spawn_app();
    seed_patients(&app, 2, "Formed");
    seed_patients(&app, 2, "Other");
    let reply = app.client.send(
        Method::POST,
        "/Patient/_search",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some("family=Formed&_count=1".into()),
    );
    let first = reply.expect_json(StatusCode::OK);
    assert_eq!(first["total"], 2);
    assert_eq!(entry_ids(&first), ["Formed-0"]);
    let second = follow(&app, &link(&first, "next").unwrap());
    assert_eq!(entry_ids(&second), ["Formed-1"]);
    let json_body = app.client.send(
        Method::POST,
        "/Patient/_search",
        &[("content-type", "application/json")],
        Some("{}".into()),
    );
    assert_eq!(json_body.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[test]
fn indexed_searches_find_the_same_as_their_definitions() {
    let app = spawn_app();
    put(&app, &patient("p1", "One"));
    put(&app, &patient("p2", "Two"));
    put(&app, &observation("o1", "p1", "8302-2", "vital-signs"));
    put(&app, &observation("o2", "p1", "2345-7", "laboratory"));
    put(&app, &observation("o3", "p2", "8302-2", "vital-signs"));
    put(&app, &observation("o4", "p2", "8302-2", "vital-signs"));
    put(&app, &observation("o4", "p1", "8302-2", "vital-signs"));

    let cases = [
        (
            "/Observation?patient=p1&code=http://loinc.org|8302-2",
            vec!["o1", "o4"],
        ),
        ("/Observation?subject=Patient/p2", vec!["o3"]),
        ("/Observation?_id=o2,o3,nope", vec!["o2", "o3"]),
        ("/Observation?category=laboratory", vec!["o2"]),
        ("/Patient?_id=p2", vec!["p2"]),
    ];
    for (path, expected) in cases {
        let bundle = get_json(&app, path);
        let mut ids = entry_ids(&bundle);
        ids.sort();
        assert_eq!(ids, expected, "{path}");
        assert_eq!(bundle["total"], expected.len(), "{path}");
    }
}

#[test]
fn elements_subset_search_results_and_mark_them() {
    let app = spawn_app();
    put(&app, &patient("p1", "One"));
    put(&app, &observation("o1", "p1", "8302-2", "vital-signs"));

    let bundle = get_json(&app, "/Observation?_elements=code,value");
    let resource = &bundle["entry"][0]["resource"];
    let mut keys: Vec<&str> = resource
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "id", "meta", "resourceType", "valueQuantity"]
    );
    let tags = resource["meta"]["tag"].as_array().unwrap();
    assert_eq!(tags.len(), 1);
    assert_eq!(tags[0]["system"], SUBSETTED_SYSTEM);
    assert_eq!(tags[0]["code"], "SUBSETTED");

    let qualified = get_json(&app, "/Observation?_elements=Observation.subject");
    assert!(qualified["entry"][0]["resource"].get("subject").is_some());
    assert!(qualified["entry"][0]["resource"].get("code").is_none());
}

#[test]
fn bad_search_parameters_are_400_naming_them() {
    let app = spawn_app();
    for (path, named) in [
        ("/Patient?bogus=1", "bogus"),
        ("/Patient?_sort=family", "_sort"),
        ("/Patient?_count=many", "_count"),
        ("/Patient?_summary=text", "_summary"),
        ("/Patient?_elements=valueQuantity", "valueQuantity"),
        ("/Patient?birthdate=yesterday", "birthdate"),
        ("/Patient?_snapshot=999999&_count=1", "_snapshot"),
        ("/Patient/_history?_at=2020", "_at"),
        ("/_history?_since=soon", "_since"),
    ] {
        let reply = app.client.get(path);
        reply.expect_operation_outcome(StatusCode::BAD_REQUEST, &[named]);
    }
}

#[test]
fn history_pages_at_instance_type_and_system_level_over_one_snapshot() {
    let app = spawn_app();
    for version in 0..5 {
        put(&app, &patient("h1", &format!("Family{version}")));
    }
    put(&app, &patient("h2", "Other"));
    put(&app, &observation("ho", "h1", "8302-2", "vital-signs"));

    let instance = all_pages(&app, "/Patient/h1/_history?_count=2");
    assert_eq!(instance.len(), 3);
    let versions: Vec<&str> = instance
        .iter()
        .flat_map(|page| page["entry"].as_array().unwrap())
        .map(|entry| entry["resource"]["meta"]["versionId"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["5", "4", "3", "2", "1"]);
    assert!(
        instance
            .iter()
            .all(|page| page["type"] == "history" && page["total"] == 5)
    );

    let first_type_page = get_json(&app, "/Patient/_history?_count=4");
    put(&app, &patient("h3", "Later"));
    let type_pages = {
        let mut pages = vec![first_type_page];
        while let Some(next) = link(pages.last().unwrap(), "next") {
            pages.push(follow(&app, &next));
        }
        pages
    };
    let type_entries: Vec<String> = type_pages
        .iter()
        .flat_map(|page| page["entry"].as_array().unwrap())
        .map(|entry| {
            entry["fullUrl"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        type_entries,
        ["h2", "h1", "h1", "h1", "h1", "h1"],
        "newest first, h3 after the snapshot"
    );

    let system = all_pages(&app, "/_history?_count=3");
    let system_count: usize = system
        .iter()
        .map(|page| page["entry"].as_array().unwrap().len())
        .sum();
    assert_eq!(system_count, 8);
    assert_eq!(
        system[0]["entry"][0]["fullUrl"],
        format!("{}/Patient/h3", app.base_url)
    );
    assert_eq!(
        system[0]["entry"][1]["fullUrl"],
        format!("{}/Observation/ho", app.base_url)
    );
}

#[test]
fn history_since_keeps_later_versions_only() {
    let app = spawn_app();
    put(&app, &patient("s1", "Before"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let since = get_json(&app, "/Patient/s1")["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(std::time::Duration::from_millis(20));
    put(&app, &patient("s1", "After"));
    let bundle = get_json(
        &app,
        &format!("/Patient/s1/_history?_since={}", since.replace('+', "%2B")),
    );
    assert_eq!(bundle["total"], 2, "the version at _since itself counts");
    let later = get_json(&app, "/Patient/s1/_history?_since=2999-01-01T00:00:00Z");
    assert_eq!(later["total"], 0);
}

fn export_with(app: &TestApp, request: &KickOffRequest) -> support::bulk::Export {
    let bulk = BulkClient::new(&app.base_url);
    bulk.export(request, Polling::Eagerly, Downloads::PlainOnly, 5_000)
}

fn exported(export: &support::bulk::Export, type_name: &str) -> Vec<Value> {
    export
        .lines_by_type()
        .get(type_name)
        .into_iter()
        .flatten()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn elements_subset_exported_resources_of_the_types_they_name() {
    let app = spawn_app();
    put(&app, &patient("p1", "One"));
    put(&app, &observation("o1", "p1", "8302-2", "vital-signs"));

    let export = export_with(
        &app,
        &KickOffRequest::post(
            "/$export",
            parameters(&[("_elements", "Observation.code,Observation.status")]),
        ),
    );

    let observation = &exported(&export, "Observation")[0];
    let mut keys: Vec<&str> = observation
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "id", "meta", "resourceType", "status"]);
    assert_eq!(observation["meta"]["tag"][0]["code"], "SUBSETTED");
    let whole_patient = &exported(&export, "Patient")[0];
    assert!(
        whole_patient.get("name").is_some(),
        "an unnamed type stays whole"
    );
    assert!(whole_patient["meta"].get("tag").is_none());

    let plain = export_with(&app, &KickOffRequest::get("/$export?_elements=gender"));
    assert_eq!(exported(&plain, "Patient")[0]["gender"], "female");
    assert!(exported(&plain, "Patient")[0].get("name").is_none());
    assert!(exported(&plain, "Observation")[0].get("code").is_none());
}

fn ids_of(resources: &[Value]) -> BTreeSet<String> {
    resources
        .iter()
        .map(|resource| resource["id"].as_str().unwrap().to_owned())
        .collect()
}

fn search_ids(app: &TestApp, path: &str) -> BTreeSet<String> {
    all_pages(app, path).iter().flat_map(entry_ids).collect()
}

#[test]
fn type_filter_exports_at_every_level_equal_the_same_search() {
    let app = spawn_app();
    for (patient_id, family) in [("p1", "One"), ("p2", "Two"), ("p3", "Three")] {
        put(&app, &patient(patient_id, family));
    }
    let mut index = 0;
    for patient_id in ["p1", "p2", "p3"] {
        for (code, category) in [
            ("8302-2", "vital-signs"),
            ("2345-7", "laboratory"),
            ("8302-2", "laboratory"),
        ] {
            index += 1;
            put(
                &app,
                &observation(&format!("o{index}"), patient_id, code, category),
            );
        }
    }
    put(
        &app,
        &json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
                "member": [{"entity": {"reference": "Patient/p1"}}, {"entity": {"reference": "Patient/p3"}}]}),
    );
    let filter = "Observation?category=laboratory&code=http://loinc.org|8302-2";
    let encoded = "Observation%3Fcategory%3Dlaboratory%26code%3Dhttp%3A%2F%2Floinc.org%7C8302-2";

    let searched = search_ids(
        &app,
        "/Observation?category=laboratory&code=http://loinc.org|8302-2&_count=2",
    );
    assert_eq!(searched.len(), 3);
    let system = export_with(
        &app,
        &KickOffRequest::get(&format!("/$export?_type=Observation&_typeFilter={encoded}")),
    );
    assert_eq!(ids_of(&exported(&system, "Observation")), searched);

    let all_patients = export_with(
        &app,
        &KickOffRequest::post(
            "/Patient/$export",
            parameters(&[("_type", "Observation"), ("_typeFilter", filter)]),
        ),
    );
    assert_eq!(ids_of(&exported(&all_patients, "Observation")), searched);

    let group = export_with(
        &app,
        &KickOffRequest::get(&format!(
            "/Group/g/$export?_type=Observation&_typeFilter={encoded}"
        )),
    );
    let mut group_searched = search_ids(
        &app,
        "/Observation?category=laboratory&code=http://loinc.org|8302-2&patient=p1",
    );
    group_searched.extend(search_ids(
        &app,
        "/Observation?category=laboratory&code=http://loinc.org|8302-2&patient=Patient/p3",
    ));
    assert_eq!(group_searched.len(), 2);
    assert_eq!(ids_of(&exported(&group, "Observation")), group_searched);
}

#[test]
fn since_export_with_type_filter_reports_deleting_only_resources_the_filter_delivered() {
    let app = spawn_app();
    put(&app, &patient("p1", "One"));
    put(&app, &observation("lab", "p1", "2345-7", "laboratory"));
    put(&app, &observation("vital", "p1", "8302-2", "vital-signs"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let since = get_json(&app, "/Observation/vital")["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(std::time::Duration::from_millis(20));
    for id in ["lab", "vital"] {
        let reply = app.client.delete(&format!("/Observation/{id}"));
        assert!(reply.status.is_success(), "DELETE {id}: {}", reply.text);
    }

    let export = export_with(
        &app,
        &KickOffRequest::post(
            "/$export",
            parameters(&[
                ("_since", since.as_str()),
                ("_type", "Observation"),
                ("_typeFilter", "Observation?category=laboratory"),
            ]),
        ),
    );

    let deleted_urls: Vec<String> = export
        .deleted
        .iter()
        .flat_map(|file| file.lines.iter())
        .map(|line| {
            let bundle: Value = serde_json::from_str(line).unwrap();
            bundle["entry"][0]["request"]["url"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(deleted_urls, ["Observation/lab"]);
}

#[test]
fn last_updated_searches_read_the_commit_log_window_and_match_their_definition() {
    let app = spawn_app();
    let last_updated_of = |path: &str| {
        get_json(&app, path)["meta"]["lastUpdated"]
            .as_str()
            .unwrap()
            .replace('+', "%2B")
    };
    put(&app, &patient("early", "Early"));
    std::thread::sleep(std::time::Duration::from_millis(5));
    put(&app, &patient("middle", "Middle"));
    let middle = last_updated_of("/Patient/middle");
    std::thread::sleep(std::time::Duration::from_millis(5));
    put(&app, &patient("late", "Late"));
    std::thread::sleep(std::time::Duration::from_millis(5));
    put(&app, &patient("early", "Rewritten"));

    let cases = [
        (
            format!("/Patient?_lastUpdated=ge{middle}"),
            vec!["early", "late", "middle"],
        ),
        (
            format!("/Patient?_lastUpdated=gt{middle}"),
            vec!["early", "late"],
        ),
        (format!("/Patient?_lastUpdated=le{middle}"), vec!["middle"]),
        (format!("/Patient?_lastUpdated=lt{middle}"), vec![]),
        (format!("/Patient?_lastUpdated=eq{middle}"), vec!["middle"]),
        (
            format!("/Patient?_lastUpdated=ne{middle}"),
            vec!["early", "late"],
        ),
        (
            format!("/Patient?_lastUpdated=le{middle}&_lastUpdated=ge{middle}"),
            vec!["middle"],
        ),
        (
            format!("/Patient?_lastUpdated=lt{middle},gt{middle}"),
            vec!["early", "late"],
        ),
        ("/Patient?_lastUpdated=ge2999".to_owned(), vec![]),
        ("/Patient?_lastUpdated=le1999".to_owned(), vec![]),
    ];
    for (path, expected) in cases {
        let mut ids: Vec<String> = all_pages(&app, &path).iter().flat_map(entry_ids).collect();
        ids.sort();
        assert_eq!(ids, expected, "{path}");
    }
}

#[test]
fn references_under_this_servers_base_are_found_by_their_relative_form_and_others_servers_are_not()
{
    let app = spawn_app();
    put(&app, &patient("p1", "One"));
    let ours = format!("{}/Patient/p1", app.base_url);
    for (id, reference) in [
        ("relative", "Patient/p1".to_owned()),
        ("ours-absolute", ours.clone()),
        ("theirs", "http://other.example/fhir/Patient/p1".to_owned()),
    ] {
        let mut resource = observation(id, "p1", "8302-2", "vital-signs");
        resource["subject"]["reference"] = json!(reference);
        put(&app, &resource);
    }

    for path in [
        "/Observation?subject=Patient/p1".to_owned(),
        "/Observation?patient=p1".to_owned(),
        "/Observation?patient=p1&code=8302-2".to_owned(),
        format!("/Observation?subject={ours}"),
    ] {
        let mut ids: Vec<String> = all_pages(&app, &path).iter().flat_map(entry_ids).collect();
        ids.sort();
        assert_eq!(ids, ["ours-absolute", "relative"], "{path}");
    }
}
