//! A fake S3 endpoint for tests whose destination must go silent: it answers every
//! request with an empty bucket listing while alive, and once dead accepts connections
//! and never answers them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The bucket the fake serves.
pub const BUCKET: &str = "dead-destination";

/// An S3 endpoint that answers every request with an empty bucket listing while alive,
/// and once dead accepts connections and never answers them.
pub struct SwitchableS3 {
    port: u16,
    alive: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
}

impl SwitchableS3 {
    /// Starts a live endpoint on a free local port.
    pub fn start() -> SwitchableS3 {
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

    /// From now on, accepts requests and never answers them.
    pub fn die(&self) {
        self.alive.store(false, Ordering::SeqCst);
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
