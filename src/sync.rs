//! One sync run of one job, start to finish: discovery → token → `$export` kick-off → polling →
//! download and load of every file → DELETE of the export → run recorded.
//!
//! This is the only place that strings `smart`, `bulk` and `warehouse` together. It records
//! every step in the run tables (retries included) and classifies failures as retryable or
//! fatal; it retries files, refreshes expired links, and deletes exports that earlier runs
//! abandoned on the server. It never logs a credential or a resource body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tokio_util::io::StreamReader;

use tokio_util::sync::CancellationToken;

use crate::bulk::{
    BulkClient, ExportError, ExportRequest, Manifest, ManifestFile, PollPolicy, RetryPolicy,
};
use crate::config::{JobConfig, SyncSettings};
use crate::ops::metrics::{self, Endpoint};
use crate::queue::QueueSettings;
use crate::smart::{self, AuthError};
use crate::transport::{self, HttpOptions};
use crate::warehouse::{self, FileKind, FileTarget, LoadError, LoadLimits, Runs, TypeCount};

pub mod state;
pub mod steps;

pub use state::Trigger;
pub use steps::{Step, StepContext};

/// What a run needs from the service: the database, the sync settings and the queue settings.
#[derive(Clone)]
pub struct SyncContext {
    pub pool: PgPool,
    pub settings: SyncSettings,
    pub queue: QueueSettings,
}

/// What a successful run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: i64,
    pub transaction_time: String,
    /// The `_since` the run exported from; `None` for a full export.
    pub since: Option<String>,
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
    #[error("{0}")]
    Queue(String),
    #[error("the run ended {status}: {error}")]
    RunEnded {
        status: String,
        error: String,
        retryable: bool,
    },
}

impl SyncError {
    /// Whether running the job again later, unchanged, may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Auth(e) => e.is_retryable(),
            SyncError::Export(e) | SyncError::Download { source: e, .. } => e.is_retryable(),
            SyncError::Load { source, .. } => source.is_retryable(),
            SyncError::Database(_) | SyncError::Queue(_) => true,
            SyncError::RunEnded { retryable, .. } => *retryable,
            SyncError::Unsupported(_) | SyncError::Http(_) => false,
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

/// How to start a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Ignore the watermark and export everything.
    pub full: bool,
}

/// Queues a run of `job` now and drives it to its end with workers in this process (other
/// processes serving the same database may take some of its steps). Returns when the run has
/// succeeded or failed.
pub async fn run_job(
    ctx: &SyncContext,
    job: &JobConfig,
    options: RunOptions,
) -> Result<RunReport, RunFailed> {
    run_job_with(ctx, job, options, |_| {}).await
}

/// [`run_job`], calling `on_queued` with the run's id as soon as the run exists (to show its
/// progress while it goes).
pub async fn run_job_with(
    ctx: &SyncContext,
    job: &JobConfig,
    options: RunOptions,
    on_queued: impl FnOnce(i64),
) -> Result<RunReport, RunFailed> {
    let failed = |run_id, error| RunFailed {
        job: job.name.clone(),
        run_id,
        error,
    };
    let steps = StepContext::new(
        ctx.pool.clone(),
        ctx.settings.clone(),
        ctx.queue.clone(),
        Vec::new(),
    );
    steps.register_job(job.clone());
    let started = Instant::now();
    let run_id = enqueue_run(&steps, job, Trigger::Manual, None, options.full)
        .await
        .map_err(|e| failed(None, e))?
        .expect("a manual run has no tick to collide with");
    on_queued(run_id);
    let shutdown = CancellationToken::new();
    let workers = tokio::spawn(steps::run_workers(
        steps.clone(),
        shutdown.clone(),
        Duration::from_secs(30),
    ));
    let ended = tracing::Instrument::instrument(
        wait_for_run(&ctx.pool, run_id),
        tracing::info_span!("run", job.name = %job.name, run.id = run_id),
    )
    .await;
    shutdown.cancel();
    match workers.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "queue workers stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "queue workers panicked"),
    }
    let run = ended.map_err(|e| failed(Some(run_id), e.into()))?;
    if run.status != "succeeded" {
        let error = run
            .error
            .unwrap_or_else(|| format!("the run ended {}", run.status));
        return Err(failed(
            Some(run_id),
            SyncError::RunEnded {
                status: run.status,
                error,
                retryable: run.error_retryable.unwrap_or(false),
            },
        ));
    }
    let runs = Runs::new(ctx.pool.clone());
    let types = runs
        .type_counts(run_id)
        .await
        .map_err(|e| failed(Some(run_id), e.into()))?;
    let (output_files, error_files, bytes): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind = 'output'), count(*) FILTER (WHERE kind = 'error'), coalesce(sum(bytes), 0)::bigint
         FROM fhir_sync.run_file WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&ctx.pool)
    .await
    .map_err(|e| failed(Some(run_id), e.into()))?;
    Ok(RunReport {
        run_id,
        transaction_time: run.transaction_time.unwrap_or_default(),
        since: run.since,
        types,
        output_files: output_files as usize,
        error_files: error_files as usize,
        export_errors: run.export_errors as u64,
        bytes: bytes as u64,
        elapsed: started.elapsed(),
    })
}

/// Creates a queued run and queues its kick-off. `None` when another process already created
/// the run for the same tick.
pub async fn enqueue_run(
    steps: &StepContext,
    job: &JobConfig,
    trigger: Trigger,
    scheduled_for: Option<time::OffsetDateTime>,
    full: bool,
) -> Result<Option<i64>, SyncError> {
    let base = transport::redacted(&job.fhir.base_url);
    let Some(run_id) =
        state::create(&steps.pool, &job.name, &base, trigger, scheduled_for, full).await?
    else {
        return Ok(None);
    };
    // If this process dies between the insert and the push, the run stays 'queued';
    // `serve` re-queues the kick-off of such runs at start-up.
    steps
        .push(
            Step::KickOff {
                run_id,
                seq: 0,
                attempt: 0,
            },
            Duration::ZERO,
        )
        .await?;
    tracing::info!(job.name = %job.name, run.id = run_id, trigger = ?trigger, "run queued");
    Ok(Some(run_id))
}

/// The end state of a run, as [`wait_for_run`] reports it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunEnd {
    pub status: String,
    pub error: Option<String>,
    pub error_retryable: Option<bool>,
    pub transaction_time: Option<String>,
    pub since: Option<String>,
    pub export_errors: i64,
}

/// Waits until the run is finished, logging each state change. Listens for the run table's
/// notifications; the periodic re-read only covers a notification lost while reconnecting.
pub async fn wait_for_run(pool: &PgPool, run_id: i64) -> sqlx::Result<RunEnd> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen("fhir_sync_run").await?;
    let mut last = String::new();
    loop {
        let (status, progress): (String, Option<String>) =
            sqlx::query_as("SELECT status, progress FROM fhir_sync.run WHERE id = $1")
                .bind(run_id)
                .fetch_one(pool)
                .await?;
        let now = format!("{status} {}", progress.as_deref().unwrap_or(""));
        if now != last {
            tracing::info!(run.id = run_id, run.status = %status, export.progress = progress.as_deref().unwrap_or(""), "run state");
            last = now;
        }
        if state::TERMINAL.contains(&status.as_str()) {
            return sqlx::query_as(
                "SELECT status, error, error_retryable, transaction_time, since, export_errors FROM fhir_sync.run WHERE id = $1",
            )
            .bind(run_id)
            .fetch_one(pool)
            .await;
        }
        // Any run's change wakes us; the loop re-reads ours.
        let _ = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    }
}

/// What a job's steps share: the HTTP client, discovery, the token manager and the bulk client.
pub struct Session {
    pub bulk: BulkClient,
    /// The job's types that the granted scopes cover (all of them unless the job drops types).
    pub types: Vec<String>,
}

impl Session {
    /// Sets up authorisation for `job`: keys, discovery, algorithm and scope choice, the first
    /// token and what its granted scopes leave of the export.
    pub async fn open(settings: &SyncSettings, job: &JobConfig) -> Result<Session, SyncError> {
        let allow_insecure_http = job.fhir.allow_insecure_http;
        let http = transport::client_for(
            HttpOptions {
                connect_timeout: Duration::from_secs(settings.connect_timeout_seconds),
                read_timeout: Duration::from_secs(settings.read_timeout_seconds),
                allow_insecure_http,
            },
            transport::OriginPolicy::for_job(&job.fhir.base_url, &job.fhir.file_origins),
        )
        .map_err(SyncError::Http)?;
        let prepared = smart::prepare(&http, job).await?;
        for note in &prepared.notes {
            tracing::warn!(auth.note = %note, "authorisation");
        }
        let authorized = smart::authorize(&prepared, job).await?;
        if let smart::ExportSupport::NotDeclared(message) =
            smart::export_support(&http, &job.fhir.base_url, job.export.level, &job.name).await
        {
            tracing::warn!(reason = %message, "the server may not offer this export; trying anyway");
        }
        Ok(Session {
            bulk: BulkClient::new(
                http,
                job.fhir.base_url.clone(),
                prepared.tokens.clone(),
                allow_insecure_http,
            )
            .with_retry(retry_policy(settings))
            .with_file_origins(&job.fhir.file_origins)
            .with_manifest_limits(crate::bulk::ManifestLimits {
                max_manifest_bytes: settings.max_manifest_bytes,
                max_manifest_files: settings.max_manifest_files,
            }),
            types: authorized.types,
        })
    }
}

/// The export a run of `job` asks for: the job's parameters, limited to the types `session`
/// is allowed, from the watermark when there is one (else from the job's own `export.since`).
pub fn export_request(
    job: &JobConfig,
    session: &Session,
    watermark: Option<String>,
) -> ExportRequest {
    let mut request = ExportRequest::from_config(&job.export);
    request.types = session.types.clone();
    if watermark.is_some() {
        request.since = watermark;
    }
    request
}

/// A `$export` client authorised as the job's client, with the settings' retry policy (for
/// callers outside a run: tests, tools).
pub async fn connect_bulk(
    settings: &SyncSettings,
    job: &JobConfig,
) -> Result<BulkClient, SyncError> {
    Ok(Session::open(settings, job).await?.bulk)
}

/// `fhir-sync cancel <run>`: stops the run (its remaining steps do nothing) and deletes its
/// export on the server (a 404 means it is gone already), recording the deletion.
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
    state::cancel(&ctx.pool, run_id).await?;
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
    let session = Session::open(&ctx.settings, job).await?;
    session.bulk.delete(&status_url).await?;
    export_record::deleted(&ctx.pool, run_id).await?;
    Ok(CancelOutcome::Deleted)
}

/// What `cancel_run` did on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The export was deleted on the server (or the server no longer knew it).
    Deleted,
    /// fhir-sync had deleted it before.
    AlreadyDeleted,
    /// The run never got as far as starting an export.
    NeverStarted,
}

/// How `job`'s status polls are paced.
pub fn poll_policy(job: &JobConfig) -> PollPolicy {
    PollPolicy {
        min_interval: Duration::from_secs_f64(job.export.poll_min_interval_seconds),
        max_interval: Duration::from_secs_f64(job.export.poll_max_interval_seconds),
        default_interval: Duration::from_secs_f64(job.export.poll_default_interval_seconds),
        timeout: Duration::from_secs(job.export.timeout_seconds),
    }
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
pub(crate) struct Download<'a> {
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

impl<'a> Download<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pool: &'a PgPool,
        runs: &'a Runs,
        bulk: &'a BulkClient,
        status_url: &'a url::Url,
        requires_access_token: bool,
        settings: &SyncSettings,
        total_bytes: &'a AtomicU64,
        retries: &'a AtomicU64,
    ) -> Self {
        Download {
            pool,
            runs,
            bulk,
            status_url,
            requires_access_token,
            limits: LoadLimits {
                batch_lines: settings.batch_lines,
                max_line_bytes: settings.max_line_bytes,
            },
            max_file_bytes: settings.max_file_bytes,
            total_bytes,
            retries,
        }
    }

    /// Downloads and loads one file, retrying 429, 5xx, cut connections and truncated bodies
    /// with backoff (each attempt restarts the download and the loader skips the lines it
    /// already committed, so nothing is loaded twice), and fetching fresh links from the status
    /// URL when the file's link has expired.
    pub(crate) async fn load_file(
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
                    if let Some(mismatch) = &stats.count_mismatch {
                        tracing::warn!(
                            manifest.count = file.count,
                            mismatch = %mismatch,
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
                metrics::http_retry(self.bulk.job(), Endpoint::File);
                tracing::warn!(error = %error_chain(&error), attempt, retry_in_ms = delay.as_millis() as u64, "file failed, retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
            let error = if expired {
                let last = match &error {
                    SyncError::Download { source, .. } => source.to_string(),
                    other => other.to_string(),
                };
                SyncError::Download {
                    file: name.clone(),
                    source: ExportError::BadResponse(format!(
                        "the file link kept expiring ({MAX_LINK_REFRESHES} fresh links tried; the last answer: {last}); the server may be dropping the export's files"
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
                metrics::http_retry(self.bulk.job(), Endpoint::File);
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
        let downloaded = metrics::download_bytes(self.bulk.job());
        let stream = Box::pin(stream).and_then(|chunk| {
            downloaded.increment(chunk.len() as u64);
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
        FileKind::Deleted => &fresh.deleted,
    };
    let key = transport::redacted(&listed.url);
    list.iter()
        .find(|f| transport::redacted(&f.url) == key)
        .map(|f| f.url.clone())
}

/// At `serve` start-up: deletes, on each job's server, the exports earlier runs of the job left
/// behind (see [`delete_abandoned_exports`]). Failures are logged; start-up goes on.
pub async fn delete_abandoned_exports_at_start_up(
    settings: &SyncSettings,
    pool: &PgPool,
    jobs: &[std::sync::Arc<JobConfig>],
) {
    for job in jobs {
        match export_record::abandoned(pool, &job.name, 0, false).await {
            Ok(abandoned) if !abandoned.is_empty() => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(job.name = %job.name, error = %e, "could not look for abandoned exports");
                continue;
            }
        }
        match Session::open(settings, job).await {
            Ok(session) => {
                let deleted =
                    delete_abandoned_exports(pool, &session.bulk, &job.name, 0, false).await;
                tracing::info!(job.name = %job.name, deleted, "deleted exports left by earlier runs");
            }
            Err(e) => {
                tracing::warn!(job.name = %job.name, error = %error_chain(&e), "cannot reach the server to delete abandoned exports")
            }
        }
    }
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
pub(crate) mod export_record {
    use sqlx::PgPool;

    /// Adds a step's retries to the run's count (several workers add to it concurrently).
    pub(crate) async fn add_retries(pool: &PgPool, run_id: i64, retries: u64) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run SET retries = retries + $2 WHERE id = $1")
            .bind(run_id)
            .bind(retries as i64)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(crate) async fn expires(pool: &PgPool, run_id: i64, expires: &str) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run SET export_expires = $2 WHERE id = $1")
            .bind(run_id)
            .bind(expires)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(crate) async fn deleted(pool: &PgPool, run_id: i64) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run SET export_deleted_at = coalesce(export_deleted_at, now()) WHERE id = $1")
            .bind(run_id)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(crate) async fn file_attempt(pool: &PgPool, file_id: i64) -> sqlx::Result<()> {
        sqlx::query("UPDATE fhir_sync.run_file SET attempts = attempts + 1 WHERE id = $1")
            .bind(file_id)
            .execute(pool)
            .await
            .map(drop)
    }

    pub(crate) async fn link_refreshed(pool: &PgPool, file_id: i64) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE fhir_sync.run_file SET link_refreshes = link_refreshes + 1 WHERE id = $1",
        )
        .bind(file_id)
        .execute(pool)
        .await
        .map(drop)
    }

    /// (run id, status URL) of this job's exports that were started and never deleted.
    pub(crate) async fn abandoned(
        pool: &PgPool,
        job: &str,
        current_run: i64,
        include_running: bool,
    ) -> sqlx::Result<Vec<(i64, String)>> {
        sqlx::query_as(
            "SELECT id, status_url FROM fhir_sync.run
             WHERE job = $1 AND id <> $2 AND status_url IS NOT NULL AND export_deleted_at IS NULL
               AND (status IN ('succeeded', 'failed', 'cancelled')
                    OR ($3 AND status IN ('kicking_off', 'exporting', 'loading', 'completing') AND id < $2))
             ORDER BY id",
        )
        .bind(job)
        .bind(current_run)
        .bind(include_running)
        .fetch_all(pool)
        .await
    }

    /// The job name and status URL of a run, for `fhir-sync cancel`.
    pub(crate) async fn export_of(
        pool: &PgPool,
        run_id: i64,
    ) -> sqlx::Result<Option<(String, Option<String>, Option<time::OffsetDateTime>)>> {
        sqlx::query_as("SELECT job, status_url, export_deleted_at FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_optional(pool)
            .await
    }
}
