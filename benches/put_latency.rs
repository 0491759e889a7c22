//! HTTP PUT latency (`cargo bench --bench put_latency`): serves a fresh store in-process on
//! a free port, then concurrent clients each PUT distinct small Patients over keep-alive
//! HTTP/1.1 connections for a fixed time, and the per-request latencies are summarised.
//! Every PUT creates a new resource, so each is acknowledged only after an fsync; concurrent
//! PUTs share fsyncs through the store's group commit.
//!
//! Settings (environment): `FHIRLOG_PUT_SECONDS` (default 10), `FHIRLOG_PUT_CLIENTS`
//! (default 8). Under `cargo test --benches` it runs for a fraction of a second as a smoke
//! test.

use std::path::Path;
use std::time::{Duration, Instant};

use fhirlog::app::App;
use fhirlog::config::AppSettings;

const DEFAULT_RUN_SECONDS: f64 = 10.0;
const DEFAULT_CLIENT_COUNT: usize = 8;
const TEST_MODE_RUN_SECONDS: f64 = 0.5;

struct PutLatencySettings {
    run_duration: Duration,
    client_count: usize,
}

impl PutLatencySettings {
    fn from_environment_and_arguments() -> PutLatencySettings {
        let arguments: Vec<String> = std::env::args().collect();
        let is_test_mode = !arguments.iter().any(|argument| argument == "--bench")
            || arguments.iter().any(|argument| argument == "--test");
        let run_seconds = if is_test_mode {
            TEST_MODE_RUN_SECONDS
        } else {
            environment_number("FHIRLOG_PUT_SECONDS").unwrap_or(DEFAULT_RUN_SECONDS)
        };
        let client_count = environment_number("FHIRLOG_PUT_CLIENTS")
            .map_or(DEFAULT_CLIENT_COUNT, |count| count.max(1.0) as usize);
        PutLatencySettings {
            run_duration: Duration::from_secs_f64(run_seconds),
            client_count,
        }
    }
}

fn environment_number(name: &str) -> Option<f64> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse::<f64>() {
        Ok(number) if number.is_finite() && number > 0.0 => Some(number),
        _ => panic!("{name}={text:?} is not a positive number"),
    }
}

/// What one client saw: the latency of every acknowledged PUT, and failures.
#[derive(Default)]
struct ClientRecord {
    latencies: Vec<Duration>,
    failures: u64,
    first_failure: Option<String>,
}

fn small_patient_body(client_number: usize, request_number: u64) -> String {
    format!(
        concat!(
            r#"{{"resourceType":"Patient","id":"put-{client}-{request}","active":true,"#,
            r#""name":[{{"family":"Latency{client}","given":["Request{request}"]}}],"#,
            r#""gender":"unknown","birthDate":"1970-01-01"}}"#
        ),
        client = client_number,
        request = request_number
    )
}

async fn run_client(
    client_number: usize,
    base_url: String,
    deadline: Instant,
) -> reqwest::Result<ClientRecord> {
    let http_client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    let mut record = ClientRecord::default();
    let mut request_number = 0u64;
    while Instant::now() < deadline {
        let url = format!("{base_url}/Patient/put-{client_number}-{request_number}");
        let body = small_patient_body(client_number, request_number);
        request_number += 1;
        let started = Instant::now();
        let response = http_client
            .put(&url)
            .header("Content-Type", "application/fhir+json")
            .body(body)
            .send()
            .await;
        let outcome = match response {
            Ok(response) => {
                let status = response.status();
                let response_body = response.bytes().await;
                match response_body {
                    Ok(_) if status == reqwest::StatusCode::CREATED => Ok(()),
                    Ok(body) => Err(format!(
                        "PUT {url} answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    )),
                    Err(error) => Err(format!("PUT {url}: reading the response: {error}")),
                }
            }
            Err(error) => Err(format!("PUT {url}: {error}")),
        };
        let elapsed = started.elapsed();
        match outcome {
            Ok(()) => record.latencies.push(elapsed),
            Err(message) => {
                record.failures += 1;
                record.first_failure.get_or_insert(message);
            }
        }
    }
    Ok(record)
}

/// The latency at `quantile` (0..=1) of sorted latencies, nearest rank.
fn latency_quantile(sorted_latencies: &[Duration], quantile: f64) -> Duration {
    if sorted_latencies.is_empty() {
        return Duration::ZERO;
    }
    let rank = (quantile * sorted_latencies.len() as f64).ceil() as usize;
    sorted_latencies[rank.clamp(1, sorted_latencies.len()) - 1]
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

async fn measure(settings: &PutLatencySettings, data_directory: &Path) -> Result<(), String> {
    let (shutdown_sender, shutdown_receiver) = tokio::sync::oneshot::channel::<()>();
    let app = App::build(AppSettings::local(data_directory))
        .await
        .map_err(|error| format!("building the app: {error}"))?;
    let base_url = app.base_url().as_str().to_owned();
    let server_task = tokio::spawn(app.run_until(async move {
        let _ = shutdown_receiver.await;
    }));

    let started = Instant::now();
    let deadline = started + settings.run_duration;
    let client_tasks: Vec<_> = (0..settings.client_count)
        .map(|client_number| tokio::spawn(run_client(client_number, base_url.clone(), deadline)))
        .collect();
    let mut latencies = Vec::new();
    let mut failures = 0u64;
    let mut first_failure = None;
    for client_task in client_tasks {
        let record = client_task
            .await
            .map_err(|error| format!("a client task failed: {error}"))?
            .map_err(|error| format!("building an HTTP client: {error}"))?;
        latencies.extend(record.latencies);
        failures += record.failures;
        if first_failure.is_none() {
            first_failure = record.first_failure;
        }
    }
    let elapsed = started.elapsed();
    let _ = shutdown_sender.send(());
    server_task
        .await
        .map_err(|error| format!("the server task failed: {error}"))?;

    latencies.sort_unstable();
    let acknowledged = latencies.len();
    println!(
        "put_latency: {} clients, {:.1} s, {} PUTs acknowledged (201), {} failed",
        settings.client_count,
        elapsed.as_secs_f64(),
        acknowledged,
        failures
    );
    println!(
        "put_latency: throughput {:.0} PUT/s",
        acknowledged as f64 / elapsed.as_secs_f64()
    );
    println!(
        "put_latency: latency ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        milliseconds(latency_quantile(&latencies, 0.50)),
        milliseconds(latency_quantile(&latencies, 0.90)),
        milliseconds(latency_quantile(&latencies, 0.99)),
        milliseconds(latencies.last().copied().unwrap_or_default()),
    );
    if let Some(message) = first_failure {
        return Err(format!("{failures} PUTs failed; the first: {message}"));
    }
    if acknowledged == 0 {
        return Err("no PUT was acknowledged".to_owned());
    }
    Ok(())
}

fn main() {
    let settings = PutLatencySettings::from_environment_and_arguments();
    let data_directory = tempfile::tempdir().expect("a temporary data directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(measure(&settings, data_directory.path()));
    drop(runtime);
    if let Err(message) = result {
        eprintln!("put_latency: {message}");
        std::process::exit(1);
    }
}
