//! One sync run of one job, start to finish: discovery → token → `$export` kick-off → polling →
//! download and load of every file → DELETE of the export → run recorded.
//!
//! This is the only place that strings `smart`, `bulk` and `warehouse` together: a run is a
//! chain of queued steps (`steps`, one file per step), each failure mapped to a directive by
//! the one retry policy (`policy`), each file streamed into the loader by `download`; the run
//! and file records are written only through the run store (`warehouse::runs`). Here: queueing
//! a run and driving it in-process, the authorised session, `cancel`, and the clean-up of
//! exports earlier runs abandoned on the server. It never logs a credential or a resource
//! body, and never imports `ops`.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::bulk::{BulkClient, ExportError, ExportRequest, PollPolicy, RetryPolicy};
use crate::config::{JobConfig, SyncSettings};
use crate::smart::{self, AuthError};
use crate::transport::{self, HttpOptions};
use crate::warehouse::runs::{self, RunStatus};
use crate::warehouse::{LoadError, TypeCount};

mod download;
pub mod policy;
pub mod steps;

pub use crate::warehouse::runs::{RunEnd, Trigger};
pub use steps::{Step, SyncContext};

/// What a finished run did: a run that `succeeded`, or one that ended `partial` (everything it
/// got is loaded, but the export was not complete; `warning` says why).
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: i64,
    /// `Succeeded` or `Partial`.
    pub status: RunStatus,
    /// Why a partial run is partial, and what to look at; `None` for a succeeded run.
    pub warning: Option<String>,
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
    #[error("cannot build the HTTP client")]
    Http(#[source] anyhow::Error),
    #[error("cannot queue the run's next step")]
    Queue(#[from] crate::queue::QueueError),
    #[error("there is no run {0}")]
    NoSuchRun(i64),
    /// A run of a job this process has no job file for (it was removed, or the processes
    /// serving one database read different job directories).
    #[error("job {job:?} is not configured in this process (jobs/{job}.toml missing?)")]
    JobNotConfigured { job: String },
    /// A run or file record lacks what its state promises (a status URL while exporting).
    #[error("run {run_id} has no usable {what}")]
    BadRecord { run_id: i64, what: &'static str },
    /// A job's schedule cannot be evaluated.
    #[error("{0}")]
    Schedule(String),
    /// This process is stopping: the step's work goes back to the queue.
    #[error("the process is stopping")]
    Stopped,
    #[error("the run ended {status}: {error}")]
    RunEnded {
        status: RunStatus,
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
            SyncError::Database(_) | SyncError::Queue(_) | SyncError::Stopped => true,
            SyncError::RunEnded { retryable, .. } => *retryable,
            SyncError::Http(_)
            | SyncError::NoSuchRun(_)
            | SyncError::JobNotConfigured { .. }
            | SyncError::BadRecord { .. }
            | SyncError::Schedule(_) => false,
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
/// ended: `Ok` when it succeeded or ended partial (the report says which), `Err` otherwise.
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
    let steps = ctx.foreground(job);
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
    if !matches!(run.status, RunStatus::Succeeded | RunStatus::Partial) {
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
    let types = runs::type_counts(&ctx.pool, run_id)
        .await
        .map_err(|e| failed(Some(run_id), e.into()))?;
    let (output_files, error_files, bytes) = runs::file_totals(&ctx.pool, run_id)
        .await
        .map_err(|e| failed(Some(run_id), e.into()))?;
    let warning = (run.status == RunStatus::Partial).then(|| {
        let reason = run
            .error
            .unwrap_or_else(|| "the export was not complete".into());
        match run.hint {
            Some(hint) => format!("{reason} ({hint})"),
            None => reason,
        }
    });
    Ok(RunReport {
        run_id,
        status: run.status,
        warning,
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
    steps: &SyncContext,
    job: &JobConfig,
    trigger: Trigger,
    scheduled_for: Option<time::OffsetDateTime>,
    full: bool,
) -> Result<Option<i64>, SyncError> {
    let base = transport::redacted(&job.fhir.base_url);
    let Some(run_id) =
        runs::create(&steps.pool, &job.name, &base, trigger, scheduled_for, full).await?
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

/// Waits until the run is finished, logging each state change. Listens for the run table's
/// notifications; the periodic re-read only covers a notification lost while reconnecting.
/// The database going away for a while (the workers ride it out) does not end the wait; it
/// fails only once reads have failed for [`WAIT_PATIENCE`] in a row.
pub async fn wait_for_run(pool: &PgPool, run_id: i64) -> sqlx::Result<RunEnd> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen("fhir_sync_run").await?;
    let mut last = String::new();
    let mut failing_since: Option<Instant> = None;
    loop {
        let read = match runs::status_and_progress(pool, run_id).await {
            Ok((status, _)) if status.is_terminal() => runs::run_end(pool, run_id).await.map(Ok),
            Ok(now) => Ok(Err(now)),
            Err(e) => Err(e),
        };
        match read {
            Ok(Ok(end)) => return Ok(end),
            Ok(Err((status, progress))) => {
                failing_since = None;
                let now = format!("{status} {}", progress.as_deref().unwrap_or(""));
                if now != last {
                    tracing::info!(run.id = run_id, run.status = %status, export.progress = progress.as_deref().unwrap_or(""), "run state");
                    last = now;
                }
            }
            Err(e) if failing_since.is_some_and(|at| at.elapsed() > WAIT_PATIENCE) => {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the run's state; trying again");
                failing_since.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        // Any run's change wakes us; the loop re-reads ours.
        let _ = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    }
}

/// How long [`wait_for_run`] keeps reading through database errors.
const WAIT_PATIENCE: Duration = Duration::from_secs(120);

/// What a run's steps share in one process: the bulk client (with the HTTP client and the
/// token manager inside it, discovery done) and the types the granted scopes cover.
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
            .with_headers(&job.fhir.headers)
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
    // BCDA and AB2D refuse `Z`; the watermark is the server's own transactionTime, but a
    // job's `export.since` may be written with it.
    if job.export.since_with_offset {
        request.since = request
            .since
            .map(|since| crate::vendor::with_numeric_offset(&since));
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
    let Some(runs::ExportRecord {
        job: job_name,
        status_url,
        export_deleted_at,
        ..
    }) = runs::export_of(&ctx.pool, run_id).await?
    else {
        return Err(SyncError::NoSuchRun(run_id));
    };
    runs::cancel(&ctx.pool, run_id).await?;
    if export_deleted_at.is_some() {
        return Ok(CancelOutcome::AlreadyDeleted);
    }
    let Some(status_url) = status_url else {
        return Ok(CancelOutcome::NeverStarted);
    };
    // Without the job's credentials the export cannot be deleted on the server.
    let job = jobs
        .iter()
        .find(|j| j.name == job_name)
        .ok_or(SyncError::JobNotConfigured { job: job_name })?;
    let status_url = url::Url::parse(&status_url).map_err(|_| SyncError::BadRecord {
        run_id,
        what: "status URL",
    })?;
    let session = Session::open(&ctx.settings, job).await?;
    session.bulk.delete(&status_url).await?;
    runs::export_deleted(&ctx.pool, run_id).await?;
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

/// Records, once, that the server will never delete run `run_id`'s export (it answered
/// `status`: 403, 405, 501), so that no later clean-up asks again; logs it the one time.
pub(crate) async fn record_delete_refused(pool: &PgPool, run_id: i64, status: u16) {
    match runs::export_delete_refused(pool, run_id, status).await {
        Ok(true) => tracing::warn!(
            export.run_id = run_id,
            http.status = status,
            "the server does not allow deleting this export; recorded, it will not be asked again"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not record the refused export deletion"),
    }
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

/// At `serve` start-up: deletes, on each job's server, the exports earlier runs of the job left
/// behind (see [`delete_abandoned_exports`]). Failures are logged; start-up goes on.
pub async fn delete_abandoned_exports_at_start_up(
    settings: &SyncSettings,
    pool: &PgPool,
    jobs: &[std::sync::Arc<JobConfig>],
) {
    for job in jobs {
        match runs::abandoned_exports(pool, &job.name, 0, false).await {
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
    let abandoned = match runs::abandoned_exports(pool, job, current_run, include_running).await {
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
                if let Err(e) = runs::export_deleted(pool, run_id).await {
                    tracing::warn!(error = %e, "could not record the deleted export");
                }
                deleted += 1;
            }
            Err(e) => match e.refused_for_good() {
                Some(status) => record_delete_refused(pool, run_id, status).await,
                None => {
                    tracing::warn!(abandoned.run_id = run_id, error = %error_chain(&e), "could not delete an abandoned export")
                }
            },
        }
    }
    deleted
}
