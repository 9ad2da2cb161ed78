//! One sync run of one job, start to finish: discovery → token → `$export` kick-off → polling →
//! download and load of every file → DELETE of the export → run recorded.
//!
//! This is the only place that strings `smart`, `bulk` and `warehouse` together. It records
//! every step in the run tables (retries included) and classifies failures as retryable or
//! fatal; it retries files, refreshes expired links, and deletes exports that earlier runs
//! abandoned on the server. It never logs a credential or a resource body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tokio_util::io::StreamReader;
use tracing::Instrument;

use crate::bulk::{
    BulkClient, ExportError, ExportRequest, Manifest, ManifestFile, PollPolicy, RetryPolicy,
};
use crate::config::{JobConfig, SyncSettings};
use crate::smart::{self, AuthError, KeyError, SigningKey, TokenManager};
use crate::transport::{self, HttpOptions};
use crate::warehouse::{
    self, FileKind, FileTarget, LoadError, LoadLimits, RunOutcome, Runs, TypeCount,
};

/// What a run needs from the service: the database and the sync settings.
#[derive(Clone)]
pub struct SyncContext {
    pub pool: PgPool,
    pub settings: SyncSettings,
}

/// What a successful run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: i64,
    pub transaction_time: String,
    pub types: Vec<TypeCount>,
    pub output_files: usize,
    pub error_files: usize,
    pub export_errors: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl RunReport {
    pub fn resources_loaded(&self) -> i64 {
        self.types.iter().map(|t| t.resources_loaded).sum()
    }
    pub fn lines_rejected(&self) -> i64 {
        self.types.iter().map(|t| t.lines_rejected).sum()
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot load the job's private key")]
    Key(#[from] KeyError),
    #[error("authorisation failed")]
    Auth(#[from] AuthError),
    #[error("export failed")]
    Export(#[from] ExportError),
    #[error("loading {file} failed")]
    Load { file: String, source: LoadError },
    #[error("download of {file} failed")]
    Download { file: String, source: ExportError },
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot build the HTTP client")]
    Http(#[source] anyhow::Error),
}

impl SyncError {
    /// Whether running the job again later, unchanged, may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Auth(e) => e.is_retryable(),
            SyncError::Export(e) | SyncError::Download { source: e, .. } => e.is_retryable(),
            SyncError::Load { source, .. } => source.is_retryable(),
            SyncError::Database(_) => true,
            SyncError::Key(_) | SyncError::Unsupported(_) | SyncError::Http(_) => false,
        }
    }
}

/// The error and all its causes on one line (`export failed: the server refused ...`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A failed run: its id (when the run row was created) and the reason.
#[derive(Debug, thiserror::Error)]
#[error("run {} of job {job} failed", run_id.map_or("(not started)".to_string(), |id| id.to_string()))]
pub struct RunFailed {
    pub job: String,
    pub run_id: Option<i64>,
    #[source]
    pub error: SyncError,
}

/// Runs one full (non-incremental) export of `job` now and records it.
pub async fn run_job(ctx: &SyncContext, job: &JobConfig) -> Result<RunReport, RunFailed> {
    let failed = |run_id, error| RunFailed {
        job: job.name.clone(),
        run_id,
        error,
    };
    let runs = Runs::new(ctx.pool.clone());
    let run_id = runs
        .start(
            &job.name,
            &job.name,
            &transport::redacted(&job.fhir.base_url),
            None,
        )
        .await
        .map_err(|e| failed(None, e.into()))?;
    let span = tracing::info_span!("run", job.name = %job.name, run.id = run_id);
    let started = Instant::now();
    let retries = Arc::new(AtomicU64::new(0));
    let result = execute(ctx, job, &runs, run_id, &retries)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    // Recorded whichever way the run ended: retries explain a slow run as much as a failed one.
    if let Err(e) = export_record::retries(&ctx.pool, run_id, retries.load(Ordering::Relaxed)).await
    {
        tracing::warn!(error = %e, "could not record the run's retry count");
    }
    match result {
        Ok(mut report) => {
            runs.finish(run_id, &RunOutcome::Succeeded)
                .await
                .map_err(|e| failed(Some(run_id), e.into()))?;
            report.elapsed = started.elapsed();
            report.types = runs
                .type_counts(run_id)
                .await
                .map_err(|e| failed(Some(run_id), e.into()))?;
            tracing::info!(
                resources = report.resources_loaded(),
                rejected = report.lines_rejected(),
                files = report.output_files,
                duration_ms = report.elapsed.as_millis() as u64,
                "run succeeded"
            );
            Ok(report)
        }
        Err(error) => {
            let outcome = RunOutcome::Failed {
                error: error_chain(&error),
                retryable: error.is_retryable(),
            };
            tracing::error!(error = %error_chain(&error), retryable = error.is_retryable(), "run failed");
            if let Err(e) = runs.finish(run_id, &outcome).await {
                tracing::error!(error = %e, "could not record the failed run");
            }
            Err(failed(Some(run_id), error))
        }
    }
}

/// Discovers the job's token endpoint and returns a `$export` client authorised as the job's
/// client, with the settings' retry policy.
pub async fn connect_bulk(
    settings: &SyncSettings,
    job: &JobConfig,
) -> Result<BulkClient, SyncError> {
    let allow_insecure_http = job.fhir.allow_insecure_http;
    let http = transport::client(HttpOptions {
        connect_timeout: Duration::from_secs(settings.connect_timeout_seconds),
        read_timeout: Duration::from_secs(settings.read_timeout_seconds),
        allow_insecure_http,
    })
    .map_err(SyncError::Http)?;

    let key = SigningKey::load(&job.auth.key, job.auth.algorithm, job.auth.key_id.clone())?;
    let discovered = smart::discover(&http, &job.fhir.base_url, allow_insecure_http).await?;
    if !discovered.signing_algorithms.is_empty()
        && !discovered
            .signing_algorithms
            .iter()
            .any(|a| a == job.auth.algorithm.as_str())
    {
        tracing::warn!(
            auth.algorithm = %job.auth.algorithm,
            "the server does not advertise this signing algorithm; trying anyway"
        );
    }
    tracing::info!(token.url = %transport::redacted(&discovered.token_endpoint), "discovered the token endpoint");
    let tokens = Arc::new(TokenManager::new(
        http.clone(),
        discovered.token_endpoint,
        job.auth.client_id.clone(),
        key,
        job.requested_scopes(),
    ));
    Ok(
        BulkClient::new(http, job.fhir.base_url.clone(), tokens, allow_insecure_http)
            .with_retry(retry_policy(settings)),
    )
}

/// `fhir-sync cancel <run>`: deletes the run's export on the server (a 404 means it is gone
/// already) and records that it was deleted. The run row itself is left as it is.
pub async fn cancel_run(
    ctx: &SyncContext,
    jobs: &[JobConfig],
    run_id: i64,
) -> Result<CancelOutcome, SyncError> {
    let Some((job_name, status_url, deleted_at)) =
        export_record::export_of(&ctx.pool, run_id).await?
    else {
        return Err(SyncError::Unsupported(format!("there is no run {run_id}")));
    };
    if deleted_at.is_some() {
        return Ok(CancelOutcome::AlreadyDeleted);
    }
    let Some(status_url) = status_url else {
        return Ok(CancelOutcome::NeverStarted);
    };
    let job = jobs.iter().find(|j| j.name == job_name).ok_or_else(|| {
        SyncError::Unsupported(format!(
            "run {run_id} belongs to job {job_name:?}, which has no job file any more; its export cannot be cancelled without the job's credentials"
        ))
    })?;
    let status_url = url::Url::parse(&status_url).map_err(|e| {
        SyncError::Unsupported(format!("run {run_id} has an unusable status URL: {e}"))
    })?;
    let bulk = connect_bulk(&ctx.settings, job).await?;
    bulk.delete(&status_url).await?;
    export_record::deleted(&ctx.pool, run_id).await?;
    Ok(CancelOutcome::Deleted)
}

/// What `cancel_run` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The export was deleted on the server (or the server no longer knew it).
    Deleted,
    /// fhir-sync had deleted it before.
    AlreadyDeleted,
    /// The run never got as far as starting an export.
    NeverStarted,
}

async fn execute(
    ctx: &SyncContext,
    job: &JobConfig,
    runs: &Runs,
    run_id: i64,
    retries: &Arc<AtomicU64>,
) -> Result<RunReport, SyncError> {
    let settings = &ctx.settings;
    let bulk = connect_bulk(settings, job)
        .await?
        .with_retry_counter(retries.clone());

    // Exports this job started before and never deleted (a failed or killed run) may hold the
    // server's one-export-per-client slot and keep its files around: delete them first.
    delete_abandoned_exports(&ctx.pool, &bulk, &job.name, run_id, false).await;
    let request = ExportRequest::from_config(&job.export);
    let kick_off = match bulk.kick_off(&request).await {
        Err(ExportError::Busy { .. })
            if delete_abandoned_exports(&ctx.pool, &bulk, &job.name, run_id, true).await > 0 =>
        {
            tracing::info!(
                "deleted abandoned exports after the server refused a new one; trying again"
            );
            bulk.kick_off(&request).await?
        }
        other => other?,
    };
    runs.kicked_off(
        run_id,
        kick_off.request_url.as_str(),
        kick_off.status_url.as_str(),
    )
    .await?;
    tracing::info!(export.status_url = %transport::redacted(&kick_off.status_url), "export started");

    let policy = PollPolicy {
        min_interval: Duration::from_secs_f64(job.export.poll_min_interval_seconds),
        max_interval: Duration::from_secs_f64(job.export.poll_max_interval_seconds),
        default_interval: Duration::from_secs_f64(job.export.poll_default_interval_seconds),
        timeout: Duration::from_secs(job.export.timeout_seconds),
    };
    let manifest = bulk
        .wait_for_manifest(&kick_off.status_url, &policy, async |progress| {
            tracing::info!(export.progress = %progress, "export in progress");
            // The status page shows it while the export runs; losing one update is harmless.
            if let Err(e) = runs.progress(run_id, &progress).await {
                tracing::warn!(error = %e, "could not record the export's progress");
            }
        })
        .await?;
    if let Some(expires) = &manifest.expires {
        export_record::expires(&ctx.pool, run_id, expires).await?;
    }
    if !manifest.deleted.is_empty() {
        return Err(SyncError::Unsupported(format!(
            "the manifest lists {} deleted file(s); applying deletions is not supported yet, so the run stops \
             rather than leave deleted resources in the warehouse",
            manifest.deleted.len()
        )));
    }
    tracing::info!(
        export.transaction_time = %manifest.transaction_time,
        output_files = manifest.output.len(),
        error_files = manifest.error.len(),
        "export complete"
    );

    let files = register_files(runs, run_id, &manifest).await?;
    let bytes = AtomicU64::new(0);
    let download = Download {
        pool: &ctx.pool,
        runs,
        bulk: &bulk,
        status_url: &kick_off.status_url,
        requires_access_token: manifest.requires_access_token,
        limits: LoadLimits {
            batch_lines: settings.batch_lines,
            max_line_bytes: settings.max_line_bytes,
        },
        max_file_bytes: settings.max_file_bytes,
        total_bytes: &bytes,
        retries,
    };
    let results: Vec<Result<(), SyncError>> = futures::stream::iter(files.iter())
        .map(|(record, file, kind)| {
            let target = FileTarget {
                run_id,
                file_id: record.id,
                source: job.name.clone(),
                kind: *kind,
                resource_type: match kind {
                    FileKind::Output => file.resource_type.clone(),
                    FileKind::Error => "OperationOutcome".to_string(),
                },
            };
            let span = tracing::info_span!("file", file.id = record.id, resource.type = %file.resource_type);
            download.load_file(target, file, *kind).instrument(span)
        })
        .buffer_unordered(settings.max_parallel_downloads)
        .collect()
        .await;
    let failures: Vec<SyncError> = results.into_iter().filter_map(Result::err).collect();
    if let Some(first) = failures.into_iter().next() {
        return Err(first);
    }

    // Every file is loaded: the server may now drop the files. A failure here loses nothing;
    // the next run's start-up clean-up tries again.
    match bulk.delete(&kick_off.status_url).await {
        Ok(()) => export_record::deleted(&ctx.pool, run_id).await?,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "could not delete the finished export on the server")
        }
    }
    let export_errors = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM fhir_sync.export_error WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&ctx.pool)
    .await? as u64;
    Ok(RunReport {
        run_id,
        transaction_time: manifest.transaction_time.clone(),
        types: Vec::new(),
        output_files: manifest.output.len(),
        error_files: manifest.error.len(),
        export_errors,
        bytes: bytes.load(Ordering::Relaxed),
        elapsed: Duration::ZERO,
    })
}

async fn register_files<'m>(
    runs: &Runs,
    run_id: i64,
    manifest: &'m Manifest,
) -> Result<Vec<(warehouse::FileRecord, &'m ManifestFile, FileKind)>, SyncError> {
    let listed: Vec<(&ManifestFile, FileKind)> = manifest
        .output
        .iter()
        .map(|f| (f, FileKind::Output))
        .chain(manifest.error.iter().map(|f| (f, FileKind::Error)))
        .collect();
    let rows: Vec<(&str, &str, String, Option<u64>)> = listed
        .iter()
        .map(|(f, kind)| {
            let kind = if *kind == FileKind::Output {
                "output"
            } else {
                "error"
            };
            (
                kind,
                f.resource_type.as_str(),
                transport::redacted(&f.url),
                f.count,
            )
        })
        .collect();
    let records = runs
        .manifest(run_id, &manifest.transaction_time, &rows)
        .await?;
    // Rows come back in insertion order, which is manifest order.
    if records.len() != listed.len() {
        return Err(SyncError::Unsupported(format!(
            "the manifest lists the same file URL more than once ({} files, {} distinct)",
            listed.len(),
            records.len()
        )));
    }
    Ok(records
        .into_iter()
        .zip(listed)
        .map(|(record, (file, kind))| (record, file, kind))
        .collect())
}

/// The retry policy the sync settings describe.
pub fn retry_policy(settings: &SyncSettings) -> RetryPolicy {
    RetryPolicy {
        attempts: settings.request_attempts,
        base_delay: Duration::from_millis(settings.retry_base_delay_ms),
    }
}

/// Times one file's link may be refreshed from the status URL before the run gives up on it.
const MAX_LINK_REFRESHES: u32 = 3;

/// What every file download of one run shares.
struct Download<'a> {
    pool: &'a PgPool,
    runs: &'a Runs,
    bulk: &'a BulkClient,
    status_url: &'a url::Url,
    requires_access_token: bool,
    limits: LoadLimits,
    max_file_bytes: u64,
    total_bytes: &'a AtomicU64,
    retries: &'a AtomicU64,
}

impl Download<'_> {
    /// Downloads and loads one file, retrying 429, 5xx, cut connections and truncated bodies
    /// with backoff (each attempt restarts the download and the loader skips the lines it
    /// already committed, so nothing is loaded twice), and fetching fresh links from the status
    /// URL when the file's link has expired.
    async fn load_file(
        &self,
        target: FileTarget,
        listed: &ManifestFile,
        kind: FileKind,
    ) -> Result<(), SyncError> {
        let mut file = listed.clone();
        let name = transport::redacted(&file.url);
        self.runs.file_started(target.file_id).await?;
        let policy = self.bulk.retry_policy();
        let mut attempt = 0;
        let mut refreshes = 0;
        loop {
            attempt += 1;
            export_record::file_attempt(self.pool, target.file_id).await?;
            let bytes = AtomicU64::new(0);
            let result = self.download_and_load(&target, &file, &bytes).await;
            let read = bytes.load(Ordering::Relaxed);
            self.total_bytes.fetch_add(read, Ordering::Relaxed);
            let error = match result {
                Ok(stats) => {
                    self.runs.file_loaded(target.file_id, read).await?;
                    let accounted = stats.resumed_after_line + stats.lines;
                    if let Some(count) = file.count
                        && stats.resumed_after_line == 0
                        && stats.loaded + stats.rejected != count
                    {
                        tracing::warn!(
                            manifest.count = count,
                            loaded = stats.loaded,
                            rejected = stats.rejected,
                            "the file's line count differs from the manifest's count"
                        );
                    }
                    tracing::info!(
                        lines = accounted,
                        loaded = stats.loaded,
                        rejected = stats.rejected,
                        bytes = read,
                        attempts = attempt,
                        "file loaded"
                    );
                    return Ok(());
                }
                Err(error) => error,
            };
            let expired = matches!(
                &error,
                SyncError::Download {
                    source: ExportError::Expired { .. },
                    ..
                }
            );
            if expired && refreshes < MAX_LINK_REFRESHES {
                refreshes += 1;
                tracing::warn!(file = %name, "the file link expired; fetching fresh links from the status URL");
                export_record::link_refreshed(self.pool, target.file_id).await?;
                let fresh = self.bulk.refresh_manifest(self.status_url).await;
                match fresh.map(|m| find_fresh_link(&m, listed, kind)) {
                    Ok(Some(url)) => {
                        file.url = url;
                        // A fresh link is a new chance: it does not use up a retry.
                        attempt -= 1;
                        continue;
                    }
                    Ok(None) => {
                        let error = SyncError::Download {
                            file: name.clone(),
                            source: ExportError::BadResponse(
                                "the file link expired and the refreshed manifest no longer lists the file".into(),
                            ),
                        };
                        self.runs
                            .file_failed(target.file_id, read, &error_chain(&error))
                            .await?;
                        return Err(error);
                    }
                    Err(source) => {
                        let error = SyncError::Export(source);
                        self.runs
                            .file_failed(target.file_id, read, &error_chain(&error))
                            .await?;
                        return Err(error);
                    }
                }
            }
            if !expired && error.is_retryable() && attempt < policy.attempts {
                let hinted = match &error {
                    SyncError::Download {
                        source: ExportError::FileStatus { retry_after, .. },
                        ..
                    } => *retry_after,
                    _ => None,
                };
                let delay = policy.delay(attempt, hinted);
                self.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %error_chain(&error), attempt, retry_in_ms = delay.as_millis() as u64, "file failed, retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
            let error = if expired {
                SyncError::Download {
                    file: name.clone(),
                    source: ExportError::BadResponse(format!(
                        "the file link kept expiring ({MAX_LINK_REFRESHES} fresh links tried); the server may be dropping the export's files"
                    )),
                }
            } else {
                error
            };
            self.runs
                .file_failed(target.file_id, read, &error_chain(&error))
                .await?;
            tracing::warn!(error = %error_chain(&error), file = %name, "file failed");
            return Err(error);
        }
    }

    async fn download_and_load(
        &self,
        target: &FileTarget,
        file: &ManifestFile,
        bytes: &AtomicU64,
    ) -> Result<warehouse::LoadStats, SyncError> {
        let name = transport::redacted(&file.url);
        let download_error = |source| SyncError::Download {
            file: name.clone(),
            source,
        };
        let response = self
            .bulk
            .open_file(file, self.requires_access_token)
            .await
            .map_err(download_error)?;
        let limit = self.max_file_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > limit)
        {
            return Err(download_error(ExportError::TooLarge { limit }));
        }
        let too_large = std::sync::atomic::AtomicBool::new(false);
        // A server that says it takes byte ranges (and is not compressing, which would make
        // offsets ambiguous) gets a `Range` request when the body breaks off, and the loader
        // reads on as if nothing happened. Otherwise a break fails this attempt and the retry
        // restarts the file, the loader skipping the lines it has committed.
        let resumable = response
            .headers()
            .get(reqwest::header::ACCEPT_RANGES)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"bytes"))
            && !response
                .headers()
                .contains_key(reqwest::header::CONTENT_ENCODING);
        let resume = Resume {
            current: Box::pin(response.bytes_stream()),
            offset: 0,
            resumes_left: if resumable { MAX_RANGE_RESUMES } else { 0 },
        };
        let stream = futures::stream::unfold(resume, |mut resume| async move {
            loop {
                let error = match resume.current.next().await {
                    Some(Ok(chunk)) => {
                        resume.offset += chunk.len() as u64;
                        return Some((Ok(chunk), resume));
                    }
                    None => return None,
                    Some(Err(error)) => std::io::Error::other(error.without_url()),
                };
                if resume.resumes_left == 0 {
                    return Some((Err(error), resume));
                }
                resume.resumes_left -= 1;
                self.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    offset = resume.offset,
                    "file body broke off; resuming with a Range request"
                );
                match self
                    .bulk
                    .resume_file(file, self.requires_access_token, resume.offset)
                    .await
                {
                    Ok(response) => resume.current = Box::pin(response.bytes_stream()),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not resume the file; it will be restarted");
                        resume.resumes_left = 0;
                        return Some((Err(error), resume));
                    }
                }
            }
        });
        // `bytes` counts what arrived (decompressed, since reqwest decodes gzip); past the cap
        // the stream fails so the loader stops reading.
        let stream = Box::pin(stream).and_then(|chunk| {
            let total = bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            let result = if total > limit {
                too_large.store(true, Ordering::Relaxed);
                Err(std::io::Error::other(
                    "the file is larger than sync.max_file_bytes",
                ))
            } else {
                Ok(chunk)
            };
            futures::future::ready(result)
        });
        let reader = tokio::io::BufReader::with_capacity(256 * 1024, StreamReader::new(stream));
        let result = warehouse::load_ndjson(self.pool, target, reader, self.limits).await;
        if too_large.load(Ordering::Relaxed) {
            return Err(download_error(ExportError::TooLarge { limit }));
        }
        result.map_err(|source| SyncError::Load { file: name, source })
    }
}

/// Byte-range resumptions of one download attempt before the attempt is given up.
const MAX_RANGE_RESUMES: u32 = 3;

/// The state of a file body that may be resumed with `Range` requests.
struct Resume {
    current: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    /// Bytes of the body received so far.
    offset: u64,
    resumes_left: u32,
}

/// The fresh URL of `listed` in a re-fetched manifest: the entry with the same URL without its
/// query string (expiring links usually differ only in their signature), else the entry at the
/// same position among the same type's files.
fn find_fresh_link(fresh: &Manifest, listed: &ManifestFile, kind: FileKind) -> Option<url::Url> {
    let list = match kind {
        FileKind::Output => &fresh.output,
        FileKind::Error => &fresh.error,
    };
    let key = transport::redacted(&listed.url);
    list.iter()
        .find(|f| transport::redacted(&f.url) == key)
        .map(|f| f.url.clone())
}

/// Deletes, on the server, exports this job started in earlier runs and never deleted: runs
/// that failed (and, when `include_running`, runs still marked running, which is what a killed
/// process leaves) with a status URL and no recorded deletion. Returns how many were deleted.
/// Failures are logged, not returned: clean-up must never stop a new run.
pub async fn delete_abandoned_exports(
    pool: &PgPool,
    bulk: &BulkClient,
    job: &str,
    current_run: i64,
    include_running: bool,
) -> usize {
    let abandoned = match export_record::abandoned(pool, job, current_run, include_running).await {
        Ok(abandoned) => abandoned,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for abandoned exports");
            return 0;
        }
    };
    let mut deleted = 0;
    for (run_id, status_url) in abandoned {
        let Ok(url) = url::Url::parse(&status_url) else {
            continue;
        };
        match bulk.delete(&url).await {
            Ok(()) => {
                tracing::info!(
                    abandoned.run_id = run_id,
                    "deleted an abandoned export on the server"
                );
                if let Err(e) = export_record::deleted(pool, run_id).await {
                    tracing::warn!(error = %e, "could not record the deleted export");
                }
                deleted += 1;
            }
            Err(e) => {
                tracing::warn!(abandoned.run_id = run_id, error = %error_chain(&e), "could not delete an abandoned export");
            }
        }
    }
    deleted
}

/// The export-specific columns of the run tables (migration `20261129000200_export.sql`).
mod export_record {
    use sqlx::PgPool;

    pub(super) async fn retries(pool: &PgPool, run_id: i64, retries: u64) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run SET retries = $2 WHERE id = $1")
            .bind(run_id)
            .bind(retries as i64)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(super) async fn expires(pool: &PgPool, run_id: i64, expires: &str) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run SET export_expires = $2 WHERE id = $1")
            .bind(run_id)
            .bind(expires)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(super) async fn deleted(pool: &PgPool, run_id: i64) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run SET export_deleted_at = coalesce(export_deleted_at, now()) WHERE id = $1")
            .bind(run_id)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(super) async fn file_attempt(pool: &PgPool, file_id: i64) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run_file SET attempts = attempts + 1 WHERE id = $1")
            .bind(file_id)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(super) async fn link_refreshed(pool: &PgPool, file_id: i64) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE fhir_sync.run_file SET link_refreshes = link_refreshes + 1 WHERE id = $1",
        )
        .bind(file_id)
        .execute(pool)
        .await
        .map(drop)
    }

    /// (run id, status URL) of this job's exports that were started and never deleted.
    pub(super) async fn abandoned(
        pool: &PgPool,
        job: &str,
        current_run: i64,
        include_running: bool,
    ) -> sqlx::Result<Vec<(i64, String)>> {
        sqlx::query_as(
            "SELECT id, status_url FROM fhir_sync.run
             WHERE job = $1 AND id <> $2 AND status_url IS NOT NULL AND export_deleted_at IS NULL
               AND (status = 'failed' OR ($3 AND status = 'running' AND id < $2))
             ORDER BY id",
        )
        .bind(job)
        .bind(current_run)
        .bind(include_running)
        .fetch_all(pool)
        .await
    }

    /// The job name and status URL of a run, for `fhir-sync cancel`.
    pub(super) async fn export_of(
        pool: &PgPool,
        run_id: i64,
    ) -> sqlx::Result<Option<(String, Option<String>, Option<time::OffsetDateTime>)>> {
        sqlx::query_as("SELECT job, status_url, export_deleted_at FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_optional(pool)
            .await
    }
}
