//! Parsing a captured request into a typed [`Interaction`] and dispatching it.

use std::sync::Arc;

use warp::http::header::CONTENT_TYPE;
use warp::http::{HeaderMap, Method};
use warp::reply::Response as WarpResponse;

use super::export::KickOffRequest;
use super::history::HistoryTarget;
use super::request::CapturedRequest;
use super::search::SearchInput;
use super::{
    ApiError, AppState, bundle, capability, download, export, health, history, resource, response,
    search, token,
};
use crate::auth::Caller;
use crate::auth::scopes::Access;
use crate::export::ExportLevel;
use crate::fhir::{ResourceId, ResourceType};

/// A FHIR REST interaction with its parsed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interaction {
    Capabilities,
    SmartConfiguration,
    TokenRequest,
    Health,
    BatchOrTransaction,
    Create {
        resource_type: ResourceType,
    },
    Read {
        resource_type: ResourceType,
        id: ResourceId,
    },
    Update {
        resource_type: ResourceType,
        id: ResourceId,
    },
    Delete {
        resource_type: ResourceType,
        id: ResourceId,
    },
    History {
        resource_type: ResourceType,
        id: ResourceId,
    },
    TypeHistory {
        resource_type: ResourceType,
    },
    /// `GET /fhir/{type}?…` or `POST /fhir/{type}/_search`.
    Search {
        resource_type: ResourceType,
    },
    SystemHistory,
    VersionRead {
        resource_type: ResourceType,
        id: ResourceId,
        version: u64,
    },
    ExportKickOff {
        level: ExportLevel,
    },
    ExportStatus {
        job_id: String,
    },
    ExportCancel {
        job_id: String,
    },
    ExportFile {
        job_id: String,
        file_name: String,
    },
}

const BASE_PATH: &str = "/fhir";
/// The operators' health check, outside the FHIR base.
const HEALTH_PATH: &str = "/healthz";
/// The SMART token endpoint, outside the FHIR base.
const TOKEN_PATH: &str = "/auth/token";

pub async fn respond(state: Arc<AppState>, request: CapturedRequest) -> WarpResponse {
    match dispatch(state, request).await {
        Ok(reply) => reply,
        Err(error) => {
            if error.status().is_server_error() {
                tracing::error!(%error, "request failed");
            }
            response::error(&error)
        }
    }
}

async fn dispatch(
    state: Arc<AppState>,
    request: CapturedRequest,
) -> Result<WarpResponse, ApiError> {
    let interaction = parse_interaction(&request.method, &request.path)?;
    let caller = match interaction {
        Interaction::Capabilities | Interaction::SmartConfiguration | Interaction::TokenRequest => {
            None
        }
        _ => Some(authorize(&state, &request.headers, &interaction)?),
    };
    let needs_body = match &interaction {
        Interaction::BatchOrTransaction
        | Interaction::Create { .. }
        | Interaction::Update { .. } => true,
        Interaction::ExportKickOff { .. } => {
            request.method == Method::POST
                && request.body.as_ref().is_ok_and(|body| !body.is_empty())
        }
        _ => false,
    };
    if needs_body {
        require_json_content_type(&request.headers)?;
    }
    let body = request.body?;
    match interaction {
        Interaction::Capabilities => Ok(capability::capability_statement(&state)),
        Interaction::SmartConfiguration => token::smart_configuration(&state),
        Interaction::TokenRequest => token::issue(state, body).await,
        Interaction::Health => Ok(health::health(state).await),
        Interaction::BatchOrTransaction => bundle::batch_or_transaction(state, body).await,
        Interaction::Create { resource_type } => resource::create(state, resource_type, body).await,
        Interaction::Read { resource_type, id } => resource::read(state, resource_type, id).await,
        Interaction::Update { resource_type, id } => {
            let expected_version = parse_if_match(&request.headers)?;
            resource::update(state, resource_type, id, expected_version, body).await
        }
        Interaction::Delete { resource_type, id } => {
            let expected_version = parse_if_match(&request.headers)?;
            resource::delete(state, resource_type, id, expected_version).await
        }
        Interaction::History { resource_type, id } => {
            let target = HistoryTarget::Instance(resource_type, id);
            history::history(state, target, request.query).await
        }
        Interaction::TypeHistory { resource_type } => {
            history::history(state, HistoryTarget::Type(resource_type), request.query).await
        }
        Interaction::SystemHistory => {
            history::history(state, HistoryTarget::System, request.query).await
        }
        Interaction::Search { resource_type } => {
            let form_body = if request.method == Method::POST && !body.is_empty() {
                require_form_content_type(&request.headers)?;
                Some(body)
            } else {
                None
            };
            let input = SearchInput {
                resource_type,
                query: request.query,
                form_body,
            };
            search::search(state, input).await
        }
        Interaction::VersionRead {
            resource_type,
            id,
            version,
        } => resource::version_read(state, resource_type, id, version).await,
        Interaction::ExportKickOff { level } => {
            let kick_off = KickOffRequest {
                level,
                method: &request.method,
                path: &request.path,
                query: &request.query,
                headers: &request.headers,
                body,
            };
            export::kick_off(state, kick_off, caller).await
        }
        Interaction::ExportStatus { job_id } => {
            state.exports.check_owner(&job_id, owner(&caller))?;
            export::status(&state, &job_id).await
        }
        Interaction::ExportCancel { job_id } => {
            state.exports.check_owner(&job_id, owner(&caller))?;
            export::cancel(&state, job_id).await
        }
        Interaction::ExportFile { job_id, file_name } => {
            state.exports.check_owner(&job_id, owner(&caller))?;
            download::file(Arc::clone(&state), &job_id, &file_name, &request.headers).await
        }
    }
}

fn owner(caller: &Option<Caller>) -> Option<&str> {
    caller.as_ref().and_then(Caller::owner)
}

/// The caller behind the request's bearer token, checked against what the interaction
/// touches; exports are checked further once their parameters are parsed.
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    interaction: &Interaction,
) -> Result<Caller, ApiError> {
    let authorization = headers
        .get(warp::http::header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    let caller = state
        .auth
        .authenticate(authorization, std::time::SystemTime::now())?;
    match interaction {
        Interaction::Read { resource_type, .. }
        | Interaction::History { resource_type, .. }
        | Interaction::TypeHistory { resource_type }
        | Interaction::Search { resource_type }
        | Interaction::VersionRead { resource_type, .. } => {
            caller.require(*resource_type, Access::Read)?
        }
        Interaction::SystemHistory => caller.require_on_every_type(&[Access::Read])?,
        Interaction::Create { resource_type } => caller.require(*resource_type, Access::Create)?,
        Interaction::Update { resource_type, .. } => {
            caller.require(*resource_type, Access::Update)?
        }
        Interaction::Delete { resource_type, .. } => {
            caller.require(*resource_type, Access::Delete)?
        }
        Interaction::BatchOrTransaction => caller.require_on_every_type(&[
            Access::Create,
            Access::Read,
            Access::Update,
            Access::Delete,
        ])?,
        Interaction::Capabilities
        | Interaction::SmartConfiguration
        | Interaction::TokenRequest
        | Interaction::Health
        | Interaction::ExportKickOff { .. }
        | Interaction::ExportStatus { .. }
        | Interaction::ExportCancel { .. }
        | Interaction::ExportFile { .. } => {}
    }
    Ok(caller)
}

pub fn parse_interaction(method: &Method, path: &str) -> Result<Interaction, ApiError> {
    let no_route =
        || ApiError::NotFound(format!("no FHIR endpoint at {} {}", method, truncate(path)));
    if path == TOKEN_PATH {
        return match *method {
            Method::POST => Ok(Interaction::TokenRequest),
            _ => Err(ApiError::MethodNotAllowed {
                message: format!("{method} is not supported on {TOKEN_PATH}; use POST"),
                allow: "POST",
            }),
        };
    }
    if path == HEALTH_PATH {
        return match *method {
            Method::GET => Ok(Interaction::Health),
            _ => Err(ApiError::MethodNotAllowed {
                message: format!("{method} is not supported on {HEALTH_PATH}; use GET"),
                allow: "GET",
            }),
        };
    }
    let rest = match path.strip_prefix(BASE_PATH) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        _ => return Err(no_route()),
    };
    let segments: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.trim_end_matches('/').split('/').collect()
    };
    let not_allowed = |allow: &'static str| ApiError::MethodNotAllowed {
        message: format!(
            "{method} is not supported on {}; use {allow}",
            truncate(path)
        ),
        allow,
    };
    let export_kick_off = |level: ExportLevel| match *method {
        Method::GET | Method::POST => Ok(Interaction::ExportKickOff { level }),
        _ => Err(not_allowed("GET, POST")),
    };
    match segments.as_slice() {
        ["$export"] => export_kick_off(ExportLevel::System),
        ["Patient", "$export"] => export_kick_off(ExportLevel::AllPatients),
        ["Group", group_id, "$export"] => export_kick_off(ExportLevel::Group(parse_id(group_id)?)),
        ["$export-status", job_id] => {
            let job_id = parse_job_id(job_id)?;
            match *method {
                Method::GET => Ok(Interaction::ExportStatus { job_id }),
                Method::DELETE => Ok(Interaction::ExportCancel { job_id }),
                _ => Err(not_allowed("GET, DELETE")),
            }
        }
        ["$export-file", job_id, file_name] => {
            let job_id = parse_job_id(job_id)?;
            let valid_name = file_name.ends_with(".ndjson")
                && file_name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
            if !valid_name {
                return Err(ApiError::NotFound(format!(
                    "no export file '{}'",
                    truncate(file_name)
                )));
            }
            match *method {
                Method::GET => Ok(Interaction::ExportFile {
                    job_id,
                    file_name: (*file_name).to_owned(),
                }),
                _ => Err(not_allowed("GET")),
            }
        }
        [] => match *method {
            Method::POST => Ok(Interaction::BatchOrTransaction),
            _ => Err(not_allowed("POST")),
        },
        ["metadata"] => match *method {
            Method::GET => Ok(Interaction::Capabilities),
            _ => Err(not_allowed("GET")),
        },
        ["_history"] => match *method {
            Method::GET => Ok(Interaction::SystemHistory),
            _ => Err(not_allowed("GET")),
        },
        [".well-known", "smart-configuration"] => match *method {
            Method::GET => Ok(Interaction::SmartConfiguration),
            _ => Err(not_allowed("GET")),
        },
        [type_name] => {
            let resource_type = parse_type(type_name)?;
            match *method {
                Method::POST => Ok(Interaction::Create { resource_type }),
                Method::GET => Ok(Interaction::Search { resource_type }),
                _ => Err(not_allowed("GET, POST")),
            }
        }
        [type_name, "_search"] => {
            let resource_type = parse_type(type_name)?;
            match *method {
                Method::POST => Ok(Interaction::Search { resource_type }),
                _ => Err(not_allowed("POST")),
            }
        }
        [type_name, "_history"] => {
            let resource_type = parse_type(type_name)?;
            match *method {
                Method::GET => Ok(Interaction::TypeHistory { resource_type }),
                _ => Err(not_allowed("GET")),
            }
        }
        [type_name, id] => {
            let (resource_type, id) = (parse_type(type_name)?, parse_id(id)?);
            match *method {
                Method::GET => Ok(Interaction::Read { resource_type, id }),
                Method::PUT => Ok(Interaction::Update { resource_type, id }),
                Method::DELETE => Ok(Interaction::Delete { resource_type, id }),
                _ => Err(not_allowed("GET, PUT, DELETE")),
            }
        }
        [type_name, id, "_history"] => {
            let (resource_type, id) = (parse_type(type_name)?, parse_id(id)?);
            match *method {
                Method::GET => Ok(Interaction::History { resource_type, id }),
                _ => Err(not_allowed("GET")),
            }
        }
        [type_name, id, "_history", version] => {
            let (resource_type, id) = (parse_type(type_name)?, parse_id(id)?);
            let version = version
                .parse::<u64>()
                .ok()
                .filter(|version| *version > 0)
                .ok_or_else(|| {
                    ApiError::NotFound(format!("'{}' is not a version id", truncate(version)))
                })?;
            match *method {
                Method::GET => Ok(Interaction::VersionRead {
                    resource_type,
                    id,
                    version,
                }),
                _ => Err(not_allowed("GET")),
            }
        }
        _ => Err(no_route()),
    }
}

/// Job ids are 32 lowercase hex digits; anything else cannot name a job.
fn parse_job_id(text: &str) -> Result<String, ApiError> {
    if text.len() == 32
        && text
            .bytes()
            .all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase())
    {
        Ok(text.to_owned())
    } else {
        Err(ApiError::NotFound(format!(
            "no export job '{}'",
            truncate(text)
        )))
    }
}

fn parse_type(name: &str) -> Result<ResourceType, ApiError> {
    ResourceType::parse(name).map_err(|error| ApiError::NotFound(error.to_string()))
}

fn parse_id(id: &str) -> Result<ResourceId, ApiError> {
    ResourceId::parse(id)
        .map_err(|error| ApiError::BadRequest(format!("invalid resource id in URL: {error}")))
}

fn truncate(text: &str) -> String {
    text.chars().take(200).collect()
}

fn require_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .map(|value| value.to_str().unwrap_or("(not text)"))
        .unwrap_or("(none)");
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media_type.as_str() {
        "application/fhir+json" | "application/json" | "application/json+fhir" => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{}' is not supported; send application/fhir+json",
            truncate(content_type)
        ))),
    }
}

/// A `_search` body must be a form.
fn require_form_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .map(|value| value.to_str().unwrap_or("(not text)"))
        .unwrap_or("(none)");
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{}' is not supported for _search; send application/x-www-form-urlencoded",
            truncate(content_type)
        )))
    }
}

/// `If-Match: W/"3"` (or `"3"`) → version 3.
fn parse_if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(warp::http::header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    text.strip_prefix("W/")
        .unwrap_or(text)
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .and_then(|version| version.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "If-Match '{}' is not a version ETag like W/\"3\"",
                truncate(text)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_into_interactions() {
        let patient = ResourceType::PATIENT;
        let id = ResourceId::parse("p1").unwrap();
        assert_eq!(
            parse_interaction(&Method::GET, "/fhir/metadata").unwrap(),
            Interaction::Capabilities
        );
        assert_eq!(
            parse_interaction(&Method::POST, "/fhir").unwrap(),
            Interaction::BatchOrTransaction
        );
        assert_eq!(
            parse_interaction(&Method::POST, "/fhir/Patient").unwrap(),
            Interaction::Create {
                resource_type: patient
            }
        );
        assert_eq!(
            parse_interaction(&Method::GET, "/fhir/Patient/p1/_history/2").unwrap(),
            Interaction::VersionRead {
                resource_type: patient,
                id: id.clone(),
                version: 2
            }
        );
        assert_eq!(
            parse_interaction(&Method::DELETE, "/fhir/Patient/p1").unwrap(),
            Interaction::Delete {
                resource_type: patient,
                id
            }
        );
        assert!(matches!(
            parse_interaction(&Method::GET, "/fhirx"),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            parse_interaction(&Method::GET, "/fhir/Nope/1"),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            parse_interaction(&Method::GET, "/fhir/Patient/a_b"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_interaction(&Method::PATCH, "/fhir/Patient/p1"),
            Err(ApiError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            parse_interaction(&Method::GET, "/fhir/a/b/c/d/e"),
            Err(ApiError::NotFound(_))
        ));
    }

    #[test]
    fn if_match_accepts_weak_and_strong_version_etags() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(warp::http::header::IF_MATCH, value.parse().unwrap());
            parse_if_match(&headers)
        };
        assert_eq!(with("W/\"3\"").unwrap(), Some(3));
        assert_eq!(with("\"4\"").unwrap(), Some(4));
        assert!(with("3").is_err());
        assert_eq!(parse_if_match(&HeaderMap::new()).unwrap(), None);
    }
}
