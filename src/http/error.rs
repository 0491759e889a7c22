//! The HTTP boundary's error type and the one place errors become status codes and
//! OperationOutcomes.

use warp::http::StatusCode;

use crate::export::ExportError;
use crate::fhir::canonical::ResourceBodyError;
use crate::fhir::outcome::{IssueKind, OperationOutcome};
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
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A destination read for a download failed.
    #[error(transparent)]
    Destination(#[from] SinkError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidBody(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Store(StoreError::Rejected(WriteRejection::VersionConflict { .. })) => {
                StatusCode::PRECONDITION_FAILED
            }
            ApiError::Store(StoreError::Rejected(WriteRejection::AlreadyExists { .. })) => {
                StatusCode::CONFLICT
            }
            ApiError::Store(StoreError::Closed) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Export(ExportError::InvalidRequest(_)) => StatusCode::BAD_REQUEST,
            ApiError::Export(ExportError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::Export(ExportError::TooManyJobs { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Export(ExportError::Sink(_) | ExportError::Store(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::Destination(SinkError::NotFound(_) | SinkError::ContainerMissing { .. }) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Destination(SinkError::Unreachable { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Destination(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn issue_kind(&self) -> IssueKind {
        match self {
            ApiError::BadRequest(_) => IssueKind::Invalid,
            ApiError::InvalidBody(_) => IssueKind::Structure,
            ApiError::NotFound(_) => IssueKind::NotFound,
            ApiError::Gone(_) => IssueKind::Deleted,
            ApiError::MethodNotAllowed { .. } | ApiError::UnsupportedMediaType(_) => {
                IssueKind::NotSupported
            }
            ApiError::PayloadTooLarge { .. } => IssueKind::TooLong,
            ApiError::RequestTimeout(_) => IssueKind::Timeout,
            ApiError::Store(StoreError::Rejected(_)) => IssueKind::Conflict,
            ApiError::Store(_) | ApiError::Internal(_) => IssueKind::Exception,
            ApiError::Export(ExportError::InvalidRequest(_)) => IssueKind::Invalid,
            ApiError::Export(ExportError::NotFound(_)) => IssueKind::NotFound,
            ApiError::Export(ExportError::TooManyJobs { .. }) => IssueKind::Throttled,
            ApiError::Export(ExportError::Sink(_) | ExportError::Store(_)) => IssueKind::Exception,
            ApiError::Destination(SinkError::NotFound(_) | SinkError::ContainerMissing { .. }) => {
                IssueKind::NotFound
            }
            ApiError::Destination(SinkError::Unreachable { .. }) => IssueKind::Timeout,
            ApiError::Destination(_) => IssueKind::Exception,
        }
    }

    pub fn to_outcome(&self) -> OperationOutcome {
        OperationOutcome::error(self.issue_kind(), self.to_string())
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
    }
}
