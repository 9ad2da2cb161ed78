//! FHIR Bulk Data `$export`: kick-off, status checks, the completion manifest and file
//! downloads. One request per call for the kick-off and the status (the run's queued steps
//! pace and retry them); manifest pages are retried here.
//!
//! This module (with `smart`) is the only code that talks HTTP to a FHIR server. It hands file
//! bodies out as responses to stream and never buffers a whole file; it knows nothing of the
//! database. The bearer token goes to the FHIR server's own origin, and to a file on another
//! origin only when the manifest says `requiresAccessToken` and the job lists the origin in
//! `fhir.file_origins`. Every body it reads goes through `transport::read_capped`.

mod client;
mod manifest;

pub(crate) use client::retry_after;
pub use client::{
    BulkClient, ExportRequest, KickOff, ManifestLimits, PollPolicy, RetryPolicy, StatusCheck,
};
pub use manifest::{Manifest, ManifestFile};

use crate::smart::AuthError;

/// Why an export step failed. Each variant says whether trying again later can help.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the server refused the export (HTTP {status}): {diagnostics}")]
    Refused { status: u16, diagnostics: String },
    #[error("{context} at {at}: the export failed on the server: HTTP {status}: {diagnostics}")]
    Failed {
        context: &'static str,
        at: String,
        status: u16,
        diagnostics: String,
    },
    #[error("{context}: HTTP {status}")]
    Status { context: &'static str, status: u16 },
    /// A 429 or 5xx that outlasted every retry, with what the server said.
    #[error("{context} at {at}: HTTP {status}: {said}")]
    Unavailable {
        context: &'static str,
        at: String,
        status: u16,
        said: String,
    },
    #[error(
        "{context} at {at}: HTTP 401, the access token was refused again after renewing it: {said}"
    )]
    Unauthorized {
        context: &'static str,
        at: String,
        said: String,
    },
    /// No response: DNS, connection, TLS, timeout or a body that broke off (`cause` says
    /// which, from [`transport::failure`](crate::transport::failure)).
    #[error("{context} at {at}: {cause}")]
    Transport {
        context: &'static str,
        at: String,
        cause: String,
    },
    #[error("{0}")]
    BadResponse(String),
    #[error("{0}")]
    Policy(String),
    #[error("the export was not ready after {seconds} s (export.timeout_seconds)")]
    TimedOut { seconds: u64 },
    /// The server refuses to start an export because one is already running for this client.
    #[error(
        "the server is busy with another export (HTTP {status}): {diagnostics}; hint: cancel the other export with `fhir-sync cancel <run>` or wait for it to finish"
    )]
    Busy { status: u16, diagnostics: String },
    /// A file download was answered with an error status; `retry_after` is the server's hint.
    #[error("file download at {at}: HTTP {status}: {said}")]
    FileStatus {
        status: u16,
        retry_after: Option<std::time::Duration>,
        at: String,
        said: String,
    },
    /// A file link no longer works (404/410): the export's files expired or the link did.
    #[error("file download at {at}: HTTP {status}, the file link has expired: {said}")]
    Expired {
        status: u16,
        at: String,
        said: String,
    },
    #[error("the file is larger than sync.max_file_bytes ({limit} bytes)")]
    TooLarge { limit: u64 },
    /// The file arrived slower than the minimum over a window (a server that trickles).
    #[error(
        "the download was slower than sync.min_download_bytes_per_second ({minimum} bytes/s over {window_seconds} s)"
    )]
    TooSlow { minimum: u64, window_seconds: u64 },
}

impl ExportError {
    /// The status of a refusal that asking again will not change: the server does not allow
    /// this request at all (403 Forbidden, 405 Method Not Allowed, 501 Not Implemented), as
    /// servers that never let a client delete its exports answer a `DELETE`.
    pub fn refused_for_good(&self) -> Option<u16> {
        match self {
            ExportError::Status { status, .. }
            | ExportError::Refused { status, .. }
            | ExportError::Failed { status, .. }
                if matches!(status, 403 | 405 | 501) =>
            {
                Some(*status)
            }
            _ => None,
        }
    }

    /// Retryable failures may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            ExportError::Auth(e) => e.is_retryable(),
            ExportError::Status { status, .. } | ExportError::Unavailable { status, .. } => {
                *status == 429 || *status >= 500
            }
            ExportError::FileStatus { status, .. } => *status == 429 || *status >= 500,
            ExportError::Transport { .. }
            | ExportError::TimedOut { .. }
            | ExportError::Busy { .. }
            | ExportError::TooSlow { .. }
            | ExportError::Expired { .. } => true,
            ExportError::Refused { .. }
            | ExportError::Failed { .. }
            | ExportError::Unauthorized { .. }
            | ExportError::BadResponse(_)
            | ExportError::Policy(_)
            | ExportError::TooLarge { .. } => false,
        }
    }
}

/// Whether an OperationOutcome reports only transient issues (worth polling again).
pub(crate) fn outcome_is_transient(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|outcome| {
        outcome["issue"].as_array().is_some_and(|issues| {
            !issues.is_empty() && issues.iter().all(|i| i["code"] == "transient")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_outcomes() {
        assert!(outcome_is_transient(br#"{"issue":[{"code":"transient"}]}"#));
        assert!(!outcome_is_transient(
            br#"{"issue":[{"code":"transient"},{"code":"exception"}]}"#
        ));
        assert!(!outcome_is_transient(b"not json"));
    }

    #[test]
    fn only_a_refusal_asking_again_cannot_change_is_for_good() {
        let status = |status| ExportError::Status {
            context: "export delete",
            status,
        };
        for (error, for_good) in [
            (status(405), Some(405)),
            (status(403), Some(403)),
            (status(501), Some(501)),
            (status(500), None),
            (status(429), None),
            (status(400), None),
        ] {
            assert_eq!(error.refused_for_good(), for_good, "{error}");
        }
    }
}
