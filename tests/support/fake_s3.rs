//! A fake S3 endpoint for tests whose destination must be slow or go silent. It keeps no
//! objects: listings are empty, HEAD finds nothing, and uploads, copies and deletes
//! succeed. It can answer every request after a delay, and once dead it accepts
//! connections and never answers them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The bucket the fake serves.
pub const BUCKET: &str = "dead-destination";

const S3_NAMESPACE: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

/// A fake S3 endpoint that answers at once, after a delay, or never.
pub struct SwitchableS3 {
    port: u16,
    behaviour: Arc<Behaviour>,
}

struct Behaviour {
    alive: AtomicBool,
    closing: AtomicBool,
    answer_delay_millis: AtomicU64,
}

impl SwitchableS3 {
    /// Starts a live endpoint, answering at once, on a free local port.
    pub fn start() -> SwitchableS3 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake S3 endpoint");
        let port = listener.local_addr().expect("its address").port();
        let behaviour = Arc::new(Behaviour {
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            answer_delay_millis: AtomicU64::new(0),
        });
        let accepting = Arc::clone(&behaviour);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accepting.closing.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let behaviour = Arc::clone(&accepting);
                std::thread::spawn(move || serve_connection(stream, &behaviour));
            }
        });
        SwitchableS3 { port, behaviour }
    }

    /// From now on, accepts requests and never answers them.
    pub fn die(&self) {
        self.behaviour.alive.store(false, Ordering::SeqCst);
    }

    /// From now on, answers each request only after `delay`.
    pub fn answer_after(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).expect("a delay in milliseconds");
        self.behaviour
            .answer_delay_millis
            .store(millis, Ordering::SeqCst);
    }

    /// The `--storage` URL of [`BUCKET`] on this endpoint.
    pub fn storage_url(&self) -> String {
        format!(
            "s3://{BUCKET}?endpoint=http://127.0.0.1:{}&region=us-east-1&allow_http=true",
            self.port
        )
    }
}

impl Drop for SwitchableS3 {
    fn drop(&mut self) {
        self.behaviour.closing.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// What a request asks of S3, as far as the fake's answer depends on it.
struct Request {
    method: String,
    target: String,
    copies_an_object: bool,
    body: String,
}

fn serve_connection(stream: TcpStream, behaviour: &Behaviour) {
    let mut reader = BufReader::new(stream.try_clone().expect("cloning the connection"));
    let mut writer = stream;
    loop {
        let mut content_length = 0usize;
        let mut copies_an_object = false;
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
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("x-amz-copy-source") {
                    copies_an_object = true;
                }
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if !behaviour.alive.load(Ordering::SeqCst) {
            while !behaviour.closing.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return;
        }
        let mut words = request_line.split_whitespace();
        let request = Request {
            method: words.next().unwrap_or_default().to_owned(),
            target: words.next().unwrap_or_default().to_owned(),
            copies_an_object,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        std::thread::sleep(Duration::from_millis(
            behaviour.answer_delay_millis.load(Ordering::SeqCst),
        ));
        if writer.write_all(answer(&request).as_bytes()).is_err() {
            return;
        }
    }
}

/// The reply S3 would give to `request` on a bucket that keeps nothing.
fn answer(request: &Request) -> String {
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((request.target.as_str(), ""));
    let key = path
        .trim_start_matches('/')
        .strip_prefix(BUCKET)
        .unwrap_or_default()
        .trim_start_matches('/');
    let has_parameter = |name: &str| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some(name))
    };
    match request.method.as_str() {
        "HEAD" => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
        "DELETE" => "HTTP/1.1 204 No Content\r\n\r\n".to_owned(),
        "POST" if has_parameter("delete") => {
            let deleted: String = request
                .body
                .split("<Key>")
                .skip(1)
                .filter_map(|rest| rest.split_once("</Key>"))
                .map(|(deleted_key, _)| format!("<Deleted><Key>{deleted_key}</Key></Deleted>"))
                .collect();
            xml_reply(&format!(
                "<DeleteResult xmlns=\"{S3_NAMESPACE}\">{deleted}</DeleteResult>"
            ))
        }
        "POST" if has_parameter("uploads") => xml_reply(&format!(
            "<InitiateMultipartUploadResult xmlns=\"{S3_NAMESPACE}\"><Bucket>{BUCKET}</Bucket><Key>{key}</Key><UploadId>fake-upload</UploadId></InitiateMultipartUploadResult>"
        )),
        "POST" => xml_reply(&format!(
            "<CompleteMultipartUploadResult xmlns=\"{S3_NAMESPACE}\"><Bucket>{BUCKET}</Bucket><Key>{key}</Key><ETag>\"fake-object\"</ETag></CompleteMultipartUploadResult>"
        )),
        "PUT" if request.copies_an_object => xml_reply(&format!(
            "<CopyObjectResult xmlns=\"{S3_NAMESPACE}\"><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>\"fake-object\"</ETag></CopyObjectResult>"
        )),
        "PUT" => "HTTP/1.1 200 OK\r\nETag: \"fake-object\"\r\nContent-Length: 0\r\n\r\n".to_owned(),
        _ => xml_reply(&format!(
            "<ListBucketResult xmlns=\"{S3_NAMESPACE}\"><Name>{BUCKET}</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter><IsTruncated>false</IsTruncated></ListBucketResult>"
        )),
    }
}

fn xml_reply(document: &str) -> String {
    let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>{document}");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The credentials and region the server's S3 client needs in its environment.
pub fn storage_environment() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "fhirlog-test"),
        ("AWS_SECRET_ACCESS_KEY", "fhirlog-test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect()
}
