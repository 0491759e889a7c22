//! A destination that stops answering after start-up must never keep a client waiting:
//! kick-offs answer within 5 s, status polls and cancels within 1 s, and a job whose
//! destination died fails within about `--destination-timeout` with an OperationOutcome
//! naming the container; `/healthz` reports the dead destination within seconds. (A
//! closed port at start-up: `tests/export_storage.rs`.)

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::bulk::{BulkClient, KickOffRequest};
use support::fake_s3::{BUCKET, SwitchableS3, storage_environment};
use support::{FhirClient, ServerProcess};

fn timed<T>(action: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let outcome = action();
    (outcome, started.elapsed())
}

/// The storage endpoint is for the log only: clients see the container and the kind of
/// failure.
fn assert_shows_no_endpoint(text: &str) {
    for leaked in ["127.0.0.1", "http://", "s3 at"] {
        assert!(
            !text.contains(leaked),
            "a response shows '{leaked}': {text}"
        );
    }
}

#[test]
fn a_destination_that_dies_keeps_no_client_waiting_and_fails_the_job_within_the_timeout() {
    let destination = SwitchableS3::start();
    let data_dir = tempfile::tempdir().expect("a data directory");
    let store_dir = data_dir.path().join("store");
    let destination_timeout = Duration::from_secs(3);
    let server = ServerProcess::start_with_environment(
        &store_dir,
        &[
            "--storage",
            &destination.storage_url(),
            "--destination-timeout",
            "3s",
        ],
        &storage_environment(),
    );
    let client = FhirClient::with_timeout(&server.base_url, Duration::from_secs(30));
    for index in 0..20 {
        client
            .put_json(
                &format!("/Patient/p{index}"),
                &json!({"resourceType": "Patient", "id": format!("p{index}")}),
            )
            .expect_json(StatusCode::CREATED);
    }
    let server_root = server
        .base_url
        .strip_suffix("/fhir")
        .expect("a base URL ending in /fhir");
    let operator = FhirClient::with_timeout(server_root, Duration::from_secs(30));
    let healthy = operator.get("/healthz");
    assert_eq!(healthy.status, StatusCode::OK, "{}", healthy.text);
    assert_eq!(healthy.json()["status"], "pass", "{}", healthy.text);
    destination.die();
    let (unhealthy, health_time) = timed(|| operator.get("/healthz"));
    assert!(
        health_time < Duration::from_secs(6),
        "the health check took {health_time:?}"
    );
    assert_eq!(
        unhealthy.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        unhealthy.text
    );
    let checks = unhealthy.json()["checks"].clone();
    assert_eq!(checks["store"]["status"], "pass", "{checks}");
    assert_eq!(checks["destination"]["status"], "fail", "{checks}");
    assert!(
        checks["destination"]["output"]
            .as_str()
            .is_some_and(|output| output.contains(BUCKET)),
        "{checks}"
    );

    let bulk = BulkClient::new(&server.base_url);
    let kicked_off_at = Instant::now();
    let (status_url, kick_off_time) = timed(|| bulk.kick_off(&KickOffRequest::get("/$export")));
    assert!(
        kick_off_time < Duration::from_secs(5),
        "the kick-off took {kick_off_time:?}"
    );

    let failure_allowance = destination_timeout + Duration::from_millis(1500);
    let deadline = kicked_off_at + failure_allowance;
    let mut slowest_poll = Duration::ZERO;
    let failure = loop {
        let (poll, poll_time) = timed(|| bulk.status(&status_url));
        slowest_poll = slowest_poll.max(poll_time);
        assert!(
            poll_time < Duration::from_secs(1),
            "a status poll took {poll_time:?}"
        );
        match poll.status {
            StatusCode::ACCEPTED => {}
            _ => break poll,
        }
        assert!(
            Instant::now() < deadline,
            "the job was still running {failure_allowance:?} after its kick-off into a dead destination"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let failed_after = kicked_off_at.elapsed();
    assert!(failure.status.is_server_error(), "{}", failure.text);
    let outcome = failure.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    let diagnostics = outcome.to_string();
    assert!(diagnostics.contains(BUCKET), "{diagnostics}");
    assert_shows_no_endpoint(&diagnostics);
    assert_shows_no_endpoint(&unhealthy.text);

    let (uncached, uncached_time) =
        timed(|| bulk.send_kick_off(&KickOffRequest::get("/$export?_container=another-bucket")));
    assert!(
        uncached_time < Duration::from_secs(5),
        "a kick-off into an unopened container took {uncached_time:?}"
    );
    assert!(
        matches!(
            uncached.status,
            StatusCode::ACCEPTED | StatusCode::SERVICE_UNAVAILABLE
        ),
        "{} {}",
        uncached.status,
        uncached.text
    );
    assert_shows_no_endpoint(&uncached.text);

    let second_status_url = bulk.kick_off(&KickOffRequest::get("/$export"));
    let (cancelled, cancel_time) = timed(|| bulk.cancel(&second_status_url));
    assert!(
        cancel_time < Duration::from_secs(1),
        "a cancel took {cancel_time:?}"
    );
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{}", cancelled.text);
    println!(
        "after the destination died: /healthz {health_time:?}, kick-off {kick_off_time:?}, \
         kick-off into an unopened container {uncached_time:?} ({}), slowest status poll \
         {slowest_poll:?}, job failed {failed_after:?} after its kick-off, \
         cancel {cancel_time:?}",
        uncached.status
    );
}
