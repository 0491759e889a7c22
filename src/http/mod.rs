//! The warp front end under `/fhir`. One filter captures each request; [`router`] parses
//! it into a typed interaction and calls a thin handler; every error becomes an
//! OperationOutcome in [`error`]. Store work runs off the async runtime.

mod bundle;
mod capability;
mod download;
pub mod error;
mod export;
mod request;
mod resource;
mod response;
mod router;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use warp::Filter;

use crate::config::{BaseUrl, RequestLimits};
use crate::export::{ExportEngine, ExportSettings};
use crate::sink::LocalDestination;
use crate::store::Store;

pub use error::ApiError;

/// Everything a handler may use.
pub struct AppState {
    pub store: Store,
    pub exports: Arc<ExportEngine>,
    pub base_url: BaseUrl,
    pub limits: RequestLimits,
    /// When set, manifests carry pre-signed storage URLs valid this long.
    pub signed_url_ttl: Option<std::time::Duration>,
}

/// What a server is made of; [`bind_parts`] serves it.
pub struct ServerParts {
    pub store: Store,
    pub exports: Arc<ExportEngine>,
    /// `None`: derived from the bound address.
    pub base_url: Option<BaseUrl>,
    pub limits: RequestLimits,
    pub signed_url_ttl: Option<std::time::Duration>,
}

/// Binds `address` (port 0 picks a free port) with the embedded defaults: exports go to
/// `{data-dir}/exports` with default export settings. Returns the bound address and the
/// server future, which ends after `shutdown` resolves and open requests finish.
pub async fn bind(
    store: Store,
    address: SocketAddr,
    base_url: Option<BaseUrl>,
    limits: RequestLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let export_store = store.clone();
    let runtime = tokio::runtime::Handle::current();
    let exports = tokio::task::spawn_blocking(move || {
        let destination = LocalDestination::new(export_store.data_dir().join("exports"), true);
        ExportEngine::start(
            export_store,
            Arc::new(destination),
            ExportSettings::default(),
            runtime,
        )
    })
    .await
    .map_err(std::io::Error::other)?
    .map_err(std::io::Error::other)?;
    let parts = ServerParts {
        store,
        exports: Arc::new(exports),
        base_url,
        limits,
        signed_url_ttl: None,
    };
    bind_parts(parts, address, shutdown).await
}

/// Binds `address` and serves `parts`; see [`bind`].
pub async fn bind_parts(
    parts: ServerParts,
    address: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let limits = parts.limits;
    let state = Arc::new(AppState {
        store: parts.store,
        exports: parts.exports,
        base_url: parts
            .base_url
            .unwrap_or_else(|| BaseUrl::for_listen_address(bound)),
        limits,
        signed_url_ttl: parts.signed_url_ttl,
    });
    let routes = request::capture(limits.max_body_bytes).then(move |captured| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(router::respond(state, captured).await) }
    });
    let server = warp::serve(routes.with(warp::log("fhirlog::http")))
        .incoming(listener)
        .graceful(shutdown)
        .run();
    Ok((bound, server))
}
