//! One sync run of one job, start to finish: discovery → token → `$export` kick-off → polling →
//! download and load of every file → DELETE of the export → run recorded.
//!
//! This is the only place that strings `smart`, `bulk` and `warehouse` together. It records
//! every step in the run tables and classifies failures as retryable or fatal; it never logs a
//! credential or a resource body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sqlx::PgPool;
use tokio_util::io::StreamReader;

use tokio_util::sync::CancellationToken;

use crate::bulk::{BulkClient, ExportError, ExportRequest, ManifestFile, PollPolicy};
use crate::config::{JobConfig, SyncSettings};
use crate::queue::QueueSettings;
use crate::smart::{self, AuthError, KeyError};
use crate::transport::{self, HttpOptions};
use crate::warehouse::{self, FileTarget, LoadError, LoadLimits, Runs, TypeCount};

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
    let shutdown = CancellationToken::new();
    let workers = tokio::spawn(steps::run_workers(
        steps.clone(),
        shutdown.clone(),
        Duration::from_secs(30),
    ));
    let ended = wait_for_run(&ctx.pool, run_id).await;
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
        let http = transport::client(HttpOptions {
            connect_timeout: Duration::from_secs(settings.connect_timeout_seconds),
            read_timeout: Duration::from_secs(settings.read_timeout_seconds),
            allow_insecure_http,
        })
        .map_err(SyncError::Http)?;
        let prepared = smart::prepare(&http, job).await?;
        for note in &prepared.notes {
            tracing::warn!(auth.note = %note, "authorisation");
        }
        let authorized = smart::authorize(&prepared, job).await?;
        if let smart::ExportSupport::NotDeclared(message) =
            smart::export_support(&http, &job.fhir.base_url, job.export.level).await
        {
            tracing::warn!(reason = %message, "the server may not offer this export; trying anyway");
        }
        Ok(Session {
            bulk: BulkClient::new(
                http,
                job.fhir.base_url.clone(),
                prepared.tokens.clone(),
                allow_insecure_http,
            ),
            types: authorized.types,
        })
    }
}

/// The export a run of `job` asks for, limited to the types `session` is allowed.
pub fn export_request(job: &JobConfig, session: &Session, since: Option<String>) -> ExportRequest {
    ExportRequest {
        level: job.export.level,
        group_id: job.export.group_id.clone(),
        types: session.types.clone(),
        since,
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

/// Attempts per file for retryable failures; each attempt resumes after the committed lines.
const FILE_ATTEMPTS: u32 = 3;

#[allow(clippy::too_many_arguments)]
async fn load_file(
    pool: &PgPool,
    runs: &Runs,
    bulk: &BulkClient,
    target: FileTarget,
    file: &ManifestFile,
    requires_access_token: bool,
    limits: LoadLimits,
    total_bytes: &AtomicU64,
) -> Result<(), SyncError> {
    let name = transport::redacted(&file.url);
    runs.file_started(target.file_id).await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let bytes = AtomicU64::new(0);
        let result = download_and_load(
            pool,
            bulk,
            &target,
            file,
            requires_access_token,
            limits,
            &bytes,
        )
        .await;
        let read = bytes.load(Ordering::Relaxed);
        total_bytes.fetch_add(read, Ordering::Relaxed);
        let error = match result {
            Ok(stats) => {
                runs.file_loaded(target.file_id, read).await?;
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
                    "file loaded"
                );
                return Ok(());
            }
            Err(error) => error,
        };
        let retryable = error.is_retryable();
        if retryable && attempt < FILE_ATTEMPTS {
            let delay = Duration::from_millis(500 * 2u64.pow(attempt - 1));
            tracing::warn!(error = %error_chain(&error), attempt, retry_in_ms = delay.as_millis() as u64, "file failed, retrying");
            tokio::time::sleep(delay).await;
            continue;
        }
        runs.file_failed(target.file_id, read, &error_chain(&error))
            .await?;
        tracing::warn!(error = %error_chain(&error), file = %name, "file failed");
        return Err(error);
    }
}

async fn download_and_load(
    pool: &PgPool,
    bulk: &BulkClient,
    target: &FileTarget,
    file: &ManifestFile,
    requires_access_token: bool,
    limits: LoadLimits,
    bytes: &AtomicU64,
) -> Result<warehouse::LoadStats, SyncError> {
    let name = transport::redacted(&file.url);
    let response = bulk
        .open_file(file, requires_access_token)
        .await
        .map_err(|source| SyncError::Download {
            file: name.clone(),
            source,
        })?;
    let stream = response
        .bytes_stream()
        .inspect_ok(|chunk| {
            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        })
        .map_err(|e| std::io::Error::other(e.without_url()));
    let reader = tokio::io::BufReader::with_capacity(256 * 1024, StreamReader::new(stream));
    warehouse::load_ndjson(pool, target, reader, limits)
        .await
        .map_err(|source| SyncError::Load { file: name, source })
}
