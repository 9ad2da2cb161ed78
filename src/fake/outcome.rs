//! FHIR error responses: an `OperationOutcome` body with `application/fhir+json`, the way the
//! Bulk Data spec requires servers to report failed requests.
//!
//! Diagnostics name what was wrong with the request (a header, a parameter) so that client tests
//! can assert on them; they must never echo header values, which could be credentials.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub(crate) const FHIR_JSON: &str = "application/fhir+json";

/// A response whose body is an OperationOutcome with one issue.
pub(crate) fn operation_outcome(
    status: StatusCode,
    severity: &str,
    code: &str,
    diagnostics: &str,
) -> Response {
    let body = json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }],
    });
    fhir_json(status, body.to_string())
}

/// An error OperationOutcome, the common case.
pub(crate) fn error(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    operation_outcome(status, "error", code, diagnostics)
}

/// The 429 a server that runs one export at a time per client answers a second kick-off with
/// (`Retry-After: 0`: the client may try again as soon as it deleted the first).
pub(crate) fn export_in_progress() -> Response {
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        "too-costly",
        "an export for this client is already in progress; delete it before starting another",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(0));
    response
}

/// A body with `Content-Type: application/fhir+json`.
pub(crate) fn fhir_json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body,
    )
        .into_response()
}
