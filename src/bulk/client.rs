//! The `$export` HTTP client: kick-off, polling, downloads and the final DELETE.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, CONTENT_LOCATION, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::{ExportError, Manifest, ManifestFile, outcome_is_transient, outcome_text};
use crate::config::ExportLevel;
use crate::smart::TokenManager;
use crate::transport;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub level: ExportLevel,
    pub group_id: Option<String>,
    pub types: Vec<String>,
    /// Sent as `_since` exactly as given (a previous manifest's `transactionTime`).
    pub since: Option<String>,
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

/// Consecutive 5xx/429/transient answers tolerated while polling before the run fails.
const MAX_POLL_ERRORS: u32 = 10;

pub struct BulkClient {
    http: reqwest::Client,
    base: Url,
    tokens: Arc<TokenManager>,
    allow_insecure_http: bool,
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
            base,
            tokens,
            allow_insecure_http,
        }
    }

    /// The kick-off URL for `request`: `_type` as one comma-joined value (some servers accept
    /// no other form), `_since` percent-encoded so a `+` offset survives.
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
        {
            let mut query = url.query_pairs_mut();
            if !request.types.is_empty() {
                query.append_pair("_type", &request.types.join(","));
            }
            if let Some(since) = &request.since {
                query.append_pair("_since", since);
            }
        }
        url
    }

    /// Starts an export and returns its status URL.
    pub async fn kick_off(&self, request: &ExportRequest) -> Result<KickOff, ExportError> {
        let request_url = self.kick_off_url(request);
        let context = "export kick-off";
        let response = self
            .send(
                Method::GET,
                &request_url,
                Bearer::FhirOrigin,
                context,
                |r| {
                    r.header(ACCEPT, "application/fhir+json")
                        .header("Prefer", "respond-async")
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
        let body = response.bytes().await.unwrap_or_default();
        if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
            return Err(ExportError::Refused {
                status: status.as_u16(),
                diagnostics: outcome_text(&body),
            });
        }
        Err(ExportError::Status {
            context,
            status: status.as_u16(),
        })
    }

    /// Polls the status URL until the manifest is ready, honouring `Retry-After` within the
    /// policy's bounds. `progress` receives each `X-Progress` value.
    pub async fn wait_for_manifest(
        &self,
        status_url: &Url,
        policy: &PollPolicy,
        mut progress: impl FnMut(&str),
    ) -> Result<Manifest, ExportError> {
        let started = Instant::now();
        let mut errors = 0u32;
        loop {
            let context = "export status";
            let response = self
                .send(Method::GET, status_url, Bearer::FhirOrigin, context, |r| {
                    r.header(ACCEPT, "application/json")
                })
                .await;
            let delay = match response {
                Ok(response) if response.status() == StatusCode::OK => {
                    let body = response.bytes().await.map_err(|e| ExportError::Transport {
                        context,
                        source: e.without_url(),
                    })?;
                    return Manifest::parse(&body, status_url);
                }
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    errors = 0;
                    if let Some(value) = response
                        .headers()
                        .get("x-progress")
                        .and_then(|v| v.to_str().ok())
                    {
                        progress(value);
                    }
                    retry_after(&response).unwrap_or(policy.default_interval)
                }
                Ok(response) => {
                    let status = response.status();
                    let hinted = retry_after(&response);
                    let body = response.bytes().await.unwrap_or_default();
                    let transient = status == StatusCode::TOO_MANY_REQUESTS
                        || (status.is_server_error()
                            && (body.is_empty() || outcome_is_transient(&body)))
                        || outcome_is_transient(&body);
                    if !transient {
                        return Err(ExportError::Failed {
                            status: status.as_u16(),
                            diagnostics: outcome_text(&body),
                        });
                    }
                    errors += 1;
                    if errors > MAX_POLL_ERRORS {
                        return Err(ExportError::Status {
                            context,
                            status: status.as_u16(),
                        });
                    }
                    tracing::warn!(
                        http.status = status.as_u16(),
                        attempt = errors,
                        "export status poll failed, will poll again"
                    );
                    hinted.unwrap_or(policy.default_interval * 2u32.pow(errors.min(6)))
                }
                Err(e) if e.is_retryable() && errors < MAX_POLL_ERRORS => {
                    errors += 1;
                    tracing::warn!(error = %e, attempt = errors, "export status poll failed, will poll again");
                    policy.default_interval * 2u32.pow(errors.min(6))
                }
                Err(e) => return Err(e),
            };
            if started.elapsed() > policy.timeout {
                return Err(ExportError::TimedOut {
                    seconds: policy.timeout.as_secs(),
                });
            }
            tokio::time::sleep(delay.clamp(policy.min_interval, policy.max_interval)).await;
        }
    }

    /// One status request, for callers that schedule their own polls (the queue's poll step).
    pub async fn check_status(&self, status_url: &Url) -> Result<StatusCheck, ExportError> {
        let context = "export status";
        let response = self
            .send(Method::GET, status_url, Bearer::FhirOrigin, context, |r| {
                r.header(ACCEPT, "application/json")
            })
            .await?;
        let status = response.status();
        let retry_after = retry_after(&response);
        if status == StatusCode::OK {
            let body = response.bytes().await.map_err(|e| ExportError::Transport {
                context,
                source: e.without_url(),
            })?;
            return Manifest::parse(&body, status_url).map(StatusCheck::Complete);
        }
        if status == StatusCode::ACCEPTED {
            let progress = response
                .headers()
                .get("x-progress")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Ok(StatusCheck::InProgress {
                progress,
                retry_after,
            });
        }
        let body = response.bytes().await.unwrap_or_default();
        let transient = status == StatusCode::TOO_MANY_REQUESTS
            || (status.is_server_error() && (body.is_empty() || outcome_is_transient(&body)))
            || outcome_is_transient(&body);
        if transient {
            Ok(StatusCheck::Transient {
                status: status.as_u16(),
                retry_after,
            })
        } else {
            Err(ExportError::Failed {
                status: status.as_u16(),
                diagnostics: outcome_text(&body),
            })
        }
    }

    /// Opens one output file for streaming. The body is not read here.
    pub async fn open_file(
        &self,
        file: &ManifestFile,
        requires_access_token: bool,
    ) -> Result<Response, ExportError> {
        transport::check_url(&file.url, self.allow_insecure_http).map_err(|m| {
            ExportError::Policy(format!("file {}: {m}", transport::redacted(&file.url)))
        })?;
        let context = "file download";
        let bearer = if requires_access_token {
            Bearer::ManifestFile
        } else {
            Bearer::None
        };
        let response = self
            .send(Method::GET, &file.url, bearer, context, |r| {
                r.header(ACCEPT, "application/fhir+ndjson")
            })
            .await?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(ExportError::Status {
                context,
                status: status.as_u16(),
            });
        }
        Ok(response)
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
        let mut token = if bearer != Bearer::None {
            Some(self.tokens.token().await?)
        } else {
            None
        };
        let mut renewed = false;
        loop {
            let mut request = build(self.http.request(method.clone(), url.clone()));
            if let Some(value) = token.as_ref().and_then(|t| t.authorization()) {
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let response = request.send().await.map_err(|e| ExportError::Transport {
                context,
                source: e.without_url(),
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
                }
                _ => return Err(ExportError::Unauthorized { context }),
            }
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP-date.
fn retry_after(response: &Response) -> Option<Duration> {
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
