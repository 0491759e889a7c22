//! OperationOutcome: the body of every FHIR error response and of export error files.

use serde_json::{Value, json};

/// How bad an issue is (FHIR `IssueSeverity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueSeverity {
    Fatal,
    Error,
    Warning,
    Information,
}

/// What kind of issue it is (the subset of FHIR `IssueType` this server reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueKind {
    Invalid,
    Structure,
    Required,
    Value,
    NotFound,
    Deleted,
    Conflict,
    TooLong,
    NotSupported,
    Throttled,
    Timeout,
    Processing,
    Exception,
    Transient,
    TooCostly,
    Informational,
    Login,
    Forbidden,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: IssueSeverity,
    pub kind: IssueKind,
    pub diagnostics: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperationOutcome {
    pub issues: Vec<Issue>,
}

impl IssueSeverity {
    pub fn code(self) -> &'static str {
        match self {
            IssueSeverity::Fatal => "fatal",
            IssueSeverity::Error => "error",
            IssueSeverity::Warning => "warning",
            IssueSeverity::Information => "information",
        }
    }
}

impl IssueKind {
    pub fn code(self) -> &'static str {
        match self {
            IssueKind::Invalid => "invalid",
            IssueKind::Structure => "structure",
            IssueKind::Required => "required",
            IssueKind::Value => "value",
            IssueKind::NotFound => "not-found",
            IssueKind::Deleted => "deleted",
            IssueKind::Conflict => "conflict",
            IssueKind::TooLong => "too-long",
            IssueKind::NotSupported => "not-supported",
            IssueKind::Throttled => "throttled",
            IssueKind::Timeout => "timeout",
            IssueKind::Processing => "processing",
            IssueKind::Exception => "exception",
            IssueKind::Transient => "transient",
            IssueKind::TooCostly => "too-costly",
            IssueKind::Informational => "informational",
            IssueKind::Login => "login",
            IssueKind::Forbidden => "forbidden",
        }
    }
}

impl OperationOutcome {
    /// An outcome with one error-severity issue.
    pub fn error(kind: IssueKind, diagnostics: impl Into<String>) -> OperationOutcome {
        OperationOutcome::single(IssueSeverity::Error, kind, diagnostics)
    }

    pub fn single(
        severity: IssueSeverity,
        kind: IssueKind,
        diagnostics: impl Into<String>,
    ) -> OperationOutcome {
        OperationOutcome {
            issues: vec![Issue {
                severity,
                kind,
                diagnostics: diagnostics.into(),
            }],
        }
    }

    pub fn to_json(&self) -> Value {
        let issues: Vec<Value> = self
            .issues
            .iter()
            .map(|issue| {
                json!({
                    "severity": issue.severity.code(),
                    "code": issue.kind.code(),
                    "diagnostics": issue.diagnostics,
                })
            })
            .collect();
        json!({ "resourceType": "OperationOutcome", "issue": issues })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_fhir_operation_outcome() {
        let outcome = OperationOutcome::error(IssueKind::NotFound, "Patient/x is not known");
        assert_eq!(
            outcome.to_json(),
            json!({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-found", "diagnostics": "Patient/x is not known"}
            ]})
        );
    }
}
