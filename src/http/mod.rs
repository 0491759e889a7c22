//! The warp front end under `/fhir`. One filter captures each request; [`router`] parses
//! it into a typed interaction and calls a thin handler; every error becomes an
//! OperationOutcome in [`error`]. Store work runs off the async runtime.

mod bundle;
mod capability;
pub mod error;
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
use crate::store::Store;

pub use error::ApiError;

/// Everything a handler may use.
pub struct AppState {
    pub store: Store,
    pub base_url: BaseUrl,
    pub limits: RequestLimits,
}

/// Binds `address` (port 0 picks a free port) and returns the bound address and the
/// server future, which ends after `shutdown` resolves and open requests finish.
pub async fn bind(
    store: Store,
    address: SocketAddr,
    base_url: Option<BaseUrl>,
    limits: RequestLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let state = Arc::new(AppState {
        store,
        base_url: base_url.unwrap_or_else(|| BaseUrl::for_listen_address(bound)),
        limits,
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
