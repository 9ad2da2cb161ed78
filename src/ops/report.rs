//! The read model behind every status surface: the HTTP API, the status page and the CLI all
//! show what these queries return, so they never disagree.
//!
//! Only reads. Never returns a credential-bearing column: file URLs come without their query
//! string (presigned URLs carry credentials there), `download_url` is never selected, and the
//! export status URL is redacted the same way.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
// The dynamic SQL below only pastes the constant column lists; values are always bound.
use sqlx::{AssertSqlSafe, PgPool};
use time::OffsetDateTime;

use crate::config::JobConfig;
use crate::warehouse::FileKind;
use crate::warehouse::runs::{FileStatus, RunStatus, Trigger};

/// One run, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct RunSummary {
    pub id: i64,
    pub job: String,
    pub status: RunStatus,
    pub trigger: Trigger,
    /// The cron tick the run was created for; `None` for manual runs.
    #[serde(with = "time::serde::rfc3339::option")]
    pub scheduled_for: Option<OffsetDateTime>,
    /// When the run was created (queued).
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// Last state change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Whether the run ignored the watermark and exported everything.
    pub full_export: bool,
    /// The `_since` the export was requested with.
    pub since: Option<String>,
    /// The manifest's `transactionTime`.
    pub transaction_time: Option<String>,
    /// The server's last `X-Progress` while exporting.
    pub progress: Option<String>,
    pub resources_loaded: i64,
    pub lines_rejected: i64,
    pub export_errors: i64,
    /// Requests repeated because the server or network said "later".
    pub retries: i64,
    /// Files in the manifest. Named `file_count` in JSON: a run detail's `files` is the list.
    #[serde(rename = "file_count")]
    pub files: i64,
    pub files_loaded: i64,
    pub bytes: i64,
    /// Why the run failed (or was skipped), for a person.
    pub error: Option<String>,
    /// Whether the failure may go away by itself (a 503) rather than needing an operator.
    pub error_retryable: Option<bool>,
    /// What an operator can change so that the job succeeds, when there is something.
    pub hint: Option<String>,
}

impl RunSummary {
    pub fn is_active(&self) -> bool {
        !self.status.is_terminal()
    }

    /// Seconds from creation to finish (or to `now` while running).
    pub fn duration_seconds(&self, now: OffsetDateTime) -> f64 {
        (self.finished_at.unwrap_or(now) - self.started_at).as_seconds_f64()
    }
}

#[cfg(test)]
impl RunSummary {
    /// A manual run created at `at`, not finished, with every count zero: the base of the test
    /// runs of everything that shows runs.
    pub(crate) fn for_test(
        id: i64,
        job: &str,
        status: RunStatus,
        at: OffsetDateTime,
    ) -> RunSummary {
        RunSummary {
            id,
            job: job.into(),
            status,
            trigger: Trigger::Manual,
            scheduled_for: None,
            started_at: at,
            finished_at: None,
            updated_at: at,
            full_export: false,
            since: None,
            transaction_time: None,
            progress: None,
            resources_loaded: 0,
            lines_rejected: 0,
            export_errors: 0,
            retries: 0,
            files: 0,
            files_loaded: 0,
            bytes: 0,
            error: None,
            error_retryable: None,
            hint: None,
        }
    }
}

/// One file of a run's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct FileDetail {
    pub id: i64,
    pub kind: FileKind,
    pub resource_type: String,
    /// Without query string.
    pub url: String,
    /// The manifest's `count`, when it gave one.
    pub manifest_count: Option<i64>,
    pub status: FileStatus,
    pub bytes: i64,
    /// Lines whose effects are committed (the resume checkpoint).
    pub lines_committed: i64,
    pub resources_loaded: i64,
    pub lines_rejected: i64,
    pub attempts: i32,
    pub link_refreshes: i32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub error: Option<String>,
}

/// One OperationOutcome issue from the manifest's error files: what the server said went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ExportIssue {
    pub file_id: i64,
    pub line_number: i64,
    pub severity: Option<String>,
    pub code: Option<String>,
    pub diagnostics: Option<String>,
}

/// Rejected lines of a run grouped by file and reason (the lines themselves stay in
/// `fhir_sync.rejected_line`: they may hold patient data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct RejectSummary {
    pub file_id: i64,
    pub reason: String,
    pub lines: i64,
    /// The first line number rejected for this reason.
    pub first_line: i64,
}

/// Everything about one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunDetail {
    #[serde(flatten)]
    pub run: RunSummary,
    /// The export's status URL, without query string.
    pub status_url: Option<String>,
    /// The `Expires` header of the completed export, as sent.
    pub export_expires: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub export_deleted_at: Option<OffsetDateTime>,
    pub files: Vec<FileDetail>,
    /// The first [`ISSUE_LIMIT`] export issues.
    pub export_issues: Vec<ExportIssue>,
    pub rejects: Vec<RejectSummary>,
}

#[cfg(test)]
impl RunDetail {
    /// The detail of `run` with no export, files, issues or rejects yet.
    pub(crate) fn for_test(run: RunSummary) -> RunDetail {
        RunDetail {
            run,
            status_url: None,
            export_expires: None,
            export_deleted_at: None,
            files: Vec::new(),
            export_issues: Vec::new(),
            rejects: Vec::new(),
        }
    }
}

impl RunDetail {
    /// Why a run has no files, for a person: a run still exporting, one that ended before it
    /// kicked off an export, and one that ended while the server was still exporting are three
    /// different stories.
    pub fn no_files_note(&self) -> &'static str {
        let kicked_off = self.status_url.is_some();
        match (self.run.status, self.run.is_active(), kicked_off) {
            (RunStatus::Skipped, _, _) => "the tick was skipped, so no export was started",
            (_, true, false) => "the export has not been kicked off yet",
            (_, true, true) => "the export has not finished on the server",
            (RunStatus::Succeeded | RunStatus::Partial, false, _) => "the export listed no files",
            (_, false, false) => "the run ended before an export was started",
            (_, false, true) => "the run ended before the export finished on the server",
        }
    }
}

/// How many export issues a run detail carries; the rest are in `fhir_sync.export_error`.
pub const ISSUE_LIMIT: i64 = 100;

/// The watermark of a job: the `_since` of its next incremental run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Watermark {
    pub transaction_time: String,
    pub run_id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A job's schedule as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScheduleView {
    pub cron: String,
    pub timezone: String,
    /// `skip` or `queue`.
    pub overlap: String,
}

/// One sync job: configuration, what it did last and what it does next.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobOverview {
    pub name: String,
    pub description: Option<String>,
    pub enabled: bool,
    pub fhir_base_url: String,
    pub resource_types: Vec<String>,
    pub schedule: Option<ScheduleView>,
    /// The next cron tick; `None` without a schedule or when the job is disabled.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_run_at: Option<OffsetDateTime>,
    /// The most recent run that is not `skipped`.
    pub last_run: Option<RunSummary>,
    /// The unfinished run, if one is queued or going.
    pub active_run: Option<RunSummary>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    /// Set when the job is late: the tick before its latest one, when no run has succeeded
    /// since it (see [`overdue_since`]). `None` when on time, unscheduled or disabled.
    #[serde(with = "time::serde::rfc3339::option")]
    pub overdue_since: Option<OffsetDateTime>,
    pub watermark: Option<Watermark>,
}

/// Filters of a run listing.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub job: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: i64,
}

const RUN_COLUMNS: &str =
    "r.id, r.job, r.status, r.trigger, r.scheduled_for, r.started_at, r.finished_at,
    r.updated_at, r.full_export, r.since, r.transaction_time, r.progress, r.resources_loaded,
    r.lines_rejected, r.export_errors, r.retries, r.error, r.error_retryable, r.hint,
    coalesce(f.files, 0) AS files, coalesce(f.files_loaded, 0) AS files_loaded,
    coalesce(f.bytes, 0)::bigint AS bytes";

/// Per-run file totals, joined to `fhir_sync.run r` (the status pasted is our own constant).
fn file_totals() -> String {
    format!(
        "LEFT JOIN LATERAL (
        SELECT count(*) AS files,
               count(*) FILTER (WHERE status = '{loaded}') AS files_loaded,
               sum(bytes) AS bytes
        FROM fhir_sync.run_file WHERE run_id = r.id) f ON true",
        loaded = FileStatus::Loaded
    )
}

/// Runs, newest first.
pub async fn runs(pool: &PgPool, filter: &RunFilter) -> sqlx::Result<Vec<RunSummary>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM fhir_sync.run r {}
         WHERE ($1::text IS NULL OR r.job = $1) AND ($2::text IS NULL OR r.status = $2)
         ORDER BY r.started_at DESC, r.id DESC
         LIMIT $3",
        file_totals()
    )))
    .bind(filter.job.as_deref())
    .bind(filter.status)
    .bind(filter.limit.max(0))
    .fetch_all(pool)
    .await
}

/// Runs that have not finished (queued or going), oldest first.
pub async fn active_runs(pool: &PgPool) -> sqlx::Result<Vec<RunSummary>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM fhir_sync.run r {}
         WHERE r.status = ANY($1)
         ORDER BY r.started_at, r.id",
        file_totals()
    )))
    .bind(&RunStatus::UNFINISHED[..])
    .fetch_all(pool)
    .await
}

/// One run as listed; `None` when there is no such run.
pub async fn run(pool: &PgPool, run_id: i64) -> sqlx::Result<Option<RunSummary>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM fhir_sync.run r {} WHERE r.id = $1",
        file_totals()
    )))
    .bind(run_id)
    .fetch_optional(pool)
    .await
}

/// The files of a run: output first, then deletions, then error files.
pub async fn run_files(pool: &PgPool, run_id: i64) -> sqlx::Result<Vec<FileDetail>> {
    sqlx::query_as(
        "SELECT id, kind, resource_type, url, manifest_count, status, bytes, lines_committed,
                resources_loaded, lines_rejected, attempts, link_refreshes, started_at,
                finished_at, error
         FROM fhir_sync.run_file WHERE run_id = $1
         ORDER BY CASE kind WHEN $2 THEN 0 WHEN $3 THEN 1 ELSE 2 END, resource_type, id",
    )
    .bind(run_id)
    .bind(FileKind::Output)
    .bind(FileKind::Deleted)
    .fetch_all(pool)
    .await
}

/// One run with its files, export issues and rejects; `None` when there is no such run.
pub async fn run_detail(pool: &PgPool, run_id: i64) -> sqlx::Result<Option<RunDetail>> {
    /// The run row as listed plus the export columns only the detail shows, in one read.
    #[derive(sqlx::FromRow)]
    struct DetailRow {
        #[sqlx(flatten)]
        run: RunSummary,
        status_url: Option<String>,
        export_expires: Option<String>,
        export_deleted_at: Option<OffsetDateTime>,
    }
    let Some(DetailRow {
        run,
        status_url,
        export_expires,
        export_deleted_at,
    }) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS}, r.status_url, r.export_expires, r.export_deleted_at
         FROM fhir_sync.run r {} WHERE r.id = $1",
        file_totals()
    )))
    .bind(run_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let files = run_files(pool, run_id).await?;
    let export_issues = sqlx::query_as(
        "SELECT e.file_id, e.line_number, i->>'severity' AS severity, i->>'code' AS code,
                coalesce(i->>'diagnostics', i->'details'->>'text') AS diagnostics
         FROM fhir_sync.export_error e
         LEFT JOIN LATERAL jsonb_array_elements(
             CASE WHEN jsonb_typeof(e.outcome->'issue') = 'array' THEN e.outcome->'issue'
                  ELSE '[]'::jsonb END) i ON true
         WHERE e.run_id = $1
         ORDER BY e.file_id, e.line_number
         LIMIT $2",
    )
    .bind(run_id)
    .bind(ISSUE_LIMIT)
    .fetch_all(pool)
    .await?;
    let rejects = sqlx::query_as(
        "SELECT file_id, reason, count(*) AS lines, min(line_number) AS first_line
         FROM fhir_sync.rejected_line WHERE run_id = $1
         GROUP BY file_id, reason ORDER BY file_id, min(line_number)",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    Ok(Some(RunDetail {
        run,
        status_url: status_url.as_deref().map(without_query),
        export_expires,
        export_deleted_at,
        files,
        export_issues,
        rejects,
    }))
}

/// Every configured job with its last, active and next run.
pub async fn jobs(
    pool: &PgPool,
    jobs: &[Arc<JobConfig>],
    now: OffsetDateTime,
) -> sqlx::Result<Vec<JobOverview>> {
    let names: Vec<String> = jobs.iter().map(|j| j.name.clone()).collect();
    let last: Vec<RunSummary> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT DISTINCT ON (r.job) {RUN_COLUMNS} FROM fhir_sync.run r {}
         WHERE r.job = ANY($1) AND r.status <> $2
         ORDER BY r.job, r.started_at DESC, r.id DESC",
        file_totals()
    )))
    .bind(&names)
    .bind(RunStatus::Skipped)
    .fetch_all(pool)
    .await?;
    let active: Vec<RunSummary> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT DISTINCT ON (r.job) {RUN_COLUMNS} FROM fhir_sync.run r {}
         WHERE r.job = ANY($1) AND r.status = ANY($2)
         ORDER BY r.job, r.started_at DESC, r.id DESC",
        file_totals()
    )))
    .bind(&names)
    .bind(&RunStatus::UNFINISHED[..])
    .fetch_all(pool)
    .await?;
    // When each job was first seen to run (its first tick, or its first manual run) and when
    // it last succeeded: a job is judged overdue only once it has had a whole period.
    let history: Vec<(String, OffsetDateTime, Option<OffsetDateTime>)> = sqlx::query_as(
        "SELECT job, min(coalesce(scheduled_for, started_at)),
                max(finished_at) FILTER (WHERE status = $2)
         FROM fhir_sync.run WHERE job = ANY($1) GROUP BY job",
    )
    .bind(&names)
    .bind(RunStatus::Succeeded)
    .fetch_all(pool)
    .await?;
    let watermarks: Vec<(String, String, i64, OffsetDateTime)> = sqlx::query_as(
        "SELECT job, transaction_time, run_id, updated_at FROM fhir_sync.watermark WHERE job = ANY($1)",
    )
    .bind(&names)
    .fetch_all(pool)
    .await?;

    let mut last: HashMap<String, RunSummary> =
        last.into_iter().map(|r| (r.job.clone(), r)).collect();
    let mut active: HashMap<String, RunSummary> =
        active.into_iter().map(|r| (r.job.clone(), r)).collect();
    let first_seen: HashMap<String, OffsetDateTime> = history
        .iter()
        .map(|(job, first, _)| (job.clone(), *first))
        .collect();
    let successes: HashMap<String, OffsetDateTime> = history
        .into_iter()
        .filter_map(|(job, _, success)| Some((job, success?)))
        .collect();
    let mut watermarks: HashMap<String, Watermark> = watermarks
        .into_iter()
        .map(|(job, transaction_time, run_id, updated_at)| {
            (
                job,
                Watermark {
                    transaction_time,
                    run_id,
                    updated_at,
                },
            )
        })
        .collect();
    Ok(jobs
        .iter()
        .map(|job| {
            let next_run_at = job
                .schedule
                .as_ref()
                .filter(|_| job.enabled)
                .and_then(|s| crate::schedule::next_tick_after(s, now).ok());
            JobOverview {
                name: job.name.clone(),
                description: job.description.clone(),
                enabled: job.enabled,
                fhir_base_url: crate::transport::redacted(&job.fhir.base_url),
                resource_types: job.export.types.clone(),
                schedule: job.schedule.as_ref().map(|s| ScheduleView {
                    cron: s.cron.clone(),
                    timezone: s.timezone.clone(),
                    overlap: match s.overlap {
                        crate::config::Overlap::Skip => "skip".into(),
                        crate::config::Overlap::Queue => "queue".into(),
                    },
                }),
                next_run_at,
                last_run: last.remove(&job.name),
                active_run: active.remove(&job.name),
                last_success_at: successes.get(&job.name).copied(),
                overdue_since: job.schedule.as_ref().filter(|_| job.enabled).and_then(|s| {
                    overdue_since(
                        s,
                        first_seen.get(&job.name).copied(),
                        successes.get(&job.name).copied(),
                        now,
                    )
                }),
                watermark: watermarks.remove(&job.name),
            }
        })
        .collect())
}

/// What the metrics need to know about runs, read at scrape time: the numbers to alert on.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// The database's clock: every process computes ages against the same one.
    pub now: OffsetDateTime,
    /// One entry per job asked for, in the order asked.
    pub jobs: Vec<JobHealth>,
    /// Unfinished runs of any job, counted per (job, status).
    pub active_runs: Vec<(String, RunStatus, i64)>,
}

/// The success history of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobHealth {
    pub job: String,
    /// When the job's first run was created.
    pub first_run_at: Option<OffsetDateTime>,
    /// When the job's last successful run finished.
    pub last_success_at: Option<OffsetDateTime>,
    /// The watermark's `transactionTime`, as the server sent it.
    pub watermark: Option<String>,
}

/// Success history of the `jobs` named, and unfinished runs of every job.
pub async fn health(pool: &PgPool, jobs: &[String]) -> sqlx::Result<Health> {
    let now: OffsetDateTime = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let history: Vec<(String, Option<OffsetDateTime>, Option<OffsetDateTime>)> = sqlx::query_as(
        "SELECT job, min(started_at), max(finished_at) FILTER (WHERE status = $2)
         FROM fhir_sync.run WHERE job = ANY($1) GROUP BY job",
    )
    .bind(jobs)
    .bind(RunStatus::Succeeded)
    .fetch_all(pool)
    .await?;
    let watermarks: Vec<(String, String)> =
        sqlx::query_as("SELECT job, transaction_time FROM fhir_sync.watermark WHERE job = ANY($1)")
            .bind(jobs)
            .fetch_all(pool)
            .await?;
    let active_runs: Vec<(String, RunStatus, i64)> = sqlx::query_as(
        "SELECT job, status, count(*) FROM fhir_sync.run WHERE status = ANY($1)
         GROUP BY job, status ORDER BY job, status",
    )
    .bind(&RunStatus::UNFINISHED[..])
    .fetch_all(pool)
    .await?;
    let mut history: HashMap<String, (Option<OffsetDateTime>, Option<OffsetDateTime>)> = history
        .into_iter()
        .map(|(job, first, last)| (job, (first, last)))
        .collect();
    let mut watermarks: HashMap<String, String> = watermarks.into_iter().collect();
    Ok(Health {
        now,
        jobs: jobs
            .iter()
            .map(|job| {
                let (first_run_at, last_success_at) = history.remove(job).unwrap_or_default();
                JobHealth {
                    job: job.clone(),
                    first_run_at,
                    last_success_at,
                    watermark: watermarks.remove(job),
                }
            })
            .collect(),
        active_runs,
    })
}

/// When a scheduled job is overdue: the tick before its latest one, if no run has succeeded
/// since that tick. By the latest tick a whole schedule period has passed in which the earlier
/// tick's run should have started and finished, so a job that is merely running its current
/// tick is not flagged; a missed tick (no process running) or a failed run is.
///
/// A job that never succeeded is judged from `first_seen`, the tick of its first run (or the
/// creation of a first manual run): it is overdue once a whole period has passed since then.
/// A job that never ran at all is new, not late (`serve` starts a new job at its next tick),
/// which is also when the metrics start watching it.
pub fn overdue_since(
    schedule: &crate::config::ScheduleConfig,
    first_seen: Option<OffsetDateTime>,
    last_success_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    let latest = crate::schedule::tick_at_or_before(schedule, now).ok()?;
    let before =
        crate::schedule::tick_at_or_before(schedule, latest - time::Duration::seconds(1)).ok()?;
    match (last_success_at, first_seen) {
        (Some(success), _) if success >= before => None,
        (Some(_), _) => Some(before),
        (None, Some(first)) if first <= before => Some(before),
        (None, _) => None,
    }
}

fn without_query(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => crate::transport::redacted(&parsed),
        Err(_) => url.split(['?', '#']).next().unwrap_or("").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_detail_serializes_each_key_once() {
        let at = time::macros::datetime!(2026-11-29 03:00 UTC);
        let detail = RunDetail::for_test(RunSummary {
            finished_at: Some(at),
            full_export: true,
            ..RunSummary::for_test(1, "demo", RunStatus::Succeeded, at)
        });
        // `flatten` writes the summary's keys next to the detail's; a name used by both would
        // appear twice and a JSON reader would keep only one.
        let text = serde_json::to_string(&detail).unwrap();
        let keys = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
            .unwrap()
            .len();
        assert_eq!(text.matches("\":").count(), keys, "{text}");
        assert!(text.contains("\"file_count\":0") && text.contains("\"files\":[]"));
    }

    #[test]
    fn a_run_without_files_says_how_far_it_got() {
        let at = time::macros::datetime!(2026-11-29 03:00 UTC);
        let detail = |status: RunStatus, status_url: Option<&str>| RunDetail {
            run: RunSummary::for_test(1, "demo", status, at),
            status_url: status_url.map(str::to_string),
            export_expires: None,
            export_deleted_at: None,
            files: Vec::new(),
            export_issues: Vec::new(),
            rejects: Vec::new(),
        };
        let url = Some("https://ehr.example/status/1");
        let cases = [
            (
                RunStatus::Queued,
                None,
                "the export has not been kicked off yet",
            ),
            (
                RunStatus::Exporting,
                url,
                "the export has not finished on the server",
            ),
            (
                RunStatus::Failed,
                None,
                "the run ended before an export was started",
            ),
            (
                RunStatus::Cancelled,
                None,
                "the run ended before an export was started",
            ),
            (
                RunStatus::Failed,
                url,
                "the run ended before the export finished on the server",
            ),
            (RunStatus::Succeeded, url, "the export listed no files"),
            (
                RunStatus::Skipped,
                None,
                "the tick was skipped, so no export was started",
            ),
        ];
        for (status, url, expected) in cases {
            assert_eq!(detail(status, url).no_files_note(), expected, "{status}");
        }
    }

    #[test]
    fn status_urls_lose_their_query() {
        assert_eq!(
            without_query("https://ehr.example/status/1?token=secret"),
            "https://ehr.example/status/1"
        );
        assert_eq!(without_query("not a url?token=x"), "not a url");
    }

    #[test]
    fn a_job_is_overdue_once_a_whole_period_passed_without_a_success() {
        let daily = crate::config::ScheduleConfig {
            cron: "0 2 * * *".into(),
            timezone: "UTC".into(),
            overlap: Default::default(),
        };
        let now = time::macros::datetime!(2026-11-29 03:00 UTC);
        let yesterday_tick = time::macros::datetime!(2026-11-28 02:00 UTC);
        // (last success, expected) at 03:00, an hour after today's 02:00 tick.
        let cases = [
            // Yesterday's run succeeded; today's may still be going.
            (Some(time::macros::datetime!(2026-11-28 02:30 UTC)), None),
            // Today's run already succeeded.
            (Some(time::macros::datetime!(2026-11-29 02:20 UTC)), None),
            // Nothing since the day before yesterday: yesterday's tick produced no success.
            (
                Some(time::macros::datetime!(2026-11-27 02:30 UTC)),
                Some(yesterday_tick),
            ),
            (None, Some(yesterday_tick)),
        ];
        let first_seen = Some(time::macros::datetime!(2026-11-01 02:00 UTC));
        for (last_success, expected) in cases {
            assert_eq!(
                overdue_since(&daily, first_seen, last_success, now),
                expected,
                "last success {last_success:?}"
            );
        }
    }

    #[test]
    fn a_new_job_is_not_overdue_before_it_had_a_whole_period() {
        let daily = crate::config::ScheduleConfig {
            cron: "0 2 * * *".into(),
            timezone: "UTC".into(),
            overlap: Default::default(),
        };
        let now = time::macros::datetime!(2026-11-29 03:00 UTC);
        let yesterday_tick = time::macros::datetime!(2026-11-28 02:00 UTC);
        // (first seen, expected) for a job that never succeeded, at 03:00.
        let cases = [
            // Added just now: no run yet.
            (None, None),
            // Its first tick was today's, which is still running or just failed.
            (Some(time::macros::datetime!(2026-11-29 02:00 UTC)), None),
            // A manual run yesterday afternoon: less than a period ago.
            (Some(time::macros::datetime!(2026-11-28 15:00 UTC)), None),
            // Its first tick was yesterday's and nothing succeeded since.
            (Some(yesterday_tick), Some(yesterday_tick)),
            (
                Some(time::macros::datetime!(2026-11-20 02:00 UTC)),
                Some(yesterday_tick),
            ),
        ];
        for (first_seen, expected) in cases {
            assert_eq!(
                overdue_since(&daily, first_seen, None, now),
                expected,
                "first seen {first_seen:?}"
            );
        }
    }
}
