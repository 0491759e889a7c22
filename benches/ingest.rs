//! Ingest benchmarks on the embedded store (`cargo bench --bench ingest`):
//!
//! - `ingest/append_batch_of_1000_observations`: one commit (one fsync) of 1,000 new
//!   Observations, prepared from real lines of `data/sample/Observation.ndjson.gz`, into a
//!   store that grows over the run. Preparing (parsing, canonicalising) is not timed.
//! - `ingest/load_sample_directory`: `fhirlog::load::load` of all of `data/sample`
//!   (45,200 resources) into a fresh store per iteration, parsing included.
//! - `ingest/single_put_commit`: one Patient per commit, i.e. the latency of one fsynced
//!   commit with nothing to share it with.
//!
//! Throughput is reported in resources (criterion "elements"). Under `cargo test --benches`
//! (criterion's test mode, an unoptimised build) each routine runs once, and the load
//! benchmark reads only a few small files so the test stays quick.

use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use fhirlog::fhir::canonical::{DEFAULT_MAX_JSON_DEPTH, ParsedResource};
use fhirlog::fhir::{LocalBase, ResourceId};
use fhirlog::load::{LoadOptions, OnError, load};
use fhirlog::store::{
    PreparedResource, Store, StoreOptions, UnchangedContent, WriteOperation, WriteOutcome,
};

const RESOURCES_PER_APPEND_BATCH: usize = 1_000;
const SAMPLE_DIRECTORY_RESOURCE_COUNT: u64 = 45_200;
/// What the load benchmark reads in criterion's test mode: small files only.
const TEST_MODE_LOAD_FILES: [&str; 3] = [
    "Patient.ndjson.gz",
    "Organization.ndjson.gz",
    "Practitioner.ndjson.gz",
];

/// Ids handed out to benchmark resources, unique across the whole run so every append
/// creates a new resource instead of updating one.
static NEXT_BENCHMARK_ID_NUMBER: AtomicU64 = AtomicU64::new(0);

fn sample_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample")
}

/// True under `cargo test --benches` or `cargo bench -- --test`, as criterion decides it.
fn is_criterion_test_mode() -> bool {
    let arguments: Vec<String> = std::env::args().collect();
    let has_bench_flag = arguments.iter().any(|argument| argument == "--bench");
    let has_test_flag = arguments.iter().any(|argument| argument == "--test");
    !has_bench_flag || has_test_flag
}

/// A parsed sample resource kept as a template: each use gets a fresh id.
struct ResourceTemplate {
    parsed: ParsedResource,
}

impl ResourceTemplate {
    fn prepare_with_fresh_id(&self) -> PreparedResource {
        let id_number = NEXT_BENCHMARK_ID_NUMBER.fetch_add(1, Ordering::Relaxed);
        let id = ResourceId::parse(&format!("bench-{id_number}"))
            .expect("bench-N is a valid resource id");
        PreparedResource::new(
            self.parsed.resource_type,
            id,
            self.parsed.json.clone(),
            &LocalBase::relative_only(),
        )
    }
}

/// The first `line_limit` resources of a gzipped ndjson file of the sample data.
fn read_sample_templates(file_name: &str, line_limit: usize) -> Vec<ResourceTemplate> {
    let path = sample_directory().join(file_name);
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|error| panic!("cannot open {}: {error}", path.display()));
    BufReader::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
        .lines()
        .map(|line| line.unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display())))
        .filter(|line| !line.trim().is_empty())
        .take(line_limit)
        .map(|line| ResourceTemplate {
            parsed: ParsedResource::parse_bytes(line.as_bytes(), DEFAULT_MAX_JSON_DEPTH)
                .unwrap_or_else(|error| panic!("bad line in {}: {error}", path.display())),
        })
        .collect()
}

fn update_operation(resource: PreparedResource) -> WriteOperation {
    WriteOperation::Update {
        resource,
        expected_version: None,
        unchanged: UnchangedContent::Skip,
    }
}

fn assert_all_created(outcomes: &[WriteOutcome], expected_count: usize) {
    assert_eq!(outcomes.len(), expected_count);
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, WriteOutcome::Created { .. })),
        "every benchmark write creates a new resource"
    );
}

fn open_fresh_store() -> (tempfile::TempDir, Store) {
    let data_directory = tempfile::tempdir().expect("a temporary data directory");
    let store =
        Store::open(data_directory.path(), &StoreOptions::default()).expect("a fresh store opens");
    (data_directory, store)
}

fn append_batch_of_1000_observations(criterion: &mut Criterion) {
    let observation_templates =
        read_sample_templates("Observation.ndjson.gz", RESOURCES_PER_APPEND_BATCH);
    assert_eq!(observation_templates.len(), RESOURCES_PER_APPEND_BATCH);
    let (_data_directory, store) = open_fresh_store();
    let mut group = criterion.benchmark_group("ingest");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(RESOURCES_PER_APPEND_BATCH as u64));
    group.bench_function("append_batch_of_1000_observations", |bencher| {
        bencher.iter_batched(
            || {
                observation_templates
                    .iter()
                    .map(|template| update_operation(template.prepare_with_fresh_id()))
                    .collect::<Vec<_>>()
            },
            |operations| {
                let outcomes = store.commit(operations).expect("the batch commits");
                assert_all_created(&outcomes, RESOURCES_PER_APPEND_BATCH);
                outcomes
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn load_sample_directory(criterion: &mut Criterion) {
    let (paths, expected_resource_count) = if is_criterion_test_mode() {
        let paths: Vec<PathBuf> = TEST_MODE_LOAD_FILES
            .iter()
            .map(|file_name| sample_directory().join(file_name))
            .collect();
        (paths, None)
    } else {
        (
            vec![sample_directory()],
            Some(SAMPLE_DIRECTORY_RESOURCE_COUNT),
        )
    };
    let load_options = LoadOptions {
        paths,
        on_error: OnError::Abort,
        max_json_depth: DEFAULT_MAX_JSON_DEPTH,
        show_progress: false,
        max_document_bytes: fhirlog::load::DEFAULT_MAX_DOCUMENT_BYTES,
        local_base: LocalBase::relative_only(),
    };
    let mut group = criterion.benchmark_group("ingest");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(15))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(SAMPLE_DIRECTORY_RESOURCE_COUNT));
    group.bench_function("load_sample_directory", |bencher| {
        bencher.iter_batched(
            open_fresh_store,
            |(data_directory, store)| {
                let summary = load(&store, &load_options).expect("the sample data loads");
                assert!(summary.skipped.is_empty(), "{:?}", summary.skipped);
                if let Some(expected_resource_count) = expected_resource_count {
                    assert_eq!(summary.written(), expected_resource_count);
                }
                // Returned so that closing the store and deleting the directory is not timed.
                (data_directory, store, summary)
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn single_put_commit(criterion: &mut Criterion) {
    let patient_templates = read_sample_templates("Patient.ndjson.gz", 1);
    let patient_template = &patient_templates[0];
    let (_data_directory, store) = open_fresh_store();
    let mut group = criterion.benchmark_group("ingest");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    group.bench_function("single_put_commit", |bencher| {
        bencher.iter_batched(
            || vec![update_operation(patient_template.prepare_with_fresh_id())],
            |operations| {
                let outcomes = store
                    .commit(black_box(operations))
                    .expect("the put commits");
                assert_all_created(&outcomes, 1);
                outcomes
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(
    ingest_benchmarks,
    append_batch_of_1000_observations,
    load_sample_directory,
    single_put_commit
);
criterion_main!(ingest_benchmarks);
