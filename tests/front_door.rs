//! The front door over real sockets: TLS 1.2 and 1.3 with https URLs, plain HTTP refused
//! on the TLS port, slow clients cut off, the connection cap, request-head and query
//! limits, the whole-body deadline, no internal detail in errors, and random requests
//! that must each get a status while the server keeps answering.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fhirlog::config::{AppSettings, TlsFiles};
use proptest::prelude::*;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use support::{TestApp, spawn_app_with_settings};
use tempfile::TempDir;

const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A server on a fresh store with `change` applied to the default settings.
fn serve(change: impl FnOnce(&mut AppSettings)) -> TestApp {
    let data_dir = TempDir::new().expect("creating a data directory");
    let mut settings = AppSettings::local(data_dir.path());
    change(&mut settings);
    spawn_app_with_settings(data_dir, settings)
}

fn address_of(app: &TestApp) -> SocketAddr {
    let authority = app
        .base_url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("a base URL with an authority");
    authority.parse().expect("a socket address")
}

fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).expect("connecting to the server");
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("setting a read timeout");
    stream
}

/// One response as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "not JSON ({error}): {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts an error OperationOutcome with `status` whose diagnostics mention `fragment`.
    fn expect_outcome(&self, status: u16, fragment: &str) {
        assert_eq!(
            self.status,
            status,
            "{}\n{}",
            self.head,
            String::from_utf8_lossy(&self.body)
        );
        let outcome = self.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        let diagnostics = outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default();
        assert!(diagnostics.contains(fragment), "{outcome}");
    }
}

/// Reads one response (Content-Length or chunked body; none for HEAD); `None` when the
/// server closed the connection before a whole head arrived.
fn read_answer(stream: &mut impl Read, method: &str) -> Option<Answer> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        match stream.read(&mut buffer) {
            Ok(0) => return None,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == ErrorKind::ConnectionReset => return None,
            Err(error) => panic!("reading a response head: {error}"),
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {head}"));
    let mut answer = Answer {
        status,
        head,
        body: received[head_end..].to_vec(),
    };
    if method == "HEAD" || status == 204 || status == 304 {
        return Some(answer);
    }
    let mut fill = |body: &mut Vec<u8>, until: &dyn Fn(&[u8]) -> bool| {
        while !until(body) {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => body.extend_from_slice(&buffer[..read]),
                Err(error) => panic!("reading a response body: {error}"),
            }
        }
    };
    if let Some(length) = answer.header("content-length") {
        let length: usize = length.parse().expect("a numeric Content-Length");
        fill(&mut answer.body, &|body| body.len() >= length);
    } else if answer
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"))
    {
        fill(&mut answer.body, &|body| body.ends_with(b"0\r\n\r\n"));
        answer.body = dechunk(&answer.body);
    } else {
        fill(&mut answer.body, &|_| false);
    }
    Some(answer)
}

fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = chunked.windows(2).position(|window| window == b"\r\n") {
        let size_text = String::from_utf8_lossy(&chunked[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        body.extend_from_slice(&chunked[start..start + size]);
        chunked = &chunked[start + size + 2..];
    }
    body
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
}

fn kick_off(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/fhir+json\r\nPrefer: respond-async\r\n\r\n"
    )
}

fn exchange(stream: &mut (impl Read + Write), request: &str) -> Answer {
    stream
        .write_all(request.as_bytes())
        .expect("sending a request");
    let method = request.split(' ').next().unwrap_or_default();
    read_answer(stream, method).expect("a response before the connection closed")
}

/// Whether the server closed `stream` (or sent nothing) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream
        .set_read_timeout(Some(within))
        .expect("setting a read timeout");
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A self-signed certificate for `localhost` written as PEM files into `folder`.
fn self_signed_certificate(folder: &TempDir) -> (TlsFiles, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("generating a certificate");
    let files = TlsFiles {
        certificate_chain: folder.path().join("cert.pem"),
        private_key: folder.path().join("key.pem"),
    };
    std::fs::write(&files.certificate_chain, certified.cert.pem()).expect("writing cert.pem");
    std::fs::write(&files.private_key, certified.signing_key.serialize_pem())
        .expect("writing key.pem");
    (files, certified.cert.der().clone())
}

fn tls_app(certificates: &TempDir, header_timeout: Duration) -> (TestApp, CertificateDer<'static>) {
    let (files, certificate) = self_signed_certificate(certificates);
    let app = serve(|settings| {
        settings.front_door.tls = Some(files);
        settings.front_door.header_timeout = header_timeout;
    });
    (app, certificate)
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect_tls(
    address: SocketAddr,
    certificate: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> TlsStream {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certificate.clone())
        .expect("trusting the test certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("a supported protocol version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = ServerName::try_from("localhost").expect("a server name");
    let connection =
        rustls::ClientConnection::new(Arc::new(config), server_name).expect("a TLS client");
    let mut stream = rustls::StreamOwned::new(connection, connect(address));
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("completing the TLS handshake");
    }
    stream
}

#[test]
fn tls_1_2_and_1_3_handshakes_succeed_and_every_url_handed_out_is_https() {
    let certificates = TempDir::new().expect("a folder for certificates");
    let (app, certificate) = tls_app(&certificates, Duration::from_secs(30));
    assert!(app.base_url.starts_with("https://"), "{}", app.base_url);
    let address = address_of(&app);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut stream = connect_tls(address, &certificate, version);
        assert_eq!(stream.conn.protocol_version(), Some(version.version));
        let metadata = exchange(&mut stream, &get("/fhir/metadata"));
        assert_eq!(metadata.status, 200, "{}", metadata.head);
        assert_eq!(
            metadata.json()["implementation"]["url"],
            app.base_url.as_str()
        );
    }

    let mut stream = connect_tls(address, &certificate, &rustls::version::TLS13);
    let patient = r#"{"resourceType":"Patient","id":"p1"}"#;
    let created = exchange(
        &mut stream,
        &format!(
            "PUT /fhir/Patient/p1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{patient}",
            patient.len()
        ),
    );
    assert_eq!(created.status, 201, "{}", created.head);
    let accepted = exchange(&mut stream, &kick_off("/fhir/$export"));
    assert_eq!(accepted.status, 202, "{}", accepted.head);
    let status_url = accepted
        .header("content-location")
        .expect("a Content-Location")
        .to_owned();
    assert!(status_url.starts_with("https://"), "{status_url}");
    let status_path = &status_url[status_url.find("/fhir/").expect("a FHIR path")..];
    let deadline = Instant::now() + Duration::from_secs(60);
    let manifest = loop {
        let status = exchange(&mut stream, &get(status_path));
        if status.status == 200 {
            break status.json();
        }
        assert_eq!(status.status, 202, "{}", status.head);
        assert!(Instant::now() < deadline, "the export did not complete");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        manifest["request"]
            .as_str()
            .is_some_and(|url| url.starts_with("https://")),
        "{manifest}"
    );
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no output file: {manifest}"));
    assert!(file_url.starts_with("https://"), "{manifest}");
    let file_path = &file_url[file_url.find("/fhir/").expect("a FHIR path")..];
    let file = exchange(&mut stream, &get(file_path));
    assert_eq!(file.status, 200, "{}", file.head);
    assert!(String::from_utf8_lossy(&file.body).contains("\"p1\""));
}

#[test]
fn plain_http_on_the_tls_port_gets_no_http_answer_and_is_closed() {
    let certificates = TempDir::new().expect("a folder for certificates");
    let (app, certificate) = tls_app(&certificates, Duration::from_secs(30));
    let address = address_of(&app);
    let mut plain = connect(address);
    plain
        .write_all(get("/fhir/metadata").as_bytes())
        .expect("sending plain HTTP");
    let mut received = Vec::new();
    let _ = plain.read_to_end(&mut received);
    assert!(
        !received.starts_with(b"HTTP/"),
        "plain HTTP was answered: {}",
        String::from_utf8_lossy(&received)
    );
    let mut stream = connect_tls(address, &certificate, &rustls::version::TLS13);
    assert_eq!(exchange(&mut stream, &get("/fhir/metadata")).status, 200);
}

#[test]
fn clients_trickling_a_head_or_a_handshake_are_cut_off_at_the_header_timeout() {
    let header_timeout = Duration::from_secs(2);
    let app = serve(|settings| settings.front_door.header_timeout = header_timeout);
    let address = address_of(&app);
    let mut trickling = connect(address);
    let started = Instant::now();
    trickling
        .write_all(b"GET /fhir/metadata HTTP/1.1\r\n")
        .expect("sending a request line");
    let cut_off = loop {
        let sent = trickling.write_all(b"X");
        if sent.is_err() || closed_within(&mut trickling, Duration::from_millis(250)) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < header_timeout * 4,
            "a client trickling header bytes was still connected after {:?}",
            started.elapsed()
        );
    };
    assert!(
        cut_off >= header_timeout - Duration::from_millis(200),
        "{cut_off:?}"
    );
    let mut normal = connect(address);
    assert_eq!(exchange(&mut normal, &get("/fhir/metadata")).status, 200);

    let mut idle_keep_alive = connect(address);
    assert_eq!(
        exchange(&mut idle_keep_alive, &get("/fhir/metadata")).status,
        200
    );
    assert!(
        closed_within(&mut idle_keep_alive, header_timeout * 3),
        "an idle keep-alive connection was kept past the header timeout"
    );

    let certificates = TempDir::new().expect("a folder for certificates");
    let (tls, _) = tls_app(&certificates, header_timeout);
    let mut silent = connect(address_of(&tls));
    let started = Instant::now();
    assert!(
        closed_within(&mut silent, header_timeout * 3),
        "a client that never finished its TLS handshake was kept"
    );
    assert!(started.elapsed() >= header_timeout - Duration::from_millis(200));
}

#[test]
fn connections_over_the_cap_wait_while_the_admitted_ones_are_served() {
    let app = serve(|settings| {
        settings.front_door.max_connections = 2;
        settings.front_door.header_timeout = Duration::from_secs(30);
    });
    let address = address_of(&app);
    let mut served = connect(address);
    assert_eq!(exchange(&mut served, &get("/fhir/metadata")).status, 200);
    let holding = connect(address);
    std::thread::sleep(Duration::from_millis(300));

    let mut waiting = connect(address);
    waiting
        .write_all(get("/fhir/metadata").as_bytes())
        .expect("sending a request over the cap");
    waiting
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("setting a read timeout");
    let mut first_byte = [0u8; 1];
    let early = waiting.read(&mut first_byte);
    assert!(
        matches!(&early, Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "a third connection was served with a cap of 2: {early:?}"
    );
    for _ in 0..3 {
        assert_eq!(exchange(&mut served, &get("/fhir/metadata")).status, 200);
    }

    drop(holding);
    waiting
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("setting a read timeout");
    let started = Instant::now();
    let answer = read_answer(&mut waiting, "GET").expect("an answer once a slot is free");
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_client_that_stops_reading_a_response_loses_its_slot_at_the_header_timeout() {
    let header_timeout = Duration::from_secs(2);
    let app = serve(|settings| {
        settings.front_door.max_connections = 1;
        settings.front_door.header_timeout = header_timeout;
    });
    let address = address_of(&app);
    let patient = format!(
        r#"{{"resourceType":"Patient","id":"big","name":[{{"text":"{}"}}]}}"#,
        "n".repeat(4 * 1024 * 1024)
    );
    let mut writer = connect(address);
    let created = exchange(
        &mut writer,
        &format!(
            "PUT /fhir/Patient/big HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{patient}",
            patient.len()
        ),
    );
    assert_eq!(created.status, 201, "{}", created.head);
    drop(writer);

    let mut not_reading = connect(address);
    not_reading
        .write_all(get("/fhir/Patient/big").as_bytes())
        .expect("asking for the big resource");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut other = connect(address);
    let answer = exchange(&mut other, &get("/fhir/metadata"));
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert!(
        started.elapsed() < header_timeout * 4,
        "the only slot was held by a client that stopped reading for {:?}",
        started.elapsed()
    );
    let mut received = Vec::new();
    let _ = not_reading.read_to_end(&mut received);
    assert!(
        received.len() < patient.len(),
        "the stalled response was delivered whole"
    );
}

#[test]
fn oversized_queries_targets_and_heads_get_operation_outcomes() {
    let app = serve(|_| {});
    let address = address_of(&app);
    let ask = |request: String| exchange(&mut connect(address), &request);

    let parameters: Vec<String> = (0..101).map(|index| format!("p{index}=1")).collect();
    ask(kick_off(&format!("/fhir/$export?{}", parameters.join("&"))))
        .expect_outcome(400, "101 parameters");
    let long_filter = "a".repeat(8 * 1024);
    ask(kick_off(&format!(
        "/fhir/$export?_typeFilter={long_filter}"
    )))
    .expect_outcome(400, "the limit is 8192");
    let hundred_parameters: Vec<String> = (0..100).map(|index| format!("p{index}=1")).collect();
    assert_ne!(
        ask(get(&format!(
            "/fhir/metadata?{}",
            hundred_parameters.join("&")
        )))
        .status,
        400
    );
    ask(get(&format!("/fhir/Patient/{}", "a".repeat(17 * 1024))))
        .expect_outcome(414, "the limit is 16384");
    let many_headers: String = (0..101)
        .map(|index| format!("X-Header-{index}: 1\r\n"))
        .collect();
    ask(format!(
        "GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n{many_headers}\r\n"
    ))
    .expect_outcome(431, "header fields");
    ask(format!(
        "GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70 * 1024)
    ))
    .expect_outcome(431, "bytes");
    let far_past = ask(get(&format!("/fhir/Patient/{}", "a".repeat(100 * 1024))));
    assert!(matches!(far_past.status, 414 | 431), "{}", far_past.head);
    assert_eq!(ask(get("/fhir/metadata")).status, 200);
}

#[test]
fn a_body_that_does_not_arrive_whole_within_the_body_timeout_gets_408() {
    let app = serve(|settings| settings.limits.body_timeout.0 = Duration::from_secs(2));
    let mut stream = connect(address_of(&app));
    let started = Instant::now();
    stream
        .write_all(
            b"PUT /fhir/Patient/slow HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{",
        )
        .expect("sending the head");
    let trickler = {
        let mut writer = stream.try_clone().expect("a second handle");
        std::thread::spawn(move || {
            for _ in 0..60 {
                std::thread::sleep(Duration::from_millis(250));
                if writer.write_all(b" ").is_err() {
                    return;
                }
            }
        })
    };
    let answer = read_answer(&mut stream, "PUT").expect("an answer");
    let answered_after = started.elapsed();
    answer.expect_outcome(408, "did not arrive within 2s");
    assert!(
        answered_after < Duration::from_secs(6),
        "answered only after {answered_after:?}"
    );
    drop(stream);
    trickler.join().expect("the trickling thread");
}

#[test]
fn a_missing_container_is_refused_without_naming_the_export_folder() {
    let app = serve(|settings| settings.storage.create_containers = false);
    let folder = app.data_dir().display().to_string();
    let refused = exchange(
        &mut connect(address_of(&app)),
        &kick_off("/fhir/$export?_container=not-there"),
    );
    refused.expect_outcome(400, "container 'not-there' does not exist");
    let text = String::from_utf8_lossy(&refused.body);
    assert!(!text.contains(&folder), "{text}");
    assert!(!text.contains("file://"), "{text}");
}

/// Panics on the server's runtime threads (the test threads are named after their tests).
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_server_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread
                .name()
                .is_some_and(|name| name.starts_with("tokio-runtime"))
            {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn random_server() -> &'static (TestApp, SocketAddr) {
    static SERVER: std::sync::OnceLock<(TestApp, SocketAddr)> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        count_server_panics();
        let app = serve(|settings| {
            settings.limits.max_body_bytes = 4096;
            settings.limits.body_timeout.0 = Duration::from_secs(5);
        });
        let address = address_of(&app);
        (app, address)
    })
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("PUT".to_owned()),
        Just("DELETE".to_owned()),
        Just("HEAD".to_owned()),
        Just("PATCH".to_owned()),
        Just("OPTIONS".to_owned()),
        "[A-Z]{1,12}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("fhir".to_owned()),
        Just("Patient".to_owned()),
        Just("Observation".to_owned()),
        Just("$export".to_owned()),
        Just("$export-status".to_owned()),
        Just("$export-file".to_owned()),
        Just("_history".to_owned()),
        Just("metadata".to_owned()),
        Just("..".to_owned()),
        "[0-9a-f]{32}",
        "[A-Za-z0-9._~%-]{0,40}",
    ];
    prop::collection::vec(segment, 0..6).prop_map(|segments| format!("/{}", segments.join("/")))
}

fn query() -> impl Strategy<Value = String> {
    let parameter = prop_oneof![
        Just("_type=Patient".to_owned()),
        Just("_since=2020-01-01T00:00:00Z".to_owned()),
        Just("_outputFormat=ndjson".to_owned()),
        "_typeFilter=[A-Za-z%=?&0-9]{0,60}",
        "[a-z_]{1,10}=[A-Za-z0-9%+.-]{0,30}",
    ];
    prop::collection::vec(parameter, 0..120).prop_map(|parameters| parameters.join("&"))
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let header = prop_oneof![
        Just(("Accept".to_owned(), "application/fhir+json".to_owned())),
        Just(("Prefer".to_owned(), "respond-async".to_owned())),
        Just((
            "Content-Type".to_owned(),
            "application/fhir+json".to_owned()
        )),
        Just(("If-Match".to_owned(), "W/\"1\"".to_owned())),
        Just(("Range".to_owned(), "bytes=0-10".to_owned())),
        ("X-[A-Za-z-]{1,20}", "[ -~]{0,80}")
            .prop_map(|(name, value)| (name, value.trim().to_owned())),
    ];
    prop::collection::vec(header, 0..12)
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(br#"{"resourceType":"Patient","id":"p1"}"#.to_vec()),
        Just(br#"{"resourceType":"Bundle","type":"batch","entry":[]}"#.to_vec()),
        prop::collection::vec(any::<u8>(), 0..6000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_random_request_gets_a_status_and_the_server_keeps_answering(
        method in method(),
        path in path(),
        query in query(),
        headers in headers(),
        body in body(),
    ) {
        let (_, address) = random_server();
        let target = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
        let mut request = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\n").into_bytes();
        for (name, value) in &headers {
            request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(&body);
        let mut stream = connect(*address);
        let _ = stream.write_all(&request);
        let answer = read_answer(&mut stream, &method);
        let answer = answer.unwrap_or_else(|| panic!("no status for {method} {target}"));
        prop_assert!((100..600).contains(&answer.status), "{}", answer.head);
        if answer.status >= 400 && method != "HEAD" && !answer.body.is_empty() {
            prop_assert_eq!(&answer.json()["resourceType"], "OperationOutcome");
        }
        let metadata = exchange(&mut connect(*address), &get("/fhir/metadata"));
        prop_assert_eq!(metadata.status, 200);
        prop_assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
    }
}

/// Latencies of `samples` sequential `GET /fhir/metadata` on one keep-alive connection.
fn metadata_latencies(address: SocketAddr, samples: usize) -> Vec<Duration> {
    let mut stream = connect(address);
    let mut latencies: Vec<Duration> = (0..samples)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(exchange(&mut stream, &get("/fhir/metadata")).status, 200);
            let latency = started.elapsed();
            std::thread::sleep(Duration::from_millis(10));
            latency
        })
        .collect();
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index]
}

/// Measurement, not a check: `FHIRLOG_SLOW_CLIENTS` (500) connections trickle one header
/// byte per second into `fhirlog serve` while a normal client polls `/fhir/metadata`;
/// prints its median and p99 latency with and without them.
#[test]
#[ignore = "measurement: cargo test --test front_door -- --ignored --nocapture slow_clients"]
fn slow_clients_and_a_normal_clients_latency() {
    let slow_clients: usize = std::env::var("FHIRLOG_SLOW_CLIENTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(500);
    let samples = 300;
    let workspace = TempDir::new().expect("a workspace");
    let server = support::ServerProcess::start(&workspace.path().join("data"));
    let address: SocketAddr = server
        .base_url
        .trim_start_matches("http://")
        .trim_end_matches("/fhir")
        .parse()
        .expect("a socket address");
    metadata_latencies(address, 20);
    let baseline = metadata_latencies(address, samples);

    let mut trickling: Vec<TcpStream> = (0..slow_clients)
        .map(|_| {
            let mut stream = connect(address);
            stream
                .write_all(b"GET /fhir/metadata HTTP/1.1\r\nX-Slow: ")
                .expect("starting a slow request");
            stream
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let still_connected = Arc::new(AtomicUsize::new(slow_clients));
    let trickler = {
        let stop = Arc::clone(&stop);
        let still_connected = Arc::clone(&still_connected);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let alive = trickling
                    .iter_mut()
                    .map(|stream| stream.write_all(b"x").is_ok())
                    .filter(|written| *written)
                    .count();
                still_connected.store(alive, Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let measured_at = Instant::now();
    let loaded = metadata_latencies(address, samples);
    let measured_for = measured_at.elapsed();
    let connected_at_end = still_connected.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    trickler.join().expect("the trickling thread");
    println!(
        "metadata latency over {samples} requests: without slow clients median {:?} p99 {:?}; \
         with {slow_clients} slow clients ({connected_at_end} still trickling after {measured_for:?}) \
         median {:?} p99 {:?}",
        percentile(&baseline, 0.5),
        percentile(&baseline, 0.99),
        percentile(&loaded, 0.5),
        percentile(&loaded, 0.99),
    );
}

#[test]
fn serve_refuses_unreadable_or_unusable_tls_files_naming_the_flag() {
    let workspace = TempDir::new().expect("a workspace");
    let (files, _) = self_signed_certificate(&workspace);
    let other_folder = TempDir::new().expect("a folder for another certificate");
    let (other_files, _) = self_signed_certificate(&other_folder);
    let missing = workspace.path().join("missing.pem");
    let data_dir = workspace.path().join("data");
    for (certificate, key, fragment) in [
        (&missing, &files.private_key, "reading --tls-cert"),
        (&files.certificate_chain, &missing, "reading --tls-key"),
        (
            &files.private_key,
            &files.private_key,
            "holds no PEM certificate",
        ),
        (
            &files.certificate_chain,
            &files.certificate_chain,
            "reading --tls-key",
        ),
        (
            &files.certificate_chain,
            &other_files.private_key,
            "--tls-key does not fit",
        ),
    ] {
        let served = support::run_fhirlog(&[
            "serve".as_ref(),
            "--data-dir".as_ref(),
            data_dir.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--tls-cert".as_ref(),
            certificate.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ]);
        let stderr = String::from_utf8_lossy(&served.stderr);
        assert!(!served.status.success(), "{stderr}");
        let last_line = stderr.lines().last().unwrap_or_default();
        assert!(
            last_line.starts_with("fhirlog: ") && last_line.contains(fragment),
            "'{fragment}' missing: {stderr}"
        );
    }
}
