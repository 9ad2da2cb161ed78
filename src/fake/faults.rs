//! Scripted export faults for the fake FHIR server: what a test asks the server to get wrong,
//! and the counters that make each fault fire exactly as often as asked.
//!
//! A test builds a [`Faults`] value (`Faults::default().status_429(3).file_500_once()`) and puts
//! it in `FakeOptions::faults`; the export handlers consult [`FaultState`] (inside the server's
//! one mutex) before answering. Faults are counted per server, not per export, so "the first
//! three status polls" means the first three the server sees. Nothing here sleeps or depends on
//! timing: every fault is triggered by a request count.

/// What the export endpoints should get wrong. Every count is "the first n requests of that kind".
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Kick-off requests answered 429 with `Retry-After: 0`.
    pub kick_off_429: u32,
    /// Kick-off requests answered 503 with a transient OperationOutcome.
    pub kick_off_503: u32,
    /// Status polls answered 429 with `Retry-After: 0`.
    pub status_429: u32,
    /// The `Retry-After` of the status polls' 429s, in seconds (0 unless set).
    pub status_429_retry_after_seconds: u64,
    /// Kick-off requests answered 500 with a fatal OperationOutcome (`issue.code` = `exception`).
    pub kick_off_500_outcome: u32,
    /// Status polls answered 500 with a transient OperationOutcome (`issue.code` = `transient`).
    pub status_transient: u32,
    /// Every status poll fails with a fatal OperationOutcome carrying this text.
    pub status_fatal: Option<String>,
    /// In-progress polls send `Retry-After` as an HTTP-date instead of seconds.
    pub retry_after_http_date: bool,
    /// File downloads answered 429 with `Retry-After: 0`.
    pub file_429: u32,
    /// File downloads answered 500.
    pub file_500: u32,
    /// File downloads that send about half the file and then cut the connection.
    pub truncate_file: u32,
    /// File downloads that send their first chunk and then one byte every 100 ms, forever (a
    /// server that trickles).
    pub trickle_file: u32,
    /// File URLs differ only in their query string: `.../bulkfiles/{id}/data?part={name}`.
    pub query_string_parts: bool,
    /// File downloads answered 410 Gone; each one also invalidates every file link handed out
    /// so far, as expiring presigned URLs do, so the client must fetch the manifest again.
    pub expire_files: u32,
    /// Manifests list one error file of OperationOutcomes (one per exported type).
    pub error_file: bool,
    /// Manifests list one `deleted` file: a Bundle of this many `DELETE Patient/deleted-N`
    /// entries (ids that are not in the data set, so a test can plant rows for them first).
    pub deleted_resources: u32,
    /// Manifest file URLs are relative (`../bulkfiles/...`), resolved against the status URL.
    pub relative_urls: bool,
    /// Manifests list at most this many output files per page and link the rest with `next`.
    pub manifest_page_size: Option<usize>,
    /// The manifest's `requiresAccessToken` is the string "true" rather than a boolean.
    pub requires_access_token_as_string: bool,
    /// Files are sent with `Content-Encoding: gzip` when the client accepts it.
    pub gzip: bool,
    /// Files are sent with `Content-Encoding: deflate` when the client accepts it (and gzip is off).
    pub deflate: bool,
    /// Files honour `Range: bytes=N-` with 206 Partial Content.
    pub range: bool,
    /// Only one export at a time per client: a kick-off while one is not yet deleted is
    /// answered 429 with an OperationOutcome saying so (as Epic does).
    pub one_export_at_a_time: bool,
    /// Hostile files: manifests list one more output file per entry, of the entry's type, and
    /// serve it with exactly the entry's bytes (a byte-order mark, invalid UTF-8, lines that
    /// PostgreSQL refuses, whatever the test scripts).
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// Manifests list a `deleted` file served with exactly these bytes.
    pub deleted_body: Option<Vec<u8>>,
    /// Every kick-off is answered with this status, `Content-Type` and body.
    pub kick_off_answer: Option<(u16, String, Vec<u8>)>,
    /// Manifests carry an extra field of this many bytes (a bloated or hostile manifest).
    pub manifest_padding_bytes: usize,
    /// Discovery (both documents) advertises this token endpoint instead of the fake's own.
    pub advertised_token_endpoint: Option<String>,
    /// Manifests list one more output file per entry at exactly this URL, wherever it points
    /// (another port of this machine, an internal address): (type, url).
    pub foreign_files: Vec<(String, String)>,
    /// Token requests answered `307 Temporary Redirect` to the fake's own token endpoint
    /// (a client that follows would re-send its assertion or secret).
    pub token_redirects: u32,
    /// The export kicked off `n`-th (1-based; 0: none) moves its first `files` output files
    /// to `error[]`, one OperationOutcome file each ("Failed to export ..."), as the reference
    /// server does when file generation fails: the manifest completes, the data is missing.
    pub failed_files_in_export: (u32, usize),
    /// A Group id the server does not know is exported as an empty group (a manifest with no
    /// files), as the reference server does, instead of answered 404.
    pub unknown_groups_empty: bool,
    /// Every `DELETE` of an export is answered with this status (403, 405: a server that never
    /// lets a client delete its exports), and the export stays.
    pub delete_status: Option<u16>,
}

impl Faults {
    pub fn kick_off_429(mut self, n: u32) -> Self {
        self.kick_off_429 = n;
        self
    }
    pub fn kick_off_503(mut self, n: u32) -> Self {
        self.kick_off_503 = n;
        self
    }
    pub fn status_429(mut self, n: u32) -> Self {
        self.status_429 = n;
        self
    }
    /// Status polls answered 429 with `Retry-After: seconds`.
    pub fn status_429_retry_after(mut self, n: u32, seconds: u64) -> Self {
        self.status_429 = n;
        self.status_429_retry_after_seconds = seconds;
        self
    }
    pub fn kick_off_500_outcome(mut self, n: u32) -> Self {
        self.kick_off_500_outcome = n;
        self
    }
    pub fn trickle_file(mut self, n: u32) -> Self {
        self.trickle_file = n;
        self
    }
    pub fn query_string_parts(mut self) -> Self {
        self.query_string_parts = true;
        self
    }
    pub fn status_transient(mut self, n: u32) -> Self {
        self.status_transient = n;
        self
    }
    pub fn status_fatal(mut self, diagnostics: &str) -> Self {
        self.status_fatal = Some(diagnostics.to_string());
        self
    }
    pub fn retry_after_http_date(mut self) -> Self {
        self.retry_after_http_date = true;
        self
    }
    pub fn file_429(mut self, n: u32) -> Self {
        self.file_429 = n;
        self
    }
    pub fn file_500_once(mut self) -> Self {
        self.file_500 = 1;
        self
    }
    pub fn truncate_file(mut self, n: u32) -> Self {
        self.truncate_file = n;
        self
    }
    pub fn expire_files(mut self, n: u32) -> Self {
        self.expire_files = n;
        self
    }
    pub fn error_file(mut self) -> Self {
        self.error_file = true;
        self
    }
    pub fn deleted_resources(mut self, n: u32) -> Self {
        self.deleted_resources = n;
        self
    }
    pub fn relative_urls(mut self) -> Self {
        self.relative_urls = true;
        self
    }
    pub fn manifest_page_size(mut self, files: usize) -> Self {
        self.manifest_page_size = Some(files.max(1));
        self
    }
    pub fn requires_access_token_as_string(mut self) -> Self {
        self.requires_access_token_as_string = true;
        self
    }
    pub fn gzip(mut self) -> Self {
        self.gzip = true;
        self
    }
    pub fn deflate(mut self) -> Self {
        self.deflate = true;
        self
    }
    pub fn range(mut self) -> Self {
        self.range = true;
        self
    }
    pub fn one_export_at_a_time(mut self) -> Self {
        self.one_export_at_a_time = true;
        self
    }
    pub fn extra_file(mut self, resource_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.extra_files
            .push((resource_type.to_string(), body.into()));
        self
    }
    pub fn deleted_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.deleted_body = Some(body.into());
        self
    }
    pub fn kick_off_answer(
        mut self,
        status: u16,
        content_type: &str,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        self.kick_off_answer = Some((status, content_type.to_string(), body.into()));
        self
    }
    pub fn manifest_padding_bytes(mut self, bytes: usize) -> Self {
        self.manifest_padding_bytes = bytes;
        self
    }
    pub fn advertised_token_endpoint(mut self, url: &str) -> Self {
        self.advertised_token_endpoint = Some(url.to_string());
        self
    }
    pub fn foreign_file(mut self, resource_type: &str, url: &str) -> Self {
        self.foreign_files
            .push((resource_type.to_string(), url.to_string()));
        self
    }
    pub fn token_redirects(mut self, n: u32) -> Self {
        self.token_redirects = n;
        self
    }
    /// The `nth` export (1-based) moves its first `files` output files to `error[]`.
    pub fn failed_files_in_export(mut self, nth: u32, files: usize) -> Self {
        self.failed_files_in_export = (nth, files);
        self
    }
    pub fn unknown_groups_empty(mut self) -> Self {
        self.unknown_groups_empty = true;
        self
    }
    /// Every export `DELETE` is answered `status`.
    pub fn delete_status(mut self, status: u16) -> Self {
        self.delete_status = Some(status);
        self
    }
}

/// How many times each fault has fired, and the file-connection gauge.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    pub(crate) kick_off_429: u32,
    pub(crate) kick_off_503: u32,
    pub(crate) kick_off_500_outcome: u32,
    pub(crate) status_429: u32,
    pub(crate) status_transient: u32,
    pub(crate) file_429: u32,
    pub(crate) file_500: u32,
    pub(crate) truncate_file: u32,
    pub(crate) trickle_file: u32,
    pub(crate) expire_files: u32,
    pub(crate) token_redirects: u32,
    /// Exports accepted so far (for `failed_files_in_export`).
    pub(crate) exports_started: u32,
    /// Bumped by each expiry; file links carry it and stale ones are answered 410.
    pub(crate) link_generation: u32,
    /// File bodies being streamed right now, and the most ever streamed at once.
    pub(crate) open_files: usize,
    pub(crate) max_open_files: usize,
    /// File bodies sent gzip-compressed.
    pub(crate) gzipped_files: usize,
    /// File bodies sent deflate-compressed.
    pub(crate) deflated_files: usize,
}

/// Takes one firing of a fault whose budget is `limit`: true while `used < limit`.
pub(crate) fn take(used: &mut u32, limit: u32) -> bool {
    if *used < limit {
        *used += 1;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_fires_exactly_its_budget() {
        let mut used = 0;
        let fired: Vec<bool> = (0..4).map(|_| take(&mut used, 2)).collect();
        assert_eq!(fired, [true, true, false, false]);
        let mut none = 0;
        assert!(!take(&mut none, 0));
    }
}
