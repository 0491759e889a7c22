//! The front door: our own accept loop on hyper 1 in front of the warp routes. A
//! connection takes one of `--max-connections` slots (past that, new connections wait in
//! the listen backlog while the others keep being served), finishes a TLS handshake within
//! `--header-timeout` when TLS is on, must send each request head within the same timeout,
//! and is dropped when a response write makes no progress for that long. Request heads over
//! the limits here get an OperationOutcome before routing.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use warp::http::Request;
use warp::reply::Response as WarpResponse;

use super::{ApiError, AppState, response};
use crate::config::{FrontDoorSettings, TlsFiles};

/// Longest request target (path and query); longer gets 414.
pub const MAX_TARGET_BYTES: usize = 16 * 1024;
/// Longest query string, `_typeFilter` included; longer gets 400.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
/// Most query parameters; more get 400.
pub const MAX_QUERY_PARAMETERS: usize = 100;
/// Most request header fields; more get 431.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of request header fields (names, values and separators); more get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// hyper's own limits sit above ours so that a head over ours reaches [`check_head`] and
/// gets an OperationOutcome; a head past these gets hyper's bodiless 431 (or 414) and the
/// connection is closed. The buffer bound also bounds a slow client's memory.
const HYPER_MAX_HEADERS: usize = 2 * MAX_HEADERS;
const HYPER_MAX_BUFFER_BYTES: usize = 2 * (MAX_TARGET_BYTES + MAX_HEADER_BYTES);
/// How long accepting pauses after the listener fails (out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why TLS could not be set up from `--tls-cert` and `--tls-key`.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("reading {flag} {}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("--tls-cert {} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("--tls-key does not fit --tls-cert, or is not a usable private key")]
    Rejected(#[source] rustls::Error),
}

/// Reads the certificate chain and key and builds a TLS 1.2 / 1.3 acceptor offering
/// HTTP/1.1. Blocking (file reads).
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsSetupError> {
    let read_error = |flag, path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsSetupError::Read { flag, path, source }
    };
    let certificate_chain = CertificateDer::pem_file_iter(&files.certificate_chain)
        .map_err(read_error("--tls-cert", &files.certificate_chain))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error("--tls-cert", &files.certificate_chain))?;
    if certificate_chain.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: files.certificate_chain.clone(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(&files.private_key)
        .map_err(read_error("--tls-key", &files.private_key))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsSetupError::Rejected)?
        .with_no_client_auth()
        .with_single_cert(certificate_chain, private_key)
        .map_err(TlsSetupError::Rejected)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A bound listener with its admission rules, serving nothing until [`FrontDoor::serve`].
pub struct FrontDoor {
    listener: TcpListener,
    max_connections: usize,
    header_timeout: Duration,
    tls: Option<TlsAcceptor>,
}

impl FrontDoor {
    pub fn new(
        listener: TcpListener,
        settings: &FrontDoorSettings,
        tls: Option<TlsAcceptor>,
    ) -> FrontDoor {
        FrontDoor {
            listener,
            max_connections: settings.max_connections,
            header_timeout: settings.header_timeout,
            tls,
        }
    }

    /// Serves the routes over `state` until `shutdown` resolves, then stops accepting,
    /// lets open requests finish and closes idle connections.
    pub async fn serve(self, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
        let routes = TowerToHyperService::new(warp::service(super::routes(state)));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_headers(HYPER_MAX_HEADERS)
            .max_buf_size(HYPER_MAX_BUFFER_BYTES);
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                () = &mut shutdown => break,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            let service = logged_service(routes.clone(), peer);
            let connection = Connection {
                peer,
                slot,
                watcher: graceful.watcher(),
                http: http.clone(),
                header_timeout: self.header_timeout,
            };
            tokio::spawn(connection.serve(stream, self.tls.clone(), service));
        }
        drop(self.listener);
        graceful.shutdown().await;
    }
}

/// Longest part of a request path an access-log line quotes.
const LOGGED_PATH_MAX_CHARS: usize = 256;

/// The routes of one connection from `peer` behind [`check_head`], logging one line per
/// request (its path without the query).
fn logged_service<R>(
    routes: R,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = WarpResponse,
    Error = Infallible,
    Future: Send,
> + Send
+ 'static
where
    R: hyper::service::Service<
            Request<Incoming>,
            Response = WarpResponse,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static,
{
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let started = std::time::Instant::now();
        let method = request.method().clone();
        let version = request.version();
        let path: String = request
            .uri()
            .path()
            .chars()
            .take(LOGGED_PATH_MAX_CHARS)
            .collect();
        let routed = match check_head(&request) {
            Ok(()) => Ok(routes.call(request)),
            Err(refusal) => {
                tracing::info!(target: "fhirlog::http", "{peer} refused: {refusal}");
                Err(response::error(&refusal))
            }
        };
        async move {
            let reply = match routed {
                Ok(routed) => match routed.await {
                    Ok(reply) => reply,
                    Err(never) => match never {},
                },
                Err(refused) => refused,
            };
            tracing::info!(
                target: "fhirlog::http",
                "{peer} \"{method} {path} {version:?}\" {} {:?}",
                reply.status().as_u16(),
                started.elapsed()
            );
            Ok::<_, Infallible>(reply)
        }
    })
}

/// One accepted connection and the slot it holds until it closes.
struct Connection {
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    watcher: Watcher,
    http: http1::Builder,
    header_timeout: Duration,
}

impl Connection {
    async fn serve<S, B>(self, stream: TcpStream, tls: Option<TlsAcceptor>, service: S)
    where
        S: hyper::service::HttpService<Incoming, ResBody = B> + Send + 'static,
        S::Future: Send,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _ = stream.set_nodelay(true);
        let stream = StallGuardedStream::new(stream, self.header_timeout);
        match tls {
            None => self.serve_http(TokioIo::new(stream), service).await,
            Some(acceptor) => {
                match tokio::time::timeout(self.header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => self.serve_http(TokioIo::new(tls_stream), service).await,
                    Ok(Err(error)) => {
                        tracing::debug!(peer = %self.peer, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    }
                }
            }
        }
    }

    async fn serve_http<I, S, B>(self, io: I, service: S)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = B> + Send + 'static,
        S::Future: Send,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Connection {
            peer,
            slot,
            watcher,
            http,
            ..
        } = self;
        if let Err(error) = watcher.watch(http.serve_connection(io, service)).await {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
        drop(slot);
    }
}

/// A connection whose writes fail once one has made no progress for `stall_timeout`, so a
/// client that stops reading a response cannot hold its connection slot.
struct StallGuardedStream {
    stream: TcpStream,
    stall_timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StallGuardedStream {
    fn new(stream: TcpStream, stall_timeout: Duration) -> StallGuardedStream {
        StallGuardedStream {
            stream,
            stall_timeout,
            stalled: None,
        }
    }

    /// Passes on a write's outcome; a pending one fails once the stall lasts too long.
    fn guard<T>(
        &mut self,
        context: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if outcome.is_ready() {
            self.stalled = None;
            return outcome;
        }
        let stall_timeout = self.stall_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall_timeout)));
        match stalled.as_mut().poll(context) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StallGuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for StallGuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.stream).poll_write(context, buffer);
        this.guard(context, outcome)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.stream).poll_write_vectored(context, buffers);
        this.guard(context, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.stream).poll_flush(context);
        this.guard(context, outcome)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.stream).poll_shutdown(context);
        this.guard(context, outcome)
    }
}

/// Refuses a request whose target, query or headers are over the limits.
fn check_head<B>(request: &Request<B>) -> Result<(), ApiError> {
    let target_bytes = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target_bytes > MAX_TARGET_BYTES {
        return Err(ApiError::UriTooLong(format!(
            "the request target is {target_bytes} bytes; the limit is {MAX_TARGET_BYTES}"
        )));
    }
    let query = request.uri().query().unwrap_or_default();
    if query.len() > MAX_QUERY_BYTES {
        return Err(ApiError::BadRequest(format!(
            "the query string is {} bytes; the limit is {MAX_QUERY_BYTES} (_typeFilter included)",
            query.len()
        )));
    }
    let parameters = query
        .split('&')
        .filter(|parameter| !parameter.is_empty())
        .count();
    if parameters > MAX_QUERY_PARAMETERS {
        return Err(ApiError::BadRequest(format!(
            "the query has {parameters} parameters; the limit is {MAX_QUERY_PARAMETERS}"
        )));
    }
    let headers = request.headers();
    if headers.len() > MAX_HEADERS {
        return Err(ApiError::HeadersTooLarge(format!(
            "the request has {} header fields; the limit is {MAX_HEADERS}",
            headers.len()
        )));
    }
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge(format!(
            "the request headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(target: &str, headers: &[(&str, String)]) -> Request<()> {
        let mut request = Request::builder().uri(target);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request.body(()).unwrap()
    }

    #[test]
    fn heads_at_the_limits_pass_and_one_over_is_refused() {
        let parameters = |count: usize| {
            let query: Vec<String> = (0..count).map(|index| format!("p{index}=1")).collect();
            format!("/fhir/$export?{}", query.join("&"))
        };
        assert!(check_head(&head(&parameters(MAX_QUERY_PARAMETERS), &[])).is_ok());
        assert!(matches!(
            check_head(&head(&parameters(MAX_QUERY_PARAMETERS + 1), &[])),
            Err(ApiError::BadRequest(_))
        ));
        let query_of =
            |bytes: usize| format!("/fhir/$export?_typeFilter={}", "a".repeat(bytes - 12));
        assert!(check_head(&head(&query_of(MAX_QUERY_BYTES), &[])).is_ok());
        assert!(matches!(
            check_head(&head(&query_of(MAX_QUERY_BYTES + 1), &[])),
            Err(ApiError::BadRequest(_))
        ));
        let long_path = format!("/fhir/{}", "a".repeat(MAX_TARGET_BYTES));
        assert!(matches!(
            check_head(&head(&long_path, &[])),
            Err(ApiError::UriTooLong(_))
        ));
        let many: Vec<(&str, String)> = (0..=MAX_HEADERS)
            .map(|_| ("x-many", "1".to_owned()))
            .collect();
        assert!(matches!(
            check_head(&head("/fhir/metadata", &many)),
            Err(ApiError::HeadersTooLarge(_))
        ));
        let big = [("x-big", "b".repeat(MAX_HEADER_BYTES))];
        assert!(matches!(
            check_head(&head("/fhir/metadata", &big)),
            Err(ApiError::HeadersTooLarge(_))
        ));
    }
}
