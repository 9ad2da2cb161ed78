//! The `$export` HTTP client: kick-off (GET or POST), status checks, paged manifests,
//! downloads and the final DELETE.
//!
//! The kick-off and each status check are one request: the run's steps retry and pace them
//! (see `sync::policy`). Manifest pages and manifest refreshes retry what a server says is
//! temporary (429, 5xx, dropped connections) with the one backoff and count every retry so the
//! run record can show them; nothing retries a 4xx refusal. File bodies are handed out as
//! responses, never read here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, CONTENT_LOCATION, CONTENT_TYPE, EXPIRES, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode};
use serde_json::json;
use url::Url;

use super::{ExportError, Manifest, ManifestFile, outcome_is_transient};
use crate::config::{ExportConfig, ExportLevel, ExportMethod, TypeEncoding};
use crate::metrics::{self, Endpoint};
use crate::smart::TokenManager;
use crate::transport;

/// What to export: the level and every kick-off parameter.
#[derive(Debug, Clone, Default)]
pub struct ExportRequest {
    pub level: ExportLevel,
    pub group_id: Option<String>,
    pub types: Vec<String>,
    /// One comma-joined `_type` (default) or one per type.
    pub type_encoding: TypeEncoding,
    /// Sent as `_since` exactly as given (a previous manifest's `transactionTime`).
    pub since: Option<String>,
    pub until: Option<String>,
    pub output_format: Option<String>,
    pub elements: Vec<String>,
    pub type_filters: Vec<String>,
    /// `Patient/<id>` references; only sent in a POST body.
    pub patients: Vec<String>,
    pub include_associated_data: Vec<String>,
    /// Vendor parameters, sent after the standard ones.
    pub extra_params: Vec<(String, String)>,
    pub method: ExportMethod,
    /// Adds `handling=lenient` to `Prefer`.
    pub lenient: bool,
}

impl ExportRequest {
    /// The request a job's `[export]` section describes.
    pub fn from_config(export: &ExportConfig) -> ExportRequest {
        ExportRequest {
            level: export.level,
            group_id: export.group_id.clone(),
            types: export.types.clone(),
            type_encoding: export.type_encoding,
            since: export.since.clone(),
            until: export.until.clone(),
            output_format: export.output_format.clone(),
            elements: export.elements.clone(),
            type_filters: export.type_filters.clone(),
            patients: export.patients.clone(),
            include_associated_data: export.include_associated_data.clone(),
            extra_params: export
                .extra_params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            method: export.method,
            lenient: export.lenient,
        }
    }

    /// The kick-off parameters in order, not yet encoded: `_type` as one comma-joined value
    /// (Oracle refuses repeated `_type`) unless the job asks for `repeated`, `_elements` as one
    /// comma-joined value, `_typeFilter` and `patient` once per entry.
    pub fn params(&self) -> Vec<(String, String)> {
        let mut params: Vec<(String, String)> = Vec::new();
        let mut push = |name: &str, value: String| params.push((name.to_string(), value));
        match self.type_encoding {
            _ if self.types.is_empty() => {}
            TypeEncoding::Comma => push("_type", self.types.join(",")),
            TypeEncoding::Repeated => {
                for resource_type in &self.types {
                    push("_type", resource_type.clone());
                }
            }
        }
        if let Some(since) = &self.since {
            push("_since", since.clone());
        }
        if let Some(until) = &self.until {
            push("_until", until.clone());
        }
        if let Some(format) = &self.output_format {
            push("_outputFormat", format.clone());
        }
        if !self.elements.is_empty() {
            push("_elements", self.elements.join(","));
        }
        for filter in &self.type_filters {
            push("_typeFilter", filter.clone());
        }
        if !self.include_associated_data.is_empty() {
            push(
                "includeAssociatedData",
                self.include_associated_data.join(","),
            );
        }
        for patient in &self.patients {
            push("patient", patient.clone());
        }
        for (name, value) in &self.extra_params {
            push(name, value.clone());
        }
        params
    }

    /// The `Parameters` resource a POST kick-off sends.
    pub fn parameters_resource(&self) -> serde_json::Value {
        let parameter: Vec<serde_json::Value> = self
            .params()
            .into_iter()
            .map(|(name, value)| match name.as_str() {
                "patient" => json!({ "name": name, "valueReference": { "reference": value } }),
                "_since" | "_until" => json!({ "name": name, "valueInstant": value }),
                _ => json!({ "name": name, "valueString": value }),
            })
            .collect();
        json!({ "resourceType": "Parameters", "parameter": parameter })
    }

    fn prefer(&self) -> &'static str {
        if self.lenient {
            "respond-async, handling=lenient"
        } else {
            "respond-async"
        }
    }
}

/// How often and how patiently to retry a request the server says is temporary.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The first retry's delay; it doubles per retry, with jitter, up to five minutes.
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base_delay: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based): [`crate::backoff`]'s, the one rule.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        self.backoff().delay(retry, retry_after)
    }

    pub fn backoff(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::new(self.base_delay)
    }
}

/// A started export.
#[derive(Debug, Clone)]
pub struct KickOff {
    pub request_url: Url,
    pub status_url: Url,
}

/// How to pace status polls.
#[derive(Debug, Clone, Copy)]
pub struct PollPolicy {
    pub min_interval: Duration,
    pub max_interval: Duration,
    pub default_interval: Duration,
    pub timeout: Duration,
}

/// What one status request found.
#[derive(Debug)]
pub enum StatusCheck {
    /// 202: not ready; `retry_after` is the server's `Retry-After`, if it sent one.
    InProgress {
        progress: Option<String>,
        retry_after: Option<Duration>,
    },
    /// 200: the manifest.
    Complete(Manifest),
    /// 429, a 5xx, or a transient OperationOutcome: poll again later.
    Transient {
        status: u16,
        retry_after: Option<Duration>,
    },
}

/// Whether and why a request carries the bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bearer {
    /// No token (a file the manifest says needs none).
    None,
    /// The FHIR server's own endpoints: the token, but only on the base URL's origin.
    FhirOrigin,
    /// A file whose manifest says `requiresAccessToken`: the spec requires the token wherever
    /// the file is hosted.
    ManifestFile,
}

impl PollPolicy {
    /// The wait after a 202: the server's `Retry-After` (else the default interval), within
    /// the job's bounds.
    pub fn after_progress(&self, retry_after: Option<Duration>) -> Duration {
        retry_after
            .unwrap_or(self.default_interval)
            .clamp(self.min_interval, self.max_interval)
    }

    /// The wait after a 429: the server's `Retry-After` (else the default interval) and not
    /// less than the minimum, but never cut to the maximum interval: throttling is the
    /// server's word, bounded only by the export's deadline (the caller's cap).
    pub fn after_throttling(&self, retry_after: Option<Duration>) -> Duration {
        retry_after
            .unwrap_or(self.default_interval)
            .max(self.min_interval)
    }

    /// The wait after a transient failure (a bare 5xx, a transient OperationOutcome): the
    /// server's `Retry-After` within the job's bounds, else `backoff`, the retry policy's delay
    /// for this failure — never the poll interval doubled, which waits minutes for an export
    /// that is ready in seconds.
    pub fn after_failure(&self, retry_after: Option<Duration>, backoff: Duration) -> Duration {
        retry_after
            .unwrap_or(backoff)
            .clamp(self.min_interval, self.max_interval)
    }
}

/// A manifest with more pages than this is treated as a server loop.
const MAX_MANIFEST_PAGES: usize = 10_000;

/// Bounds on what a server's manifest may make fhir-sync hold.
#[derive(Debug, Clone, Copy)]
pub struct ManifestLimits {
    /// `sync.max_manifest_bytes`: the largest manifest body (each page of a paged one).
    pub max_manifest_bytes: usize,
    /// `sync.max_manifest_files`: the most files a manifest (all pages) may list.
    pub max_manifest_files: usize,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        ManifestLimits {
            max_manifest_bytes: 64 * 1024 * 1024,
            max_manifest_files: 100_000,
        }
    }
}

#[derive(Clone)]
pub struct BulkClient {
    http: reqwest::Client,
    base: Url,
    tokens: Arc<TokenManager>,
    allow_insecure_http: bool,
    retry: RetryPolicy,
    limits: ManifestLimits,
    /// Where files may come from and which origins besides the FHIR server's get the token.
    origins: transport::OriginPolicy,
    /// Requests repeated because the server or the network said "later" (kick-off, status,
    /// manifest pages); file retries are counted by the caller, which sees them.
    retries: Arc<AtomicU64>,
    /// `fhir.headers` (and the vendor's, such as `Epic-Client-ID`): sent to the FHIR server's
    /// own origin only, never to a file host elsewhere.
    headers: reqwest::header::HeaderMap,
}

impl BulkClient {
    pub fn new(
        http: reqwest::Client,
        base: Url,
        tokens: Arc<TokenManager>,
        allow_insecure_http: bool,
    ) -> Self {
        BulkClient {
            http,
            base: base.clone(),
            tokens,
            allow_insecure_http,
            retry: RetryPolicy::default(),
            limits: ManifestLimits::default(),
            origins: transport::OriginPolicy::for_job(&base, &[]),
            retries: Arc::new(AtomicU64::new(0)),
            headers: reqwest::header::HeaderMap::new(),
        }
    }

    /// Headers for every request to the FHIR server's origin. Names and values that are not
    /// valid in HTTP are skipped (config validation refuses them first).
    pub fn with_headers(mut self, headers: &std::collections::BTreeMap<String, String>) -> Self {
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_str(value),
            ) {
                self.headers.insert(name, value);
            }
        }
        self
    }

    /// The origins the job lists in `fhir.file_origins`.
    pub fn with_file_origins(mut self, origins: &[Url]) -> Self {
        self.origins = transport::OriginPolicy::for_job(&self.base, origins);
        self
    }

    /// Replaces the default manifest limits.
    pub fn with_manifest_limits(mut self, limits: ManifestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Replaces the default retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Counts this client's retries into `counter` (shared with the caller's own retries).
    pub fn with_retry_counter(mut self, counter: Arc<AtomicU64>) -> Self {
        self.retries = counter;
        self
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Requests this client has repeated so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// The job this client works for (its token manager's), the `job` label of its metrics.
    pub fn job(&self) -> &str {
        self.tokens.job()
    }

    fn count_retry(&self, endpoint: Endpoint) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        metrics::http_retry(self.job(), endpoint);
    }

    /// The kick-off URL for `request`. For GET it carries the parameters, form-encoded so that
    /// a `+` in a `_since` offset arrives as `%2B` rather than as a space; for POST the
    /// parameters go in the body and the URL has none.
    pub fn kick_off_url(&self, request: &ExportRequest) -> Url {
        let path = match (request.level, &request.group_id) {
            (ExportLevel::System, _) => "$export".to_string(),
            (ExportLevel::Patient, _) => "Patient/$export".to_string(),
            (ExportLevel::Group, Some(id)) => format!("Group/{id}/$export"),
            (ExportLevel::Group, None) => {
                unreachable!("config validation requires group_id for group exports")
            }
        };
        let mut url = transport::append_path(&self.base, &path);
        let params = request.params();
        if request.method == ExportMethod::Get && !params.is_empty() {
            let mut query = url.query_pairs_mut();
            for (name, value) in &params {
                query.append_pair(name, value);
            }
        }
        url
    }

    /// Starts an export and returns its status URL. One request: the run's kick-off step is
    /// the one place a refused kick-off is retried (retries must never multiply across
    /// layers). A 429 or 409 is [`ExportError::Busy`] (in practice an export already running
    /// for this client); a bare or transient 5xx is a retryable [`ExportError::Status`]; a 5xx
    /// whose OperationOutcome reports an error, and any other 4xx, are fatal with the
    /// server's diagnostics.
    pub async fn kick_off(&self, request: &ExportRequest) -> Result<KickOff, ExportError> {
        let request_url = self.kick_off_url(request);
        let context = "export kick-off";
        let method = match request.method {
            ExportMethod::Get => Method::GET,
            ExportMethod::Post => Method::POST,
        };
        let body = (request.method == ExportMethod::Post)
            .then(|| request.parameters_resource().to_string());
        let response = self
            .send(
                method,
                &request_url,
                Bearer::FhirOrigin,
                context,
                Endpoint::KickOff,
                |r| {
                    let r = r
                        .header(ACCEPT, "application/fhir+json")
                        .header("Prefer", request.prefer());
                    match &body {
                        Some(body) => r
                            .header(CONTENT_TYPE, "application/fhir+json")
                            .body(body.clone()),
                        None => r,
                    }
                },
            )
            .await?;
        let status = response.status();
        if status == StatusCode::ACCEPTED {
            let location = response
                .headers()
                .get(CONTENT_LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ExportError::BadResponse(
                        "the kick-off answered 202 without Content-Location".into(),
                    )
                })?;
            let status_url = request_url.join(location).map_err(|e| {
                ExportError::BadResponse(format!("Content-Location {location:?} is not a URL: {e}"))
            })?;
            return Ok(KickOff {
                request_url,
                status_url,
            });
        }
        // Bounded: an error body is read only as far as a diagnosis needs.
        let body = transport::error_body(response).await;
        let said = body.server_said();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::CONFLICT {
            return Err(ExportError::Busy {
                status: status.as_u16(),
                diagnostics: said,
            });
        }
        if status.is_client_error() {
            return Err(ExportError::Refused {
                status: status.as_u16(),
                diagnostics: said,
            });
        }
        // A server that says what failed ("File generation failed") will say it again; a bare
        // or transient 5xx is only unavailable for now, and the kick-off step retries it.
        if status.is_server_error() && !outcome_reports_an_error(&body.bytes) {
            return Err(ExportError::Unavailable {
                context: "export kick-off",
                at: transport::endpoint(&request_url),
                status: status.as_u16(),
                said,
            });
        }
        Err(ExportError::Failed {
            context: "export kick-off",
            at: transport::endpoint(&request_url),
            status: status.as_u16(),
            diagnostics: said,
        })
    }

    /// One status request, for callers that schedule their own polls (the queue's poll step).
    pub async fn check_status(&self, status_url: &Url) -> Result<StatusCheck, ExportError> {
        let context = "export status";
        let response = self
            .send(
                Method::GET,
                status_url,
                Bearer::FhirOrigin,
                context,
                Endpoint::Status,
                |r| r.header(ACCEPT, "application/json"),
            )
            .await?;
        let status = response.status();
        let retry_after = retry_after(&response);
        if status == StatusCode::OK {
            let expires = header_text(&response, EXPIRES);
            let body = self.read_manifest(response, context, status_url).await?;
            let mut manifest = Manifest::parse(&body, status_url)?;
            manifest.expires = expires;
            self.check_file_count(&manifest)?;
            self.follow_pages(&mut manifest, status_url).await?;
            return Ok(StatusCheck::Complete(manifest));
        }
        if status == StatusCode::ACCEPTED {
            let progress = response
                .headers()
                .get("x-progress")
                .and_then(|v| v.to_str().ok())
                // Shown in logs, progress bars, `runs show` and the page: one short line.
                .map(|v| crate::untrusted::one_line(v, transport::SERVER_TEXT_CHARS));
            return Ok(StatusCheck::InProgress {
                progress,
                retry_after,
            });
        }
        let body = transport::error_body(response).await;
        let transient = status == StatusCode::TOO_MANY_REQUESTS
            || (status.is_server_error()
                && (body.bytes.is_empty() || outcome_is_transient(&body.bytes)))
            || outcome_is_transient(&body.bytes);
        if transient {
            Ok(StatusCheck::Transient {
                status: status.as_u16(),
                retry_after,
            })
        } else {
            Err(ExportError::Failed {
                context,
                at: transport::endpoint(status_url),
                status: status.as_u16(),
                diagnostics: body.server_said(),
            })
        }
    }

    /// Fetches the manifest again from a finished export's status URL: the way to get fresh
    /// links after the old ones expired. Counted as a retry; a passing failure is tried again
    /// up to the policy's attempts.
    pub async fn refresh_manifest(&self, status_url: &Url) -> Result<Manifest, ExportError> {
        self.count_retry(Endpoint::Status);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let hinted = match self.check_status(status_url).await {
                Ok(StatusCheck::Complete(manifest)) => return Ok(manifest),
                Ok(StatusCheck::InProgress { retry_after, .. })
                | Ok(StatusCheck::Transient { retry_after, .. }) => retry_after,
                Err(e) if e.is_retryable() && attempt < self.retry.attempts => None,
                Err(e) => return Err(e),
            };
            if attempt >= self.retry.attempts {
                return Err(ExportError::BadResponse(
                    "the finished export's status URL no longer returns its manifest".into(),
                ));
            }
            self.count_retry(Endpoint::Status);
            tokio::time::sleep(self.retry.delay(attempt, hinted)).await;
        }
    }

    /// Appends the pages a manifest links with `next` (output, error and deleted lists).
    async fn follow_pages(
        &self,
        manifest: &mut Manifest,
        status_url: &Url,
    ) -> Result<(), ExportError> {
        let mut seen = 0usize;
        while let Some(next) = manifest.next.take() {
            seen += 1;
            if seen > MAX_MANIFEST_PAGES {
                return Err(ExportError::BadResponse(format!(
                    "the manifest has more than {MAX_MANIFEST_PAGES} pages; refusing to follow more"
                )));
            }
            let context = "export manifest page";
            let mut attempt = 0;
            let page = loop {
                attempt += 1;
                let result = self
                    .send(
                        Method::GET,
                        &next,
                        Bearer::FhirOrigin,
                        context,
                        Endpoint::Manifest,
                        |r| r.header(ACCEPT, "application/json"),
                    )
                    .await;
                let (status, hinted, response) = match result {
                    Ok(response) => {
                        let status = response.status();
                        let hinted = retry_after(&response);
                        (status, hinted, response)
                    }
                    Err(e) if e.is_retryable() && attempt < self.retry.attempts => {
                        self.count_retry(Endpoint::Manifest);
                        tokio::time::sleep(self.retry.delay(attempt, None)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if status == StatusCode::OK {
                    let body = self.read_manifest(response, context, &next).await?;
                    break Manifest::parse(&body, status_url)?;
                }
                if (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                    && attempt < self.retry.attempts
                {
                    self.count_retry(Endpoint::Manifest);
                    tokio::time::sleep(self.retry.delay(attempt, hinted)).await;
                    continue;
                }
                return Err(ExportError::Failed {
                    context,
                    at: transport::endpoint(&next),
                    status: status.as_u16(),
                    diagnostics: transport::error_body(response).await.server_said(),
                });
            };
            manifest.output.extend(page.output);
            manifest.error.extend(page.error);
            manifest.deleted.extend(page.deleted);
            manifest.next = page.next;
            self.check_file_count(manifest)?;
        }
        Ok(())
    }

    /// `GET [base]/Group/{id}`: the ids of the group's current members (`member.entity`
    /// references to Patients, members marked `inactive` left out). The body is read up to
    /// `sync.max_manifest_bytes`, like a manifest.
    pub async fn group_members(&self, group_id: &str) -> Result<Vec<String>, ExportError> {
        let context = "group read";
        let url = transport::append_path(&self.base, &format!("Group/{group_id}"));
        let response = self
            .send(
                Method::GET,
                &url,
                Bearer::FhirOrigin,
                context,
                Endpoint::Group,
                |r| r.header(ACCEPT, "application/fhir+json"),
            )
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(ExportError::Status {
                context,
                status: status.as_u16(),
            });
        }
        let body = self.read_manifest(response, context, &url).await?;
        group_member_ids(&body).ok_or_else(|| {
            ExportError::BadResponse(format!(
                "the Group at {} is not a FHIR Group resource",
                transport::endpoint(&url)
            ))
        })
    }

    /// Reads a manifest (or manifest page) body, refusing one over `sync.max_manifest_bytes`.
    async fn read_manifest(
        &self,
        response: Response,
        context: &'static str,
        url: &Url,
    ) -> Result<Vec<u8>, ExportError> {
        let body = transport::read_capped(response, self.limits.max_manifest_bytes)
            .await
            .map_err(|e| ExportError::Transport {
                context,
                at: transport::endpoint(url),
                cause: transport::failure(&e),
            })?;
        if !body.complete {
            return Err(ExportError::BadResponse(format!(
                "the export manifest at {} is larger than sync.max_manifest_bytes ({} bytes)",
                transport::endpoint(url),
                self.limits.max_manifest_bytes
            )));
        }
        Ok(body.bytes)
    }

    /// Refuses a manifest (so far, for a paged one) that lists more files than
    /// `sync.max_manifest_files`: each file becomes a row and a queued step.
    fn check_file_count(&self, manifest: &Manifest) -> Result<(), ExportError> {
        let files = manifest.output.len() + manifest.error.len() + manifest.deleted.len();
        if files > self.limits.max_manifest_files {
            return Err(ExportError::BadResponse(format!(
                "the export manifest lists more than {} files (sync.max_manifest_files); raise the setting or export fewer types",
                self.limits.max_manifest_files
            )));
        }
        Ok(())
    }

    /// Opens one output file for streaming, once (the caller retries). The body is not read
    /// here. 404/410 mean the link expired; 429/5xx carry the server's `Retry-After`.
    pub async fn open_file(
        &self,
        file: &ManifestFile,
        requires_access_token: bool,
    ) -> Result<Response, ExportError> {
        self.open_file_at(file, requires_access_token, None).await
    }

    /// Re-opens a file from byte `offset` with a `Range` request. Only a 206 whose
    /// `Content-Range` starts exactly at `offset` is accepted: anything else (a server that
    /// ignores `Range` and sends the whole file with 200) is an error, and the caller restarts
    /// the file from the beginning instead.
    pub async fn resume_file(
        &self,
        file: &ManifestFile,
        requires_access_token: bool,
        offset: u64,
    ) -> Result<Response, ExportError> {
        let response = self
            .open_file_at(file, requires_access_token, Some(offset))
            .await?;
        let starts_at_offset = response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|start| start.parse::<u64>().ok())
            == Some(offset);
        if response.status() == StatusCode::PARTIAL_CONTENT && starts_at_offset {
            Ok(response)
        } else {
            Err(ExportError::BadResponse(format!(
                "the server did not resume the file from byte {offset} (HTTP {})",
                response.status().as_u16()
            )))
        }
    }

    async fn open_file_at(
        &self,
        file: &ManifestFile,
        requires_access_token: bool,
        offset: Option<u64>,
    ) -> Result<Response, ExportError> {
        self.origins
            .check_fetch(&file.url, None, None, self.allow_insecure_http)
            .map_err(|m| {
                ExportError::Policy(format!("file {}: {m}", transport::redacted(&file.url)))
            })?;
        let context = "file download";
        let bearer = if requires_access_token {
            Bearer::ManifestFile
        } else {
            Bearer::None
        };
        let response = self
            .send(
                Method::GET,
                &file.url,
                bearer,
                context,
                Endpoint::File,
                |r| {
                    let r = r.header(ACCEPT, "application/fhir+ndjson");
                    match offset {
                        // Offsets count decoded bytes, so a resumed request must not be compressed.
                        Some(offset) => r
                            .header(reqwest::header::RANGE, format!("bytes={offset}-"))
                            .header(reqwest::header::ACCEPT_ENCODING, "identity"),
                        None => r,
                    }
                },
            )
            .await?;
        let status = response.status();
        if status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT {
            return Ok(response);
        }
        let at = transport::endpoint(&file.url);
        let hinted = retry_after(&response);
        let said = transport::error_body(response).await.server_said();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Err(ExportError::Expired {
                status: status.as_u16(),
                at,
                said,
            });
        }
        Err(ExportError::FileStatus {
            status: status.as_u16(),
            retry_after: hinted,
            at,
            said,
        })
    }

    /// Tells the server the export's files are no longer needed. 404/410 mean it is gone already.
    pub async fn delete(&self, status_url: &Url) -> Result<(), ExportError> {
        let context = "export delete";
        let response = self
            .send(
                Method::DELETE,
                status_url,
                Bearer::FhirOrigin,
                context,
                Endpoint::Delete,
                |r| r,
            )
            .await?;
        let status = response.status();
        if status.is_success() || status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            Ok(())
        } else {
            Err(ExportError::Status {
                context,
                status: status.as_u16(),
            })
        }
    }

    /// Sends a request, with the bearer token as `bearer` says; on a 401 renews the token once
    /// and retries once.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        bearer: Bearer,
        context: &'static str,
        endpoint: Endpoint,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Response, ExportError> {
        transport::check_url(url, self.allow_insecure_http).map_err(|m| {
            ExportError::Policy(format!("{context} at {}: {m}", transport::redacted(url)))
        })?;
        if bearer == Bearer::FhirOrigin && !transport::same_origin(url, &self.base) {
            return Err(ExportError::Policy(format!(
                "{context} URL {} is not on the FHIR server's origin; refusing to send it the access token",
                transport::redacted(url)
            )));
        }
        if bearer == Bearer::ManifestFile
            && !transport::same_origin(url, &self.base)
            && !self.origins.is_listed(url)
        {
            return Err(ExportError::Policy(format!(
                "file {} needs the access token (the manifest says requiresAccessToken), but the token goes to another origin than the FHIR server's only when fhir.file_origins lists it (hint: add \"{}\" to fhir.file_origins if that host is meant to have it)",
                transport::redacted(url),
                url.origin().ascii_serialization()
            )));
        }
        let mut token = if bearer != Bearer::None {
            Some(self.tokens.token().await?)
        } else {
            None
        };
        let mut renewed = false;
        loop {
            let mut request = build(self.http.request(method.clone(), url.clone()));
            if !self.headers.is_empty() && transport::same_origin(url, &self.base) {
                request = request.headers(self.headers.clone());
            }
            if let Some(value) = token.as_ref().and_then(|t| t.authorization()) {
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let started = Instant::now();
            let response = request.send().await;
            metrics::http_request(
                self.job(),
                endpoint,
                response.as_ref().ok().map(|r| r.status().as_u16()),
                started.elapsed(),
            );
            let response = response.map_err(|e| ExportError::Transport {
                context,
                at: transport::endpoint(url),
                cause: transport::failure(&e),
            })?;
            tracing::debug!(
                http.method = %method,
                http.url = %transport::redacted(url),
                http.status = response.status().as_u16(),
                "fhir request"
            );
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            match (&token, renewed) {
                (Some(refused), false) => {
                    token = Some(self.tokens.token_after_rejection(refused).await?);
                    renewed = true;
                    metrics::http_retry(self.job(), endpoint);
                }
                _ => {
                    return Err(ExportError::Unauthorized {
                        context,
                        at: transport::endpoint(url),
                        said: transport::error_body(response).await.server_said(),
                    });
                }
            }
        }
    }
}

fn header_text(response: &Response, name: reqwest::header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Whether a body is an OperationOutcome with an issue that is not `transient`: the server's
/// considered answer rather than a passing failure.
fn outcome_reports_an_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|outcome| {
        outcome["resourceType"] == "OperationOutcome"
            && outcome["issue"]
                .as_array()
                .is_some_and(|issues| issues.iter().any(|i| i["code"] != "transient"))
    })
}

/// `Retry-After` as delta-seconds or an HTTP-date.
pub(crate) fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The Patient ids of a Group resource's active members; `None` when the body is no Group.
fn group_member_ids(body: &[u8]) -> Option<Vec<String>> {
    let group: serde_json::Value = serde_json::from_slice(body).ok()?;
    if group.get("resourceType")?.as_str()? != "Group" {
        return None;
    }
    let members = match group.get("member") {
        None => return Some(Vec::new()),
        Some(members) => members.as_array()?,
    };
    Some(
        members
            .iter()
            .filter(|m| m.get("inactive").and_then(|v| v.as_bool()) != Some(true))
            .filter_map(|m| m.pointer("/entity/reference")?.as_str())
            .filter_map(|r| r.strip_prefix("Patient/"))
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(str::to_string)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_with_retry_after(value: &str) -> Response {
        let response = axum::http::Response::builder()
            .status(429)
            .header(RETRY_AFTER, value)
            .body(Vec::<u8>::new())
            .unwrap();
        Response::from(response)
    }

    #[test]
    fn retry_after_as_seconds_or_date() {
        assert_eq!(
            retry_after(&response_with_retry_after("120")),
            Some(Duration::from_secs(120))
        );
        let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
        let date = httpdate::fmt_http_date(in_an_hour);
        let wait = retry_after(&response_with_retry_after(&date)).unwrap();
        assert!(wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3600));
        assert_eq!(
            retry_after(&response_with_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(retry_after(&response_with_retry_after("soon")), None);
    }

    #[test]
    fn polls_honour_throttling_beyond_the_interval_and_back_off_on_failures() {
        let policy = PollPolicy {
            min_interval: Duration::from_millis(10),
            max_interval: Duration::from_secs(60),
            default_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(900),
        };
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(policy.after_progress(hour), Duration::from_secs(60));
        assert_eq!(policy.after_progress(None), Duration::from_secs(5));
        assert_eq!(policy.after_throttling(hour), Duration::from_secs(3600));
        assert_eq!(
            policy.after_throttling(Some(Duration::ZERO)),
            Duration::from_millis(10)
        );
        assert_eq!(
            policy.after_failure(None, Duration::from_secs(1)),
            Duration::from_secs(1),
            "the retry backoff, not the poll interval"
        );
        assert_eq!(
            policy.after_failure(hour, Duration::from_secs(1)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn an_outcome_with_an_error_issue_is_the_servers_answer() {
        assert!(outcome_reports_an_error(
            br#"{"resourceType":"OperationOutcome","issue":[{"code":"exception","diagnostics":"File generation failed"}]}"#
        ));
        assert!(!outcome_reports_an_error(
            br#"{"resourceType":"OperationOutcome","issue":[{"code":"transient"}]}"#
        ));
        assert!(!outcome_reports_an_error(b"<html>bad gateway</html>"));
        assert!(!outcome_reports_an_error(b""));
    }

    #[test]
    fn parameters_in_order_and_as_a_parameters_resource() {
        let request = ExportRequest {
            types: vec!["Patient".into(), "Observation".into()],
            since: Some("2024-01-01T00:00:00+02:00".into()),
            elements: vec!["id".into(), "meta".into()],
            type_filters: vec!["Observation?status=final".into()],
            patients: vec!["Patient/1".into()],
            extra_params: vec![("_mode".into(), "crawl".into())],
            lenient: true,
            ..ExportRequest::default()
        };
        let names: Vec<String> = request.params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "_type",
                "_since",
                "_elements",
                "_typeFilter",
                "patient",
                "_mode"
            ]
        );
        let resource = request.parameters_resource();
        assert_eq!(resource["resourceType"], "Parameters");
        assert_eq!(
            resource["parameter"][0]["valueString"],
            "Patient,Observation"
        );
        assert_eq!(
            resource["parameter"][1]["valueInstant"],
            "2024-01-01T00:00:00+02:00"
        );
        assert_eq!(
            resource["parameter"][4]["valueReference"]["reference"],
            "Patient/1"
        );
        assert_eq!(request.prefer(), "respond-async, handling=lenient");
    }

    #[test]
    fn a_groups_active_patient_members_are_read() {
        let body = br#"{"resourceType":"Group","member":[
            {"entity":{"reference":"Patient/a"}},
            {"entity":{"reference":"Patient/b"},"inactive":true},
            {"entity":{"reference":"Practitioner/c"}},
            {"entity":{"reference":"Patient/d/_history/2"}},
            {"entity":{}}]}"#;
        assert_eq!(group_member_ids(body), Some(vec!["a".to_string()]));
        assert_eq!(
            group_member_ids(br#"{"resourceType":"Group"}"#),
            Some(vec![])
        );
        assert_eq!(group_member_ids(br#"{"resourceType":"Patient"}"#), None);
        assert_eq!(group_member_ids(b"not json"), None);
    }
}
