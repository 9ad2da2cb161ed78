//! One sync run of one job, start to finish: discovery → token → `$export` kick-off → polling →
//! download and load of every file → DELETE of the export → run recorded.
//!
//! This is the only place that strings `smart`, `bulk` and `warehouse` together. It records
//! every step in the run tables and classifies failures as retryable or fatal; it never logs a
//! credential or a resource body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tokio_util::io::StreamReader;
use tracing::Instrument;

use crate::bulk::{BulkClient, ExportError, ExportRequest, Manifest, ManifestFile, PollPolicy};
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
    let result = execute(ctx, job, &runs, run_id)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
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

async fn execute(
    ctx: &SyncContext,
    job: &JobConfig,
    runs: &Runs,
    run_id: i64,
) -> Result<RunReport, SyncError> {
    let settings = &ctx.settings;
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
    let bulk = BulkClient::new(http, job.fhir.base_url.clone(), tokens, allow_insecure_http);

    let request = ExportRequest {
        level: job.export.level,
        group_id: job.export.group_id.clone(),
        types: job.export.types.clone(),
        since: None,
    };
    let kick_off = bulk.kick_off(&request).await?;
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
    let mut last_progress = String::new();
    let mut progress_updates = Vec::new();
    let manifest = bulk
        .wait_for_manifest(&kick_off.status_url, &policy, |progress| {
            if progress != last_progress {
                tracing::info!(export.progress = %progress, "export in progress");
                last_progress = progress.to_string();
                progress_updates.push(progress.to_string());
            }
        })
        .await?;
    if let Some(progress) = progress_updates.last() {
        runs.progress(run_id, progress).await?;
    }
    tracing::info!(
        export.transaction_time = %manifest.transaction_time,
        output_files = manifest.output.len(),
        error_files = manifest.error.len(),
        deleted_files = manifest.deleted.len(),
        "export complete"
    );

    let files = register_files(runs, run_id, &manifest).await?;
    let bytes = AtomicU64::new(0);
    let limits = LoadLimits {
        batch_lines: settings.batch_lines,
        max_line_bytes: settings.max_line_bytes,
    };
    // Deletions are applied after every output file has loaded: an export's output lists what
    // exists at its transactionTime, so the loader lets a version loaded by this run's output
    // win over this run's deletion of the same resource (see `warehouse::loader`).
    let (deleted, loaded_first): (Vec<_>, Vec<_>) = files
        .iter()
        .partition(|(_, _, kind)| *kind == FileKind::Deleted);
    for phase in [loaded_first, deleted] {
        let results: Vec<Result<(), SyncError>> = futures::stream::iter(phase)
            .map(|(record, file, kind)| {
                let target = FileTarget {
                    run_id,
                    file_id: record.id,
                    source: job.name.clone(),
                    kind: *kind,
                    resource_type: kind
                        .line_type()
                        .map_or_else(|| file.resource_type.clone(), str::to_string),
                };
                let span = tracing::info_span!("file", file.id = record.id, resource.type = %file.resource_type);
                load_file(&ctx.pool, runs, &bulk, target, file, manifest.requires_access_token, limits, &bytes)
                    .instrument(span)
            })
            .buffer_unordered(settings.max_parallel_downloads)
            .collect()
            .await;
        let failures: Vec<SyncError> = results.into_iter().filter_map(Result::err).collect();
        if let Some(first) = failures.into_iter().next() {
            return Err(first);
        }
    }

    // Every file is loaded: the server may now drop the files. A failure here loses nothing.
    if let Err(e) = bulk.delete(&kick_off.status_url).await {
        tracing::warn!(error = %error_chain(&e), "could not delete the finished export on the server");
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
        .chain(manifest.deleted.iter().map(|f| (f, FileKind::Deleted)))
        .collect();
    let rows: Vec<(&str, &str, String, Option<u64>)> = listed
        .iter()
        .map(|(f, kind)| {
            (
                kind.as_str(),
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
