//! FHIR Bulk Data `$export`: kick-off, status checks, the completion manifest and file
//! downloads. One request per call for the kick-off and the status (the run's queued steps
//! pace and retry them); manifest pages are retried here.
//!
//! This module (with `smart`) is the only code that talks HTTP to a FHIR server. It hands file
//! bodies out as responses to stream and never buffers a whole file; it knows nothing of the
//! database.
//! The bearer token goes to the FHIR server's own origin, and to file URLs only when the
//! manifest says `requiresAccessToken`.

mod client;
mod manifest;

pub(crate) use client::retry_after;
pub use client::{BulkClient, ExportRequest, KickOff, PollPolicy, RetryPolicy, StatusCheck};
pub use manifest::{Manifest, ManifestFile};

use crate::smart::AuthError;

/// Why an export step failed. Each variant says whether trying again later can help.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the server refused the export (HTTP {status}): {diagnostics}")]
    Refused { status: u16, diagnostics: String },
    #[error("the export failed on the server (HTTP {status}): {diagnostics}")]
    Failed { status: u16, diagnostics: String },
    #[error("{context}: HTTP {status}")]
    Status { context: &'static str, status: u16 },
    #[error("{context}: the access token was refused again after renewing it")]
    Unauthorized { context: &'static str },
    #[error("{context}: request failed")]
    Transport {
        context: &'static str,
        source: reqwest::Error,
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
    #[error("file download: HTTP {status}")]
    FileStatus {
        status: u16,
        retry_after: Option<std::time::Duration>,
    },
    /// A file link no longer works (404/410): the export's files expired or the link did.
    #[error("file download: HTTP {status}, the file link has expired")]
    Expired { status: u16 },
    #[error("the file is larger than sync.max_file_bytes ({limit} bytes)")]
    TooLarge { limit: u64 },
    /// The file arrived slower than the minimum over a window (a server that trickles).
    #[error(
        "the download was slower than sync.min_download_bytes_per_second ({minimum} bytes/s over {window_seconds} s)"
    )]
    TooSlow { minimum: u64, window_seconds: u64 },
}

impl ExportError {
    /// Retryable failures may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            ExportError::Auth(e) => e.is_retryable(),
            ExportError::Status { status, .. } => *status == 429 || *status >= 500,
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

/// The `diagnostics` (or `details.text`) of an OperationOutcome body, for error messages.
/// Falls back to a short excerpt of whatever the server sent.
pub(crate) fn outcome_text(body: &[u8]) -> String {
    if let Ok(outcome) = serde_json::from_slice::<serde_json::Value>(body) {
        let texts: Vec<&str> = outcome["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|issue| {
                issue["diagnostics"]
                    .as_str()
                    .or_else(|| issue["details"]["text"].as_str())
            })
            .collect();
        if !texts.is_empty() {
            return texts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let excerpt: String = text.chars().take(300).collect();
    if excerpt.trim().is_empty() {
        "no details given".into()
    } else {
        excerpt
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
    fn outcome_text_prefers_diagnostics() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"bad _type"},{"code":"x","details":{"text":"also this"}}]}"#;
        assert_eq!(outcome_text(body), "bad _type; also this");
        assert_eq!(outcome_text(b"<html>oops</html>"), "<html>oops</html>");
        assert_eq!(outcome_text(b""), "no details given");
    }

    #[test]
    fn transient_outcomes() {
        assert!(outcome_is_transient(br#"{"issue":[{"code":"transient"}]}"#));
        assert!(!outcome_is_transient(
            br#"{"issue":[{"code":"transient"},{"code":"exception"}]}"#
        ));
        assert!(!outcome_is_transient(b"not json"));
    }
}
