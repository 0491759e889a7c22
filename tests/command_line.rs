//! `fhirlog export`, `fhirlog rebuild` and `fhirlog serve` as a user runs them: where the
//! files land, what is refused, and what `--help` offers.

mod support;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use support::run_fhirlog;
use tempfile::TempDir;

fn sample_path(file_name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/sample")
        .join(file_name)
}

/// A store holding the sample's Patients, Organizations and Practitioners.
fn small_store(workspace: &Path) -> PathBuf {
    let data_dir = workspace.join("data");
    let mut arguments: Vec<PathBuf> = ["Patient", "Organization", "Practitioner"]
        .iter()
        .map(|type_name| sample_path(&format!("{type_name}.ndjson.gz")))
        .collect();
    arguments.insert(0, PathBuf::from("load"));
    arguments.push(PathBuf::from("--data-dir"));
    arguments.push(data_dir.clone());
    let arguments: Vec<&OsStr> = arguments.iter().map(|path| path.as_os_str()).collect();
    let loaded = run_fhirlog(&arguments);
    assert!(loaded.status.success(), "{loaded:?}");
    data_dir
}

fn export(data_dir: &Path, out: &Path, extra_arguments: &[&str]) -> Output {
    let mut arguments: Vec<&OsStr> = vec![
        OsStr::new("export"),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
        OsStr::new("--out"),
        out.as_os_str(),
        OsStr::new("--max-resources-per-file"),
        OsStr::new("7"),
    ];
    arguments.extend(extra_arguments.iter().map(OsStr::new));
    run_fhirlog(&arguments)
}

/// The command failed and its stderr is one line, `fhirlog: …`, naming every fragment.
fn assert_refused_in_one_line(output: &Output, fragments: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "stderr is not one line:\n{stderr}");
    assert!(lines[0].starts_with("fhirlog: "), "{stderr}");
    for fragment in fragments {
        assert!(
            lines[0].contains(fragment),
            "'{fragment}' missing: {stderr}"
        );
    }
}

fn names_in(folder: &Path) -> BTreeSet<String> {
    std::fs::read_dir(folder)
        .unwrap_or_else(|error| panic!("listing {}: {error}", folder.display()))
        .map(|entry| {
            entry
                .expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Checks that `out` holds exactly the manifest and its files, each with the count of
/// lines the manifest gives; returns the resources exported per type.
fn assert_out_folder_matches_its_manifest(out: &Path, printed: &[u8]) -> Vec<(String, u64)> {
    let out = out.canonicalize().expect("resolving --out");
    let written: Value = serde_json::from_slice(
        &std::fs::read(out.join("manifest.json")).expect("reading manifest.json"),
    )
    .expect("manifest.json is JSON");
    let printed: Value = serde_json::from_slice(printed).expect("the printed manifest is JSON");
    assert_eq!(
        written, printed,
        "manifest.json differs from the printed manifest"
    );
    let mut expected_names = BTreeSet::from(["manifest.json".to_owned()]);
    let mut counts = Vec::new();
    for item in written["output"].as_array().expect("manifest.output") {
        let url = item["url"].as_str().expect("a file url");
        let path = url
            .strip_prefix("file://")
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{url} is not a file:// URL"));
        assert_eq!(
            path.parent(),
            Some(out.as_path()),
            "{url} is not straight in --out"
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{url}: {error}"));
        let count = item["count"].as_u64().expect("a count");
        assert_eq!(text.lines().count() as u64, count, "{url}");
        for line in text.lines() {
            serde_json::from_str::<Value>(line).unwrap_or_else(|error| panic!("{url}: {error}"));
        }
        expected_names.insert(
            path.file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned(),
        );
        counts.push((item["type"].as_str().unwrap_or_default().to_owned(), count));
    }
    assert_eq!(names_in(&out), expected_names, "what --out holds");
    counts
}

fn total_of(counts: &[(String, u64)], type_name: &str) -> u64 {
    counts
        .iter()
        .filter(|(name, _)| name == type_name)
        .map(|(_, count)| count)
        .sum()
}

#[test]
fn export_writes_its_files_and_manifest_straight_into_out_and_refuses_to_mix_exports() {
    let workspace = TempDir::new().expect("creating a workspace");
    let data_dir = small_store(workspace.path());
    let out = workspace.path().join("out");

    let first = export(&data_dir, &out, &[]);
    assert!(first.status.success(), "{first:?}");
    let counts = assert_out_folder_matches_its_manifest(&out, &first.stdout);
    assert!(total_of(&counts, "Patient") > 7, "{counts:?}");
    assert!(total_of(&counts, "Organization") > 0, "{counts:?}");

    let again = export(&data_dir, &out, &["--type", "Patient"]);
    assert_refused_in_one_line(&again, &["already holds export files", "--force"]);
    assert_out_folder_matches_its_manifest(&out, &first.stdout);

    let forced = export(&data_dir, &out, &["--type", "Patient", "--force"]);
    assert!(forced.status.success(), "{forced:?}");
    let patients_only = assert_out_folder_matches_its_manifest(&out, &forced.stdout);
    assert_eq!(
        total_of(&patients_only, "Patient"),
        total_of(&counts, "Patient")
    );
    assert!(
        patients_only
            .iter()
            .all(|(type_name, _)| type_name == "Patient")
    );
}

#[test]
fn export_and_rebuild_refuse_a_data_dir_that_holds_no_store_and_create_nothing() {
    let workspace = TempDir::new().expect("creating a workspace");
    let typo = workspace.path().join("no-such-data");
    let out = workspace.path().join("out");
    let exported = export(&typo, &out, &[]);
    assert_refused_in_one_line(
        &exported,
        &[&typo.display().to_string(), "no fhirlog store"],
    );
    let rebuilt = run_fhirlog(&[
        OsStr::new("rebuild"),
        OsStr::new("--data-dir"),
        typo.as_os_str(),
    ]);
    assert_refused_in_one_line(&rebuilt, &[&typo.display().to_string(), "no fhirlog store"]);
    assert!(!typo.exists(), "a store was created at {}", typo.display());
}

#[test]
fn export_help_lists_only_what_a_one_shot_export_uses() {
    let help = run_fhirlog(&[OsStr::new("export"), OsStr::new("--help")]);
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    for offered in [
        "--out",
        "--force",
        "--workers",
        "--max-resources-per-file",
        "--type",
    ] {
        assert!(text.contains(offered), "{offered} missing:\n{text}");
    }
    for server_only in ["--max-jobs", "--retention", "--job-timeout", "--storage"] {
        assert!(
            !text.contains(server_only),
            "{server_only} offered:\n{text}"
        );
    }
}

#[test]
fn serve_refuses_zero_and_absurd_durations_in_one_line_each() {
    let workspace = TempDir::new().expect("creating a workspace");
    let data_dir = workspace.path().join("data");
    for (flag, value, fragment) in [
        (
            "--retention",
            "100000000d",
            "--retention 100000000d is longer than",
        ),
        ("--retention", "0s", "--retention must be longer than zero"),
        (
            "--job-timeout",
            "0s",
            "--job-timeout must be longer than zero",
        ),
        (
            "--destination-timeout",
            "0",
            "--destination-timeout must be longer than zero",
        ),
        ("--signed-urls", "8d", "--signed-urls 8d is longer than"),
    ] {
        let served = run_fhirlog(&[
            OsStr::new("serve"),
            OsStr::new("--data-dir"),
            data_dir.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new(flag),
            OsStr::new(value),
        ]);
        assert_refused_in_one_line(&served, &[fragment]);
    }
}
