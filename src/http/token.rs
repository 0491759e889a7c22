//! SMART discovery (`/fhir/.well-known/smart-configuration`) and the token endpoint
//! (`POST /auth/token`) of `--auth smart`.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::resource::run_blocking;
use super::{ApiError, AppState, response};

fn not_smart() -> ApiError {
    ApiError::NotFound("this server does not run SMART Backend Services (--auth smart)".to_owned())
}

pub fn smart_configuration(state: &AppState) -> Result<WarpResponse, ApiError> {
    let body = state.auth.smart_configuration().ok_or_else(not_smart)?;
    Ok(response::oauth_json(StatusCode::OK, &body))
}

/// Issues an access token; the assertion's signature is checked on a blocking thread.
pub async fn issue(state: Arc<AppState>, form: Bytes) -> Result<WarpResponse, ApiError> {
    if state.auth.issuer().is_none() {
        return Err(not_smart());
    }
    let issued = run_blocking(move || {
        let issuer = state.auth.issuer().ok_or_else(not_smart)?;
        Ok(issuer.issue(&form, SystemTime::now())?)
    })
    .await?;
    Ok(response::oauth_json(StatusCode::OK, &issued.to_json()))
}
