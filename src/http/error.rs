//! The HTTP boundary's error type and the one place errors become status codes and
//! OperationOutcomes.

use warp::http::StatusCode;

use super::paging::PagingError;
use crate::auth::{AccessError, OAuthErrorCode, TokenRequestError};
use crate::export::{ExportError, ExportErrorKind};
use crate::fhir::canonical::ResourceBodyError;
use crate::fhir::outcome::{IssueKind, OperationOutcome};
use crate::search::elements::ElementsError;
use crate::search::query::SearchQueryError;
use crate::sink::SinkError;
use crate::store::{StoreError, WriteRejection};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    InvalidBody(#[from] ResourceBodyError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("{message}")]
    MethodNotAllowed {
        message: String,
        allow: &'static str,
    },
    #[error("{0}")]
    RequestTimeout(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The request target is longer than the front door accepts.
    #[error("{0}")]
    UriTooLong(String),
    /// Too many request headers, or too many bytes of them.
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Bad paging, `_summary` or history parameters.
    #[error(transparent)]
    Paging(#[from] PagingError),
    #[error(transparent)]
    SearchQuery(#[from] SearchQueryError),
    #[error(transparent)]
    Elements(#[from] ElementsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A job that failed after it was accepted, as its status poll reports it.
    #[error("{message}")]
    ExportFailed {
        kind: ExportErrorKind,
        message: String,
    },
    /// A destination read for a download failed.
    #[error(transparent)]
    Destination(#[from] SinkError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Access(#[from] AccessError),
    /// A refused token request, answered as OAuth JSON rather than an OperationOutcome.
    #[error(transparent)]
    TokenRequest(#[from] TokenRequestError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_)
            | ApiError::InvalidBody(_)
            | ApiError::Paging(_)
            | ApiError::SearchQuery(_)
            | ApiError::Elements(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Store(StoreError::Rejected(WriteRejection::VersionConflict { .. })) => {
                StatusCode::PRECONDITION_FAILED
            }
            ApiError::Store(StoreError::Rejected(WriteRejection::AlreadyExists { .. })) => {
                StatusCode::CONFLICT
            }
            ApiError::Store(StoreError::Closed | StoreError::Recovering) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Store(StoreError::OutOfSpace) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Store(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Export(error) => export_status(error.kind()),
            ApiError::ExportFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Destination(SinkError::NotFound(_) | SinkError::ContainerMissing { .. }) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Destination(SinkError::Unreachable { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Destination(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Access(AccessError::MissingToken | AccessError::InvalidToken) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Access(
                AccessError::InsufficientScope(_) | AccessError::ContainerNotAllowed(_),
            ) => StatusCode::FORBIDDEN,
            ApiError::TokenRequest(error) => match error.code {
                OAuthErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
                OAuthErrorCode::InvalidRequest
                | OAuthErrorCode::UnsupportedGrantType
                | OAuthErrorCode::InvalidScope => StatusCode::BAD_REQUEST,
            },
        }
    }

    pub fn issue_kind(&self) -> IssueKind {
        match self {
            ApiError::BadRequest(_) | ApiError::Paging(_) | ApiError::Elements(_) => {
                IssueKind::Invalid
            }
            ApiError::SearchQuery(
                SearchQueryError::ResultParameter { .. }
                | SearchQueryError::UnsupportedParameter { .. }
                | SearchQueryError::UnsupportedModifier { .. },
            ) => IssueKind::NotSupported,
            ApiError::SearchQuery(_) => IssueKind::Invalid,
            ApiError::InvalidBody(_) => IssueKind::Structure,
            ApiError::NotFound(_) => IssueKind::NotFound,
            ApiError::Gone(_) => IssueKind::Deleted,
            ApiError::MethodNotAllowed { .. } | ApiError::UnsupportedMediaType(_) => {
                IssueKind::NotSupported
            }
            ApiError::PayloadTooLarge { .. }
            | ApiError::UriTooLong(_)
            | ApiError::HeadersTooLarge(_) => IssueKind::TooLong,
            ApiError::RequestTimeout(_) => IssueKind::Timeout,
            ApiError::Store(StoreError::Rejected(_)) => IssueKind::Conflict,
            ApiError::Store(StoreError::OutOfSpace) => IssueKind::TooCostly,
            ApiError::Store(StoreError::Recovering) => IssueKind::Transient,
            ApiError::Store(_) | ApiError::Internal(_) => IssueKind::Exception,
            ApiError::Export(error) => export_issue_kind(error.kind()),
            ApiError::ExportFailed { kind, .. } => export_issue_kind(*kind),
            ApiError::Destination(SinkError::NotFound(_) | SinkError::ContainerMissing { .. }) => {
                IssueKind::NotFound
            }
            ApiError::Destination(SinkError::Unreachable { .. }) => IssueKind::Timeout,
            ApiError::Destination(_) => IssueKind::Exception,
            ApiError::Access(AccessError::MissingToken | AccessError::InvalidToken)
            | ApiError::TokenRequest(_) => IssueKind::Login,
            ApiError::Access(_) => IssueKind::Forbidden,
        }
    }

    /// What the client is told: internal failures are named only by their kind (their
    /// paths, endpoints and causes go to the log through `Display`).
    pub fn client_message(&self) -> String {
        match self {
            ApiError::Store(
                StoreError::Rejected(_)
                | StoreError::Closed
                | StoreError::OutOfSpace
                | StoreError::Recovering,
            ) => self.to_string(),
            ApiError::Store(_) => "the store failed; the server log has the details".to_owned(),
            ApiError::Internal(_) => "internal error; the server log has the details".to_owned(),
            ApiError::Destination(error) => error.client_message(),
            other => other.to_string(),
        }
    }

    pub fn to_outcome(&self) -> OperationOutcome {
        OperationOutcome::error(self.issue_kind(), self.client_message())
    }
}

/// The status of a refused export request or operation.
fn export_status(kind: ExportErrorKind) -> StatusCode {
    match kind {
        ExportErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ExportErrorKind::NotFound | ExportErrorKind::Cancelled => StatusCode::NOT_FOUND,
        ExportErrorKind::TooManyJobs => StatusCode::TOO_MANY_REQUESTS,
        ExportErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        ExportErrorKind::DestinationUnavailable | ExportErrorKind::StoreRecovering => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ExportErrorKind::Destination | ExportErrorKind::Store | ExportErrorKind::TimedOut => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn export_issue_kind(kind: ExportErrorKind) -> IssueKind {
    match kind {
        ExportErrorKind::InvalidRequest => IssueKind::Invalid,
        ExportErrorKind::NotFound | ExportErrorKind::Cancelled => IssueKind::NotFound,
        ExportErrorKind::TooManyJobs => IssueKind::Throttled,
        ExportErrorKind::InsufficientStorage => IssueKind::TooCostly,
        ExportErrorKind::DestinationUnavailable | ExportErrorKind::StoreRecovering => {
            IssueKind::Transient
        }
        ExportErrorKind::TimedOut => IssueKind::Timeout,
        ExportErrorKind::Destination | ExportErrorKind::Store => IssueKind::Exception,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::{ResourceId, ResourceType};

    #[test]
    fn each_error_maps_to_its_status() {
        let conflict = ApiError::Store(StoreError::Rejected(WriteRejection::VersionConflict {
            resource_type: ResourceType::PATIENT,
            id: ResourceId::parse("a").unwrap(),
            expected_version: 1,
            current_version: Some(2),
        }));
        assert_eq!(conflict.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(
            ApiError::PayloadTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            ApiError::InvalidBody(ResourceBodyError::MissingResourceType).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ApiError::Store(StoreError::Closed).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let full = ApiError::Store(StoreError::OutOfSpace);
        assert_eq!(full.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert!(full.to_string().contains("disk is full"), "{full}");
        assert_eq!(
            ApiError::Export(ExportError::from(StoreError::OutOfSpace)).status(),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            ApiError::Export(ExportError::from(StoreError::Recovering)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::UriTooLong(String::new()).status(),
            StatusCode::URI_TOO_LONG
        );
        assert_eq!(
            ApiError::HeadersTooLarge(String::new()).status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn internal_failures_reach_the_client_without_their_cause() {
        let secret = "/srv/secret/exports at http://10.1.2.3:9000";
        let failures = [
            ApiError::Internal(format!("task panicked at src/http/resource.rs: {secret}")),
            ApiError::Store(StoreError::Corrupt(secret.to_owned())),
            ApiError::Destination(SinkError::ContainerMissing {
                container: "given".to_owned(),
                destination: secret.to_owned(),
            }),
            ApiError::Destination(SinkError::Io(std::io::Error::other(secret))),
        ];
        for failure in failures {
            let shown = failure.to_outcome().to_json().to_string();
            assert!(failure.to_string().contains(secret), "{failure}");
            assert!(!shown.contains("secret"), "{shown}");
            assert!(!shown.contains("resource.rs"), "{shown}");
        }
    }
}
