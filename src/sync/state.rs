//! The persisted run state machine: every transition is one guarded SQL statement
//! (`... WHERE status = <expected>`), so a step that runs twice, or late, changes nothing.
//!
//! ```text
//! queued → kicking_off → exporting → loading → completing → succeeded
//!    └──────────┴────────────┴──────────┴───────────┴──────→ failed | cancelled
//! (a tick that finds the job busy records a 'skipped' run instead)
//! ```

use sqlx::PgPool;

use crate::ops::metrics;

/// Statuses after which nothing more happens to a run.
pub const TERMINAL: [&str; 4] = ["succeeded", "failed", "cancelled", "skipped"];

/// The columns of a run the steps need.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub job: String,
    pub status: String,
    pub status_url: Option<String>,
    pub since: Option<String>,
    pub full_export: bool,
    pub requires_access_token: Option<bool>,
    pub transaction_time: Option<String>,
    pub started_at: time::OffsetDateTime,
}

impl RunRow {
    pub fn is_terminal(&self) -> bool {
        TERMINAL.contains(&self.status.as_str())
    }
}

/// How a run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Manual,
    Schedule,
    CatchUp,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch-up",
        }
    }
}

pub async fn load(pool: &PgPool, run_id: i64) -> sqlx::Result<RunRow> {
    sqlx::query_as(
        "SELECT id, job, status, status_url, since, full_export, requires_access_token, transaction_time, started_at
         FROM fhir_sync.run WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
}

/// Creates a queued run. For a scheduled tick, returns `None` when another process already
/// created the run for the same tick.
pub async fn create(
    pool: &PgPool,
    job: &str,
    fhir_base_url: &str,
    trigger: Trigger,
    scheduled_for: Option<time::OffsetDateTime>,
    full_export: bool,
) -> sqlx::Result<Option<i64>> {
    let created: Option<i64> = sqlx::query_scalar(
        "INSERT INTO fhir_sync.run (job, source, fhir_base_url, status, trigger, scheduled_for, full_export)
         VALUES ($1, $1, $2, 'queued', $3, $4, $5)
         ON CONFLICT (job, scheduled_for) WHERE scheduled_for IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(job)
    .bind(fhir_base_url)
    .bind(trigger.as_str())
    .bind(scheduled_for)
    .bind(full_export)
    .fetch_optional(pool)
    .await?;
    // Counted only by the process whose insert made the run: a tick seen by several
    // processes is one run.
    if created.is_some() {
        metrics::run_started(job);
    }
    Ok(created)
}

/// Records a tick that was not run because the job was busy.
pub async fn record_skipped(
    pool: &PgPool,
    job: &str,
    fhir_base_url: &str,
    scheduled_for: time::OffsetDateTime,
    busy_run: i64,
) -> sqlx::Result<()> {
    let inserted = sqlx::query(
        "INSERT INTO fhir_sync.run (job, source, fhir_base_url, status, trigger, scheduled_for, finished_at, error)
         VALUES ($1, $1, $2, 'skipped', 'schedule', $3, now(), $4)
         ON CONFLICT (job, scheduled_for) WHERE scheduled_for IS NOT NULL DO NOTHING",
    )
    .bind(job)
    .bind(fhir_base_url)
    .bind(scheduled_for)
    .bind(format!("skipped: run {busy_run} of this job was still in progress (schedule.overlap = \"skip\")"))
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        metrics::run_skipped(job);
    }
    Ok(())
}

/// The job's unfinished run (queued or active), if any.
pub async fn unfinished_run(pool: &PgPool, job: &str) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM fhir_sync.run WHERE job = $1
           AND status IN ('queued', 'kicking_off', 'exporting', 'loading', 'completing')
         ORDER BY id LIMIT 1",
    )
    .bind(job)
    .fetch_optional(pool)
    .await
}

/// Moves `queued` → `kicking_off`. `Ok(false)` when the run was not queued, or when an older
/// run of the same job is still queued (runs of a job start in the order they were created;
/// the caller tells the two apart by re-reading the status); `Err` with a unique violation when
/// another run of the job is active (the caller waits and tries again).
pub async fn start_kick_off(pool: &PgPool, run_id: i64, since: Option<&str>) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run r SET status = 'kicking_off', since = $2, updated_at = now()
         WHERE r.id = $1 AND r.status = 'queued'
           AND NOT EXISTS (SELECT 1 FROM fhir_sync.run o
                           WHERE o.job = r.job AND o.status = 'queued' AND o.id < r.id)",
    )
    .bind(run_id)
    .bind(since)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Stores the status URL and moves to `exporting`, in one statement: a restart that finds the
/// status URL polls it instead of starting a second export.
pub async fn exporting(
    pool: &PgPool,
    run_id: i64,
    request_url: &str,
    status_url: &str,
) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run SET status = 'exporting', export_request = $2, status_url = $3, updated_at = now()
         WHERE id = $1 AND status = 'kicking_off'",
    )
    .bind(run_id)
    .bind(request_url)
    .bind(status_url)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

pub async fn progress(pool: &PgPool, run_id: i64, progress: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run SET progress = $2 WHERE id = $1 AND progress IS DISTINCT FROM $2",
    )
    .bind(run_id)
    .bind(progress)
    .execute(pool)
    .await
    .map(drop)
}

/// Counts one retry of a queue step (its request is repeated as a new task).
pub async fn count_retry(pool: &PgPool, run_id: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE fhir_sync.run SET retries = retries + 1 WHERE id = $1")
        .bind(run_id)
        .execute(pool)
        .await
        .map(drop)
}

/// One file of a manifest to register.
pub struct NewFile<'a> {
    pub kind: &'a str,
    pub resource_type: &'a str,
    pub url: &'a url::Url,
    pub count: Option<u64>,
}

/// A registered file, as the load step needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileRow {
    pub id: i64,
    pub run_id: i64,
    pub kind: String,
    pub resource_type: String,
    pub download_url: Option<String>,
    pub manifest_count: Option<i64>,
    pub status: String,
}

/// Registers the manifest's files and moves `exporting` → `loading`, in one transaction.
/// Returns the files not yet loaded, or `None` if the run was no longer exporting.
pub async fn manifest_ready(
    pool: &PgPool,
    run_id: i64,
    transaction_time: &str,
    requires_access_token: bool,
    files: &[NewFile<'_>],
) -> sqlx::Result<Option<Vec<FileRow>>> {
    let mut tx = pool.begin().await?;
    let moved = sqlx::query(
        "UPDATE fhir_sync.run SET status = 'loading', transaction_time = $2, requires_access_token = $3,
             progress = NULL, updated_at = now()
         WHERE id = $1 AND status = 'exporting'",
    )
    .bind(run_id)
    .bind(transaction_time)
    .bind(requires_access_token)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Ok(None);
    }
    for file in files {
        sqlx::query(
            "INSERT INTO fhir_sync.run_file (run_id, kind, resource_type, url, download_url, manifest_count)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (run_id, kind, url) DO NOTHING",
        )
        .bind(run_id)
        .bind(file.kind)
        .bind(file.resource_type)
        .bind(crate::transport::redacted(file.url))
        .bind(file.url.as_str())
        .bind(file.count.map(|c| c as i64))
        .execute(&mut *tx)
        .await?;
    }
    let rows = pending_files(&mut tx, run_id).await?;
    tx.commit().await?;
    Ok(Some(rows))
}

async fn pending_files(conn: &mut sqlx::PgConnection, run_id: i64) -> sqlx::Result<Vec<FileRow>> {
    sqlx::query_as(
        "SELECT id, run_id, kind, resource_type, download_url, manifest_count, status
         FROM fhir_sync.run_file WHERE run_id = $1 AND status <> 'loaded' ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(conn)
    .await
}

/// Files of a run whose load may be queued now: output and error files not loaded yet, and
/// deletion files once no output or error file is left to load.
pub async fn loadable_files(pool: &PgPool, run_id: i64) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM fhir_sync.run_file f
         WHERE run_id = $1 AND status <> 'loaded'
           AND (kind <> 'deleted' OR NOT EXISTS (
                SELECT 1 FROM fhir_sync.run_file o
                WHERE o.run_id = $1 AND o.kind <> 'deleted' AND o.status <> 'loaded'))
         ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
}

pub async fn file(pool: &PgPool, file_id: i64) -> sqlx::Result<FileRow> {
    sqlx::query_as(
        "SELECT id, run_id, kind, resource_type, download_url, manifest_count, status FROM fhir_sync.run_file WHERE id = $1",
    )
    .bind(file_id)
    .fetch_one(pool)
    .await
}

/// Takes (or renews) the lease on a file for `owner`. `false` when another live worker holds it.
pub async fn lease_file(
    pool: &PgPool,
    file_id: i64,
    owner: &str,
    seconds: u64,
) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run_file SET lease_owner = $2, lease_expires_at = now() + make_interval(secs => $3)
         WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_expires_at < now())",
    )
    .bind(file_id)
    .bind(owner)
    .bind(seconds as f64)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

pub async fn release_file(pool: &PgPool, file_id: i64, owner: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run_file SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_owner = $2",
    )
    .bind(file_id)
    .bind(owner)
    .execute(pool)
    .await
    .map(drop)
}

/// Moves `loading` → `completing` once every file is loaded. `true` for the one caller that
/// made the move: the statement re-checks both conditions under the row lock, so when two
/// files finish together exactly one of them moves the run on.
pub async fn all_files_loaded(pool: &PgPool, run_id: i64) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run SET status = 'completing', updated_at = now()
         WHERE id = $1 AND status = 'loading'
           AND NOT EXISTS (SELECT 1 FROM fhir_sync.run_file WHERE run_id = $1 AND status <> 'loaded')",
    )
    .bind(run_id)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Moves `completing` → `succeeded`, totals the counts and advances the job's watermark, in one
/// transaction: the watermark never moves unless every file of the run is loaded.
pub async fn succeed(pool: &PgPool, run_id: i64) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, Option<String>, f64)> = sqlx::query_as(
        "UPDATE fhir_sync.run r SET status = 'succeeded', finished_at = now(), updated_at = now(), progress = NULL,
             error = NULL, error_retryable = NULL,
             resources_loaded = t.loaded, lines_rejected = t.rejected, export_errors = t.outcomes
         FROM (SELECT coalesce(sum(resources_loaded) FILTER (WHERE kind = 'output'), 0) AS loaded,
                      coalesce(sum(lines_rejected), 0) AS rejected,
                      coalesce(sum(resources_loaded) FILTER (WHERE kind = 'error'), 0) AS outcomes
               FROM fhir_sync.run_file WHERE run_id = $1) t
         WHERE r.id = $1 AND r.status = 'completing'
         RETURNING r.job, r.transaction_time, extract(epoch FROM r.finished_at - r.started_at)::float8",
    )
    .bind(run_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((job, transaction_time, duration)) = row else {
        return Ok(false);
    };
    if let Some(transaction_time) = transaction_time {
        sqlx::query(
            "INSERT INTO fhir_sync.watermark (job, transaction_time, run_id) VALUES ($1, $2, $3)
             ON CONFLICT (job) DO UPDATE SET transaction_time = EXCLUDED.transaction_time,
                 run_id = EXCLUDED.run_id, updated_at = now()",
        )
        .bind(&job)
        .bind(&transaction_time)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    // After the commit: a rolled-back success is no success.
    metrics::run_finished(&job, "succeeded", duration);
    Ok(true)
}

/// Fails a run that is not finished yet. The watermark is not touched.
pub async fn fail(pool: &PgPool, run_id: i64, error: &str, retryable: bool) -> sqlx::Result<bool> {
    let ended: Option<(String, f64)> = sqlx::query_as(
        "UPDATE fhir_sync.run r SET status = 'failed', error = $2, error_retryable = $3, finished_at = now(),
             updated_at = now(), progress = NULL,
             resources_loaded = t.loaded, lines_rejected = t.rejected, export_errors = t.outcomes
         FROM (SELECT coalesce(sum(resources_loaded) FILTER (WHERE kind = 'output'), 0) AS loaded,
                      coalesce(sum(lines_rejected), 0) AS rejected,
                      coalesce(sum(resources_loaded) FILTER (WHERE kind = 'error'), 0) AS outcomes
               FROM fhir_sync.run_file WHERE run_id = $1) t
         WHERE r.id = $1 AND r.status NOT IN ('succeeded', 'failed', 'cancelled', 'skipped')
         RETURNING r.job, extract(epoch FROM r.finished_at - r.started_at)::float8",
    )
    .bind(run_id)
    .bind(error)
    .bind(retryable)
    .fetch_optional(pool)
    .await?;
    Ok(finished(ended, "failed"))
}

/// Counts a run the guarded statement ended (`Some`); `None` means another step or process
/// ended it first and counted it.
fn finished(ended: Option<(String, f64)>, status: &'static str) -> bool {
    match ended {
        Some((job, duration)) => {
            metrics::run_finished(&job, status, duration);
            true
        }
        None => false,
    }
}

/// Marks an unfinished run cancelled; its remaining queued steps then do nothing.
pub async fn cancel(pool: &PgPool, run_id: i64) -> sqlx::Result<bool> {
    let ended: Option<(String, f64)> = sqlx::query_as(
        "UPDATE fhir_sync.run SET status = 'cancelled', finished_at = now(), updated_at = now(), progress = NULL,
             error = coalesce(error, 'cancelled by an operator')
         WHERE id = $1 AND status NOT IN ('succeeded', 'failed', 'cancelled', 'skipped')
         RETURNING job, extract(epoch FROM finished_at - started_at)::float8",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    Ok(finished(ended, "cancelled"))
}

/// The `_since` for the job's next run: the last successful run's transactionTime, moved back
/// by `overlap_seconds` when configured (safe because loads are newer-wins).
pub async fn watermark(
    pool: &PgPool,
    job: &str,
    overlap_seconds: u64,
) -> sqlx::Result<Option<String>> {
    let stored: Option<String> =
        sqlx::query_scalar("SELECT transaction_time FROM fhir_sync.watermark WHERE job = $1")
            .bind(job)
            .fetch_optional(pool)
            .await?;
    Ok(stored.map(|since| {
        if overlap_seconds == 0 {
            return since;
        }
        match crate::fhir::parse_instant(&since) {
            Some(instant) => {
                let earlier = instant - time::Duration::seconds(overlap_seconds as i64);
                earlier
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or(since)
            }
            None => since,
        }
    }))
}

/// The latest tick a run was created for, and when the job's newest run started.
pub async fn schedule_history(
    pool: &PgPool,
    job: &str,
) -> sqlx::Result<(Option<time::OffsetDateTime>, Option<time::OffsetDateTime>)> {
    sqlx::query_as("SELECT max(scheduled_for), max(started_at) FROM fhir_sync.run WHERE job = $1")
        .bind(job)
        .fetch_one(pool)
        .await
}
