//! The one error shape of the ops server's API and protected routes:
//! `{"error":{"code":..,"message":..}}`. Client errors say what to fix; server errors are logged
//! with their cause and answered with a generic message, never with database or FHIR-server
//! text.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::sync::{self, SyncError};

/// Why an API request failed. Client errors say what to fix; server errors are logged with
/// their cause and answered with a generic message.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A query or path parameter is malformed; the message starts with its name.
    #[error("{parameter}: {message}")]
    InvalidParameter {
        parameter: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    /// The request is understood but the job or run is not in a state that allows it.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("this endpoint needs the API token: Authorization: Bearer <token>")]
    Unauthorized,
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("sync error")]
    Sync(#[from] SyncError),
}

impl ApiError {
    pub(crate) fn invalid(parameter: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidParameter {
            parameter,
            message: message.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Database(e) | ApiError::Sync(SyncError::Database(e))
                if database_unavailable(e) =>
            {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Database(_) | ApiError::Sync(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidParameter { .. } => "invalid_parameter",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::Database(_) | ApiError::Sync(_) => "internal",
        }
    }
}

/// Whether the database could not be reached at all (retry later) rather than refusing a
/// statement (a bug or a schema problem).
pub(crate) fn database_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
    ) || e
        .as_database_error()
        .and_then(|d| d.code())
        // 08: connection exceptions; 57P0x: the server is shutting down or starting.
        .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0"))
}

/// The body of every error answer.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            ApiError::Database(_) | ApiError::Sync(_) => {
                // The cause may quote SQL, a row or a FHIR server's words: it goes to the log,
                // never to the client.
                tracing::error!(error = %sync::error_chain(&self), "ops API request failed");
                "internal error; see the server log".to_string()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
            },
        };
        (self.status(), Json(body)).into_response()
    }
}
