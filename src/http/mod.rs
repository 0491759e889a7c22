//! The warp front end under `/fhir`. One filter captures each request; [`router`] parses
//! it into a typed interaction and calls a thin handler; every error becomes an
//! OperationOutcome in [`error`]. Store work runs off the async runtime.

mod bundle;
mod capability;
mod download;
pub mod error;
mod export;
pub mod front_door;
mod health;
mod history;
mod paging;
mod request;
mod resource;
mod response;
mod router;
mod search;
mod token;

use std::convert::Infallible;
use std::sync::Arc;

use warp::Filter;

use crate::auth::Authorizer;
use crate::config::{BaseUrl, RequestLimits};
use crate::export::ExportEngine;
use crate::fhir::LocalBase;
use crate::store::Store;

pub use error::ApiError;

/// Everything a handler may use.
pub struct AppState {
    pub store: Store,
    pub exports: Arc<ExportEngine>,
    pub base_url: BaseUrl,
    /// Which references written resources make name resources here (from `base_url`).
    pub local_base: LocalBase,
    pub limits: RequestLimits,
    /// When set, manifests carry pre-signed storage URLs valid this long.
    pub signed_url_ttl: Option<std::time::Duration>,
    pub auth: Authorizer,
}

/// Every FHIR route over `state`; the front door serves it and logs each request.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static
{
    let limits = state.limits;
    request::capture(limits.max_body_bytes, limits.body_timeout.0).then(move |captured| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(router::respond(state, captured).await) }
    })
}
