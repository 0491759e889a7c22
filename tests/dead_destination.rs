//! A destination that stops answering after start-up must never keep a client waiting:
//! kick-offs answer within 5 s, status polls and cancels within 1 s, and a job whose
//! destination died fails within about `--destination-timeout` with an OperationOutcome
//! naming the container; `/healthz` reports the dead destination within seconds. (A
//! closed port at start-up: `tests/export_storage.rs`.)

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::bulk::{BulkClient, KickOffRequest};
use support::{FhirClient, ServerProcess};

const BUCKET: &str = "dead-destination";

/// An S3 endpoint that answers every request with an empty bucket listing while alive,
/// and once dead accepts connections and never answers them.
struct SwitchableS3 {
    port: u16,
    alive: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
}

impl SwitchableS3 {
    fn start() -> SwitchableS3 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake S3 endpoint");
        let port = listener.local_addr().expect("its address").port();
        let alive = Arc::new(AtomicBool::new(true));
        let closing = Arc::new(AtomicBool::new(false));
        let (accept_alive, accept_closing) = (Arc::clone(&alive), Arc::clone(&closing));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_closing.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (alive, closing) = (Arc::clone(&accept_alive), Arc::clone(&accept_closing));
                std::thread::spawn(move || serve_connection(stream, &alive, &closing));
            }
        });
        SwitchableS3 {
            port,
            alive,
            closing,
        }
    }

    fn die(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }

    fn storage_url(&self) -> String {
        format!(
            "s3://{BUCKET}?endpoint=http://127.0.0.1:{}&region=us-east-1&allow_http=true",
            self.port
        )
    }
}

impl Drop for SwitchableS3 {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_connection(stream: TcpStream, alive: &AtomicBool, closing: &AtomicBool) {
    let mut reader = BufReader::new(stream.try_clone().expect("cloning the connection"));
    let mut writer = stream;
    loop {
        let mut content_length = 0usize;
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if !alive.load(Ordering::SeqCst) {
            while !closing.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return;
        }
        let listing = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>{BUCKET}</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter><IsTruncated>false</IsTruncated></ListBucketResult>"
        );
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{listing}",
            listing.len()
        );
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn storage_environment() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "fhirlog-test"),
        ("AWS_SECRET_ACCESS_KEY", "fhirlog-test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect()
}

fn timed<T>(action: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let outcome = action();
    (outcome, started.elapsed())
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
    let died_at = Instant::now();
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
    let (status_url, kick_off_time) = timed(|| bulk.kick_off(&KickOffRequest::get("/$export")));
    assert!(
        kick_off_time < Duration::from_secs(5),
        "the kick-off took {kick_off_time:?}"
    );

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

    let deadline = died_at + destination_timeout + Duration::from_secs(10);
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
            "the job was still running {:?} after its destination died",
            destination_timeout + Duration::from_secs(10)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let failed_after = died_at.elapsed();
    assert!(failure.status.is_server_error(), "{}", failure.text);
    let outcome = failure.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    let diagnostics = outcome.to_string();
    assert!(diagnostics.contains(BUCKET), "{diagnostics}");

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
         {slowest_poll:?}, job failed {failed_after:?} after the destination died, \
         cancel {cancel_time:?}",
        uncached.status
    );
}
