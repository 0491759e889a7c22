//! The export boundary's one error type: a kind the caller acts on, a message for the
//! client, and the underlying cause for the log. The HTTP status is chosen from the kind
//! in `http/error.rs` only.

use serde::{Deserialize, Serialize};

use crate::sink::SinkError;
use crate::store::StoreError;

/// What went wrong, as far as a caller can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportErrorKind {
    /// The request cannot be honoured as written.
    InvalidRequest,
    /// The job, file, Group or patient named does not exist.
    NotFound,
    /// Too many exports are queued, running or kept; retry later.
    TooManyJobs,
    /// The exports kept use up their storage quota, or the destination ran out of space.
    InsufficientStorage,
    /// The destination did not answer in time or refused the connection.
    DestinationUnavailable,
    /// The destination answered with a failure (permissions, missing container, full disk).
    Destination,
    /// Reading or writing the store failed.
    Store,
    /// The store is repairing a failed write and refuses writes for a moment; retry.
    StoreRecovering,
    /// The job was cancelled or the engine is stopping.
    Cancelled,
    /// The job made no progress for longer than `--job-timeout`.
    TimedOut,
}

/// An export failure: its kind, a message fit for a client that already names its cause
/// once, and the cause itself (kept out of `source()` so that error chains do not repeat
/// it; [`ExportError::detail`] shows it for logs).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    kind: ExportErrorKind,
    message: String,
    cause: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ExportError {
    pub fn new(kind: ExportErrorKind, message: impl Into<String>) -> ExportError {
        ExportError {
            kind,
            message: message.into(),
            cause: None,
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> ExportError {
        ExportError::new(ExportErrorKind::InvalidRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> ExportError {
        ExportError::new(ExportErrorKind::NotFound, message)
    }

    pub fn cancelled() -> ExportError {
        ExportError::new(ExportErrorKind::Cancelled, "the export was cancelled")
    }

    pub fn kind(&self) -> ExportErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message for the operator, who may see where storage is: a storage failure's
    /// own line naming the destination and its root cause, else the client message.
    pub fn operator_message(&self) -> String {
        match self
            .cause
            .as_deref()
            .and_then(|cause| cause.downcast_ref::<SinkError>())
        {
            Some(sink_error) => sink_error.to_string(),
            None => self.message.clone(),
        }
    }

    /// The message with the whole chain of causes, for logs.
    pub fn detail(&self) -> String {
        match self
            .cause
            .as_deref()
            .and_then(|cause| cause.downcast_ref::<SinkError>())
        {
            Some(sink_error) => sink_error.detail(),
            None => match &self.cause {
                Some(cause) => format!("{} [{cause}]", self.message),
                None => self.message.clone(),
            },
        }
    }

    /// Whether retrying from the last checkpoint may succeed.
    pub fn is_transient_destination_failure(&self) -> bool {
        self.cause
            .as_deref()
            .and_then(|cause| cause.downcast_ref::<SinkError>())
            .is_some_and(SinkError::is_transient)
    }
}

impl From<StoreError> for ExportError {
    fn from(error: StoreError) -> Self {
        let (kind, message) = match &error {
            StoreError::OutOfSpace => (
                ExportErrorKind::InsufficientStorage,
                format!("the export's state cannot be saved: {error}"),
            ),
            StoreError::Recovering => (
                ExportErrorKind::StoreRecovering,
                format!("the export's state cannot be saved now: {error}"),
            ),
            _ => (
                ExportErrorKind::Store,
                "reading the store failed; the server log has the details".to_owned(),
            ),
        };
        ExportError {
            kind,
            message,
            cause: Some(Box::new(error)),
        }
    }
}

impl From<SinkError> for ExportError {
    fn from(error: SinkError) -> Self {
        let kind = match &error {
            SinkError::ContainerMissing { .. } => ExportErrorKind::InvalidRequest,
            _ if error.is_out_of_space() => ExportErrorKind::InsufficientStorage,
            _ if error.is_transient() => ExportErrorKind::DestinationUnavailable,
            _ => ExportErrorKind::Destination,
        };
        ExportError {
            kind,
            message: error.client_message(),
            cause: Some(Box::new(error)),
        }
    }
}
