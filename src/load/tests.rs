use std::io::Write;

use super::*;
use crate::fhir::canonical::DEFAULT_MAX_JSON_DEPTH;
use crate::store::StoreOptions;

fn options(paths: Vec<PathBuf>, on_error: OnError) -> LoadOptions {
    LoadOptions {
        paths,
        on_error,
        max_json_depth: DEFAULT_MAX_JSON_DEPTH,
        show_progress: false,
        max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
        local_base: LocalBase::relative_only(),
    }
}

fn write_file(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn write_gz(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut encoder =
        flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap();
}

fn id(text: &str) -> ResourceId {
    ResourceId::parse(text).unwrap()
}

#[test]
fn loads_ndjson_and_gz_recursively_and_a_second_load_is_a_no_op() {
    let inputs = tempfile::tempdir().unwrap();
    write_file(
        &inputs.path().join("a/Patient.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n\n{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n",
    );
    write_gz(
        &inputs.path().join("b/deeper/Observation.ndjson.gz"),
        "{\"resourceType\":\"Observation\",\"id\":\"o1\",\"status\":\"final\",\"code\":{},\"subject\":{\"reference\":\"Patient/p1\"}}\n",
    );
    write_file(&inputs.path().join("b/notes.txt"), "not data");
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();

    let first = load(
        &store,
        &options(vec![inputs.path().to_path_buf()], OnError::Abort),
    )
    .unwrap();
    assert_eq!(first.written(), 3);
    assert_eq!(first.by_type[&ResourceType::PATIENT].written, 2);
    assert_eq!(store.compartment_members("p1").unwrap().len(), 2);

    let second = load(
        &store,
        &options(vec![inputs.path().to_path_buf()], OnError::Abort),
    )
    .unwrap();
    assert_eq!(second.written(), 0);
    assert_eq!(second.unchanged(), 3);
    assert_eq!(store.high_water_seq().unwrap(), 3);
}

#[test]
fn abort_reports_file_and_line_and_commits_nothing_from_the_bad_batch() {
    let inputs = tempfile::tempdir().unwrap();
    let file = inputs.path().join("Patient.ndjson");
    write_file(
        &file,
        "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n{\"resourceType\":\"Patient\",\"id\":\n{\"resourceType\":\"Patient\",\"id\":\"p3\"}\n",
    );
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();
    let error = load(&store, &options(vec![file.clone()], OnError::Abort)).unwrap_err();
    let LoadError::BadInput { problem, .. } = &error else {
        panic!("{error}")
    };
    assert_eq!(problem.location, ProblemLocation::Line(2));
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}:2: body is not valid JSON", file.display())),
        "{error}"
    );
    assert_eq!(store.high_water_seq().unwrap(), 0);
}

#[test]
fn skip_loads_the_good_lines_and_lists_the_bad_ones() {
    let inputs = tempfile::tempdir().unwrap();
    let file = inputs.path().join("mixed.ndjson");
    write_file(
        &file,
        "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n[1,2]\n{\"resourceType\":\"Nope\",\"id\":\"x\"}\n{\"resourceType\":\"Patient\"}\n{\"resourceType\":\"Patient\",\"id\":\"p5\"}\n",
    );
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();
    let summary = load(&store, &options(vec![file], OnError::Skip)).unwrap();
    assert_eq!(summary.written(), 2);
    let bad_lines: Vec<ProblemLocation> = summary
        .skipped
        .iter()
        .map(|problem| problem.location.clone())
        .collect();
    assert_eq!(
        bad_lines,
        vec![
            ProblemLocation::Line(2),
            ProblemLocation::Line(3),
            ProblemLocation::Line(4)
        ]
    );
    assert!(summary.skipped[2].reason.contains("has no id"));
}

#[test]
fn synthea_bundles_load_with_urn_uuid_references_rewritten() {
    let inputs = tempfile::tempdir().unwrap();
    let bundle = r#"{"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:5a1b2c3d-0000-4000-8000-000000000001","resource":{"resourceType":"Patient","id":"5a1b2c3d-0000-4000-8000-000000000001"},"request":{"method":"POST","url":"Patient"}},
        {"fullUrl":"urn:uuid:5a1b2c3d-0000-4000-8000-000000000002","resource":{"resourceType":"Encounter","status":"finished","class":{},"subject":{"reference":"urn:uuid:5a1b2c3d-0000-4000-8000-000000000001"}},"request":{"method":"POST","url":"Encounter"}}
    ]}"#;
    write_file(&inputs.path().join("patient-bundle.json"), bundle);
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();
    let summary = load(
        &store,
        &options(vec![inputs.path().to_path_buf()], OnError::Abort),
    )
    .unwrap();
    assert_eq!(summary.written(), 2);
    let encounter_type = ResourceType::parse("Encounter").unwrap();
    let encounter = store
        .read_current(encounter_type, &id("5a1b2c3d-0000-4000-8000-000000000002"))
        .unwrap()
        .unwrap();
    assert!(
        encounter
            .body
            .unwrap()
            .contains(r#""subject":{"reference":"Patient/5a1b2c3d-0000-4000-8000-000000000001"}"#)
    );
    assert_eq!(
        store
            .compartment_members("5a1b2c3d-0000-4000-8000-000000000001")
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn unsupported_and_missing_paths_are_clear_errors() {
    let inputs = tempfile::tempdir().unwrap();
    let text_file = inputs.path().join("notes.txt");
    write_file(&text_file, "x");
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();
    assert!(matches!(
        load(&store, &options(vec![text_file], OnError::Abort)),
        Err(LoadError::UnsupportedFile(_))
    ));
    assert!(matches!(
        load(
            &store,
            &options(vec![inputs.path().join("missing")], OnError::Abort)
        ),
        Err(LoadError::Io { .. })
    ));
}

#[test]
fn the_shipped_sample_loads_completely() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample");
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();
    let summary = load(&store, &options(vec![sample], OnError::Abort)).unwrap();
    assert_eq!(summary.written(), 45_200);
    assert_eq!(summary.by_type.len(), 25);
    assert_eq!(summary.by_type[&ResourceType::PATIENT].written, 20);
}

fn patient_lines(count: usize) -> Vec<Vec<u8>> {
    (1..=count)
        .map(|number| format!(r#"{{"resourceType":"Patient","id":"p{number}"}}"#).into_bytes())
        .collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    std::fs::write(path, lines.join(&b'\n')).unwrap();
}

#[test]
fn an_invalid_utf8_line_is_skipped_and_reported_and_the_rest_of_the_file_loads() {
    let inputs = tempfile::tempdir().unwrap();
    let file = inputs.path().join("Patient.ndjson");
    let mut lines = patient_lines(1_000);
    lines[499] =
        b"{\"resourceType\":\"Patient\",\"id\":\"p500\",\"name\":[{\"family\":\"\xff\xfe\"}]}"
            .to_vec();
    write_lines(&file, &lines);
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();

    let summary = load(&store, &options(vec![file.clone()], OnError::Skip)).unwrap();

    assert_eq!(summary.written(), 999);
    assert_eq!(summary.skipped.len(), 1);
    assert_eq!(summary.skipped[0].location, ProblemLocation::Line(500));
    assert!(summary.skipped[0].reason.contains("not valid UTF-8"));
    assert_eq!(
        summary.skipped_by_file(),
        BTreeMap::from([(file.as_path(), 1)])
    );
    assert!(
        summary
            .to_string()
            .ends_with(&format!("\n  1 skipped in {}", file.display()))
    );
    assert!(
        store
            .read_current(ResourceType::PATIENT, &id("p1000"))
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .read_current(ResourceType::PATIENT, &id("p500"))
            .unwrap()
            .is_none()
    );
}

#[test]
fn a_line_or_document_over_the_cap_is_refused_with_a_clear_error() {
    const CAP: usize = 200;
    let inputs = tempfile::tempdir().unwrap();
    let long_line_file = inputs.path().join("a/Patient.ndjson");
    std::fs::create_dir_all(long_line_file.parent().unwrap()).unwrap();
    let mut lines = patient_lines(3);
    lines[1] = format!(
        r#"{{"resourceType":"Patient","id":"p2","gender":"{}"}}"#,
        "x".repeat(CAP)
    )
    .into_bytes();
    write_lines(&long_line_file, &lines);
    let big_document = inputs.path().join("b/big.json");
    write_file(
        &big_document,
        &format!(
            r#"{{"resourceType":"Patient","id":"big","gender":"{}"}}"#,
            "x".repeat(CAP)
        ),
    );
    write_file(
        &inputs.path().join("b/small.json"),
        r#"{"resourceType":"Patient","id":"small"}"#,
    );
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), &StoreOptions::default()).unwrap();
    let capped = |on_error| LoadOptions {
        max_document_bytes: CAP,
        ..options(vec![inputs.path().to_path_buf()], on_error)
    };

    let summary = load(&store, &capped(OnError::Skip)).unwrap();

    assert_eq!(summary.written(), 2, "p1 and small");
    let problems: Vec<(&Path, &ProblemLocation)> = summary
        .skipped
        .iter()
        .map(|problem| (problem.file.as_path(), &problem.location))
        .collect();
    assert_eq!(
        problems,
        vec![
            (long_line_file.as_path(), &ProblemLocation::Line(2)),
            (big_document.as_path(), &ProblemLocation::WholeFile),
        ]
    );
    assert!(
        summary.skipped[0]
            .reason
            .contains("longer than the limit of 200 bytes")
    );
    assert!(
        summary.skipped[1]
            .reason
            .contains("larger than the limit of 200 bytes")
    );

    let aborted = load(&store, &capped(OnError::Abort)).unwrap_err();
    assert!(
        aborted.to_string().starts_with(&format!(
            "{}:2: the line is longer than the limit of 200 bytes",
            long_line_file.display()
        )),
        "{aborted}"
    );
}

/// The tree path the loader takes for lines that do not open with their type.
fn prepared_through_the_tree(line: &str) -> Result<PreparedResource, String> {
    let parsed = ParsedResource::parse_bytes(line.as_bytes(), DEFAULT_MAX_JSON_DEPTH)
        .map_err(|error| error.to_string())?;
    let id = parsed.id.clone().ok_or("no id")?;
    Ok(PreparedResource::new(
        parsed.resource_type,
        id,
        parsed.json,
        &LocalBase::relative_only(),
    ))
}

#[test]
fn lines_that_open_with_their_type_are_prepared_in_one_pass_as_the_tree_would() {
    let one_pass_lines = [
        r#"{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"},"valueQuantity":{"value":1.50,"unit":"mg"},"meta":{"tag":[{"code":"b"},{"code":"a"}]}}"#,
        " { \"resourceType\" : \"Patient\" , \"id\":\"p1\",\"name\":[{\"family\":\"\\u00e9\"}]}",
    ];
    for line in one_pass_lines {
        assert!(leading_resource_type(line.as_bytes()).is_some(), "{line}");
        let in_one_pass = prepare_line(
            line.as_bytes(),
            DEFAULT_MAX_JSON_DEPTH,
            &LocalBase::relative_only(),
        )
        .unwrap();
        let through_the_tree = prepared_through_the_tree(line).unwrap();
        assert_eq!(in_one_pass.resource_type, through_the_tree.resource_type);
        assert_eq!(in_one_pass.id, through_the_tree.id);
        assert_eq!(in_one_pass.digest, through_the_tree.digest, "{line}");
        assert_eq!(
            in_one_pass.compartment_patients,
            through_the_tree.compartment_patients
        );
    }
    for line in [
        r#"{"id":"p1","resourceType":"Patient"}"#,
        r#"{"resourceType":"Pat\u0069ent","id":"p1"}"#,
        r#"{"resourceType":"Nope","id":"p1"}"#,
    ] {
        assert_eq!(leading_resource_type(line.as_bytes()), None, "{line}");
    }
    for refused in [
        r#"{"resourceType":"Patient","id":"p1","active":}"#,
        r#"{"resourceType":"Patient","id":"p 1"}"#,
        r#"{"resourceType":"Patient","id":"p1","resourceType":"Observation"}"#,
        r#"{"resourceType":"Patient","id":"p1"} trailing"#,
    ] {
        let in_one_pass = prepare_line(
            refused.as_bytes(),
            DEFAULT_MAX_JSON_DEPTH,
            &LocalBase::relative_only(),
        );
        let through_the_tree = prepared_through_the_tree(refused);
        assert_eq!(
            in_one_pass.map(|resource| resource.digest),
            through_the_tree.map(|resource| resource.digest),
            "{refused}"
        );
    }
}

/// Lines keep their numbers and bytes across chunk boundaries, without `\n` or `\r\n`, and
/// a last line without `\n` is still read.
#[test]
fn ndjson_chunks_hold_every_line_once_without_its_line_ending() {
    let line_count = LINES_PER_CHUNK * 2 + 7;
    let mut text = String::new();
    for number in 1..=line_count {
        let ending = if number % 3 == 0 { "\r\n" } else { "\n" };
        text.push_str(&format!("line {number}{ending}"));
    }
    text.push_str("last line");

    let mut chunks = Vec::new();
    let completed = read_ndjson(text.as_bytes(), 1 << 10, &mut |payload| {
        chunks.push(payload);
        true
    });

    assert!(completed);
    let mut read = Vec::new();
    for payload in &chunks {
        let ChunkPayload::Lines { first_line, lines } = payload else {
            panic!("only lines were expected");
        };
        assert_eq!(*first_line, read.len() as u64 + 1);
        read.extend(
            lines
                .iter()
                .map(|line| String::from_utf8(line.to_vec()).unwrap()),
        );
    }
    let expected: Vec<String> = (1..=line_count)
        .map(|number| format!("line {number}"))
        .chain(["last line".to_owned()])
        .collect();
    assert_eq!(read, expected);
    assert_eq!(chunks.len(), 3);
}
