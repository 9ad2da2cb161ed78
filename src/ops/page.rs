//! The status page at `/`, and one run at `/runs/{id}`: server-rendered HTML for the person on
//! call — every job with its last and next run, the running runs' progress per file, recent
//! runs, and failures with their reasons.
//!
//! Everything shown comes from [`super::report`], so the page, the API and the CLI agree. Run
//! errors and OperationOutcome diagnostics are text from FHIR servers: maud escapes every
//! interpolated value, and the Content-Security-Policy forbids scripts and outside resources as
//! a second line of defence. The page needs no front-end build and loads nothing but itself;
//! it refreshes with a meta refresh, not a script. Database errors are logged, never shown.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use sqlx::PgPool;
use time::OffsetDateTime;

use super::format::{
    excerpt, human_bytes, human_duration as duration, percent, relative, thousands,
};
use super::report::{self, FileDetail, JobOverview, RunDetail, RunFilter, RunSummary};
use super::state::OpsState;
use crate::views::materialise::ViewStatus;
use crate::warehouse::FileKind;
use crate::warehouse::runs::{FileStatus, RunStatus};

/// Seconds between the page's own reloads.
pub const REFRESH_SECONDS: u32 = 10;
/// Runs listed under "Recent runs".
const RECENT_RUNS: i64 = 25;
/// Runs whose reasons are spelled out under "Failures and server-reported issues".
const FAILED_RUNS_SHOWN: usize = 5;
/// Export issues shown per run on `/`; the run's own page shows the report's whole list.
const ISSUES_SHOWN: usize = 10;
/// Characters of a run's error shown in the summary and the recent-runs table (the whole text
/// is under "Failures and server-reported issues" and on the run's page).
const ERROR_EXCERPT_CHARS: usize = 160;

/// Scripts are never needed: the page refreshes with `<meta http-equiv="refresh">`.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The routes this module serves.
pub fn routes() -> Router<OpsState> {
    Router::new()
        .route("/", get(index))
        .route("/runs/{id}", get(run_page))
}

/// What `/` shows, read in one go.
struct StatusView {
    jobs: Vec<JobOverview>,
    running: Vec<RunDetail>,
    recent: Vec<RunSummary>,
    failures: Vec<RunDetail>,
    views: Vec<ViewStatus>,
}

impl StatusView {
    async fn load(state: &OpsState, now: OffsetDateTime) -> sqlx::Result<StatusView> {
        let pool = &state.steps.pool;
        let mut configured = state.steps.jobs();
        configured.sort_by(|a, b| a.name.cmp(&b.name));
        let jobs = report::jobs(pool, &configured, now).await?;
        let recent = report::runs(
            pool,
            &RunFilter {
                limit: RECENT_RUNS,
                ..RunFilter::default()
            },
        )
        .await?;
        let active: Vec<i64> = report::active_runs(pool)
            .await?
            .iter()
            .map(|r| r.id)
            .collect();
        let running = details(pool, &active).await?;
        // The failed (or partial) last run of every job, even one older than the recent list,
        // then recent runs that failed or whose server reported issues.
        let mut failure_ids: Vec<i64> = jobs
            .iter()
            .filter_map(|j| j.last_run.as_ref())
            .filter(|r| needs_attention(r.status))
            .map(|r| r.id)
            .collect();
        for run in &recent {
            if (needs_attention(run.status) || run.export_errors > 0)
                && !failure_ids.contains(&run.id)
            {
                failure_ids.push(run.id);
            }
        }
        failure_ids.sort_unstable_by(|a, b| b.cmp(a));
        failure_ids.truncate(FAILED_RUNS_SHOWN);
        let failures = details(pool, &failure_ids).await?;
        let views = crate::views::materialise::states(pool).await?;
        Ok(StatusView {
            jobs,
            running,
            recent,
            failures,
            views,
        })
    }
}

async fn details(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<RunDetail>> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        out.extend(report::run_detail(pool, id).await?);
    }
    Ok(out)
}

async fn index(State(state): State<OpsState>) -> Response {
    let now = OffsetDateTime::now_utc();
    match StatusView::load(&state, now).await {
        Ok(view) => page_response(StatusCode::OK, render_index(&view, now)),
        Err(e) => unavailable(&e),
    }
}

async fn run_page(State(state): State<OpsState>, Path(id): Path<String>) -> Response {
    let now = OffsetDateTime::now_utc();
    // An id that is not a number names no run; axum's own rejection would echo the input.
    let Ok(id) = id.parse::<i64>() else {
        return not_found();
    };
    match report::run_detail(&state.steps.pool, id).await {
        Ok(Some(detail)) => page_response(StatusCode::OK, render_run_page(&detail, now)),
        Ok(None) => not_found(),
        Err(e) => unavailable(&e),
    }
}

fn unavailable(error: &sqlx::Error) -> Response {
    tracing::error!(error = %error, "the status page could not read the database");
    let body = layout(
        "fhir-sync status: unavailable",
        html! {
            h1 { "fhir-sync status" }
            div.alert role="alert" {
                "The status cannot be read from the database right now (error code "
                code { "database_unavailable" } "). The service log has the details."
            }
        },
    );
    page_response(StatusCode::SERVICE_UNAVAILABLE, body)
}

fn not_found() -> Response {
    let body = layout(
        "fhir-sync: no such run",
        html! {
            h1 { "No such run" }
            p { a href="/" { "Back to the status page" } }
        },
    );
    page_response(StatusCode::NOT_FOUND, body)
}

fn page_response(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, markup.into_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Status is only true when it is read; a cached copy would show a stale all-clear.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:1rem 2rem;color:#1b1f24;background:#fff}
h1{font-size:1.4rem;margin:.2rem 0}h2{font-size:1.15rem;margin:1.6rem 0 .4rem;border-bottom:1px solid #d0d7de}
h3{font-size:1rem;margin:1rem 0 .3rem}
table{border-collapse:collapse;width:100%;margin:.3rem 0}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#59636e}.small{font-size:.85em}
.badge{display:inline-block;padding:0 .45rem;border-radius:.6rem;font-size:.8rem;font-weight:600;white-space:nowrap}
.s-succeeded,.s-loaded{background:#dafbe1;color:#116329}
.s-failed{background:#cf222e;color:#fff}
.s-partial{background:#fff8c5;color:#7d4e00}
.s-running,.s-queued,.s-kicking_off,.s-exporting,.s-loading,.s-completing{background:#ddf4ff;color:#0550ae}
.s-cancelled,.s-skipped,.s-pending,.s-idle,.s-disabled{background:#eaeef2;color:#424a53}
.s-overdue{background:#bc4c00;color:#fff}
tr.overdue td{background:#fff1e5}tr.failed td{background:#ffebe9}
.alert{border:2px solid #cf222e;background:#ffebe9;padding:.5rem .8rem;border-radius:.4rem;margin:.6rem 0}
.alert ul{margin:.2rem 0;padding-left:1.2rem}
.allgood{border:1px solid #1a7f37;background:#dafbe1;padding:.5rem .8rem;border-radius:.4rem;margin:.6rem 0}
.reason{white-space:pre-wrap;overflow-wrap:anywhere;background:#ffebe9;border-left:4px solid #cf222e;padding:.4rem .6rem;margin:.3rem 0;font-family:ui-monospace,monospace;font-size:.9em}
.diag{white-space:pre-wrap;overflow-wrap:anywhere}
progress{width:12rem;vertical-align:middle}
section.run{border:1px solid #d0d7de;border-radius:.4rem;padding:.2rem .8rem .6rem;margin:.6rem 0}
"#;

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content=(REFRESH_SECONDS);
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

/// A run status a person should look at: failed, or partial (its data is incomplete).
/// A run an operator should look at: it failed, or ended with part of its data.
fn needs_attention(status: RunStatus) -> bool {
    matches!(status, RunStatus::Failed | RunStatus::Partial)
}

fn render_index(view: &StatusView, now: OffsetDateTime) -> Markup {
    let failed_jobs: Vec<&JobOverview> = view
        .jobs
        .iter()
        .filter(|j| {
            j.last_run
                .as_ref()
                .is_some_and(|r| needs_attention(r.status))
        })
        .collect();
    let overdue_jobs: Vec<&JobOverview> = view
        .jobs
        .iter()
        .filter(|j| j.overdue_since.is_some())
        .collect();
    let body = html! {
        header {
            h1 { "fhir-sync status" }
            p.muted.small {
                "As of " (utc(now)) ". This page reloads every " (REFRESH_SECONDS) " s."
            }
        }
        @if failed_jobs.is_empty() && overdue_jobs.is_empty() {
            div.allgood #summary { "Every job's last run succeeded or is on its way, and none is overdue." }
        } @else {
            div.alert #summary role="alert" {
                strong { "Needs attention" }
                ul {
                    @for job in &failed_jobs {
                        @if let Some(run) = &job.last_run {
                            li {
                                "Job " strong { (job.name) } ": last run "
                                a href={ "/runs/" (run.id) } { "#" (run.id) }
                                (if run.status == RunStatus::Partial { " ended partial " } else { " failed " })
                                (relative(run.finished_at.unwrap_or(run.updated_at), now))
                                @if let Some(error) = &run.error { ": " (excerpt(error, ERROR_EXCERPT_CHARS)) }
                            }
                        }
                    }
                    @for job in &overdue_jobs {
                        @if let Some(since) = job.overdue_since {
                            li {
                                "Job " strong { (job.name) } " is overdue: no successful run since the "
                                (utc(since)) " tick (" (relative(since, now)) ")"
                            }
                        }
                    }
                }
            }
        }
        h2 { "Jobs" }
        (jobs_table(&view.jobs, now))
        h2 { "Running now" }
        @if view.running.is_empty() {
            p.muted #running-none { "No run is queued or running." }
        }
        @for run in &view.running {
            section.run #{ "run-" (run.run.id) } {
                h3 {
                    a href={ "/runs/" (run.run.id) } { "Run #" (run.run.id) } " · " (run.run.job) " "
                    (status_badge(run.run.status.as_str()))
                }
                (run_facts(&run.run, now))
                (files_table(&run.files, run.no_files_note()))
            }
        }
        h2 { "Failures and server-reported issues" }
        @if view.failures.is_empty() {
            p.muted #failures-none { "No recent failures." }
        }
        @for run in &view.failures {
            section.run.failure #{ "failure-" (run.run.id) } {
                h3 {
                    a href={ "/runs/" (run.run.id) } { "Run #" (run.run.id) } " · " (run.run.job) " "
                    (status_badge(run.run.status.as_str())) " "
                    span.muted.small { (relative(run.run.finished_at.unwrap_or(run.run.updated_at), now)) }
                }
                (failure_reasons(run, ISSUES_SHOWN))
            }
        }
        h2 { "Recent runs" }
        (runs_table(&view.recent, now))
        @if !view.views.is_empty() {
            h2 { "Analytics views" }
            (views_table(&view.views, now))
        }
    };
    layout("fhir-sync status", body)
}

/// One row per analytics view: status, rows, last run applied, last refresh, error.
fn views_table(views: &[ViewStatus], now: OffsetDateTime) -> Markup {
    html! {
        table #views {
            thead { tr {
                th { "View" } th { "Status" } th.n { "Rows" } th.n { "Last run" } th { "Refreshed (UTC)" }
                th.n { "Took" } th { "Error" }
            } }
            tbody {
                @for v in views {
                    tr.failed[v.status == "error"] data-view=(v.name) {
                        td { (v.table_schema) "." (v.name) }
                        td {
                            (v.status)
                            @if !v.pending_run_ids.is_empty() {
                                span.muted.small { " (" (v.pending_run_ids.len()) " runs pending)" }
                            }
                        }
                        td.n { (thousands(v.row_count)) }
                        td.n { @if let Some(run) = v.last_run_id { a href={ "/runs/" (run) } { "#" (run) } } }
                        td { (when(v.refreshed_at, now, "never")) }
                        td.n { @if let Some(ms) = v.refresh_duration_ms { (duration(ms as f64 / 1000.0)) } }
                        td { @if let Some(error) = &v.error { span.diag { (excerpt(error, ERROR_EXCERPT_CHARS)) } } }
                    }
                }
            }
        }
    }
}

fn jobs_table(jobs: &[JobOverview], now: OffsetDateTime) -> Markup {
    html! {
        @if jobs.is_empty() {
            p.muted { "No job is configured (jobs/*.toml)." }
        } @else {
            table #jobs {
                thead { tr {
                    th { "Job" } th { "Schedule" } th { "Next run" } th { "Last run" }
                    th { "Last success" } th { "Watermark (_since of the next run)" } th { "Now" }
                } }
                tbody {
                    @for job in jobs {
                        @let failed = job.last_run.as_ref().is_some_and(|r| needs_attention(r.status));
                        tr.failed[failed].overdue[job.overdue_since.is_some()] data-job=(job.name) {
                            td {
                                strong { (job.name) }
                                @if let Some(description) = &job.description {
                                    br; span.muted.small { (description) }
                                }
                            }
                            td {
                                @if !job.enabled {
                                    span.badge.s-disabled { "disabled" } " "
                                }
                                @match &job.schedule {
                                    Some(s) => {
                                        code { (s.cron) } " " span.muted.small { (s.timezone) ", overlap " (s.overlap) }
                                    }
                                    None => { span.muted { "manual only" } }
                                }
                            }
                            td { (when(job.next_run_at, now, "—")) }
                            td {
                                @match &job.last_run {
                                    Some(run) => {
                                        (status_badge(run.status.as_str())) " "
                                        a href={ "/runs/" (run.id) } { "#" (run.id) }
                                        br; span.muted.small { (relative(run.finished_at.unwrap_or(run.started_at), now)) }
                                    }
                                    None => { span.muted { "never run" } }
                                }
                            }
                            td {
                                (when(job.last_success_at, now, "never"))
                                @if job.overdue_since.is_some() {
                                    br; span.badge.s-overdue { "OVERDUE" }
                                }
                            }
                            td {
                                @match &job.watermark {
                                    Some(w) => { code { (w.transaction_time) } br; span.muted.small { "from run #" (w.run_id) } }
                                    None => { span.muted { "none (next run is full)" } }
                                }
                            }
                            td {
                                @match &job.active_run {
                                    Some(run) => { (status_badge(run.status.as_str())) " " a href={ "#run-" (run.id) } { "#" (run.id) } }
                                    None => { span.badge.s-idle { "idle" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn run_facts(run: &RunSummary, now: OffsetDateTime) -> Markup {
    html! {
        p.small.facts {
            "Started " (utc(run.started_at)) " (" (relative(run.started_at, now)) "), "
            @if let Some(finished) = run.finished_at {
                "finished " (utc(finished)) ", "
            }
            "took " (duration(run.duration_seconds(now)))
            @if run.finished_at.is_none() { " so far" }
            " · trigger " (run.trigger)
            @if run.full_export { " · full export" } @else if let Some(since) = &run.since { " · _since " code { (since) } }
            " · files " (run.files_loaded) " / " (run.files) " loaded"
            @if let Some(progress) = &run.progress { " · server progress: " span.diag { (progress) } }
            @if run.retries > 0 { " · " (run.retries) " retried requests" }
        }
    }
}

/// The files of a run; `when_empty` says why there are none (see `RunDetail::no_files_note`).
fn files_table(files: &[FileDetail], when_empty: &str) -> Markup {
    html! {
        @if files.is_empty() {
            p.muted.small { "No files: " (when_empty) "." }
        } @else {
            table.files {
                thead { tr {
                    th { "File" } th { "Status" } th { "Progress" } th.n { "Resources" }
                    th.n { "Rejected" } th.n { "Bytes" } th.n { "Attempts" } th { "Error" }
                } }
                tbody {
                    @for file in files {
                        tr.failed[file.status == FileStatus::Failed] data-file=(file.id) {
                            td {
                                (file.resource_type)
                                @if file.kind != FileKind::Output { " " span.muted.small { "(" (file.kind) ")" } }
                            }
                            td { (status_badge(file.status.as_str())) }
                            td { (file_progress(file)) }
                            td.n { (thousands(file.resources_loaded)) }
                            td.n { (thousands(file.lines_rejected)) }
                            td.n { (human_bytes(file.bytes)) }
                            td.n { (file.attempts) }
                            td { @if let Some(error) = &file.error { span.diag { (error) } } }
                        }
                    }
                }
            }
        }
    }
}

fn file_progress(file: &FileDetail) -> Markup {
    let label = format!("{} lines", file.resource_type);
    html! {
        @match file.manifest_count.filter(|&c| c > 0) {
            Some(total) => {
                @let done = file.lines_committed.min(total);
                progress value=(done) max=(total) aria-label=(label) {}
                " " span.small { (thousands(file.lines_committed)) " / " (thousands(total)) " lines (" (percent(done, total)) ")" }
            }
            None => {
                @if file.status == FileStatus::Loaded {
                    progress value="1" max="1" aria-label=(label) {}
                } @else if file.status == FileStatus::Loading {
                    // Without the manifest's count the end is unknown: an indeterminate bar.
                    progress aria-label=(label) {}
                } @else {
                    progress value="0" max="1" aria-label=(label) {}
                }
                " " span.small { (thousands(file.lines_committed)) " lines" }
            }
        }
    }
}

fn failure_reasons(run: &RunDetail, issues_shown: usize) -> Markup {
    let failed_files: Vec<&FileDetail> = run.files.iter().filter(|f| f.error.is_some()).collect();
    html! {
        @if let Some(error) = &run.run.error {
            div.reason { (error) }
            @match run.run.error_retryable {
                Some(true) => { p.small.muted { "Retryable: the next run may succeed without anyone acting." } }
                Some(false) => { p.small { strong { "Needs an operator" } ": this will fail again until the cause is fixed." } }
                None => {}
            }
            @if let Some(hint) = &run.run.hint {
                p.hint { strong { "Hint: " } (hint) }
            }
        }
        @if !failed_files.is_empty() {
            h4 { "Files that failed" }
            ul.failed-files {
                @for file in &failed_files {
                    li {
                        (file.resource_type) " " span.muted.small { (file.url) } ": "
                        span.diag { (file.error.as_deref().unwrap_or_default()) }
                    }
                }
            }
        }
        @if !run.export_issues.is_empty() {
            h4 { "Issues reported by the server (" (thousands(run.run.export_errors)) ")" }
            table.issues {
                thead { tr { th { "Severity" } th { "Code" } th { "Diagnostics" } } }
                tbody {
                    @for issue in run.export_issues.iter().take(issues_shown) {
                        tr {
                            td { (issue.severity.as_deref().unwrap_or("—")) }
                            td { (issue.code.as_deref().unwrap_or("—")) }
                            td.diag { (issue.diagnostics.as_deref().unwrap_or("(no diagnostics)")) }
                        }
                    }
                }
            }
            @if run.export_issues.len() > issues_shown {
                p.small { a href={ "/runs/" (run.run.id) } { "All issues of run #" (run.run.id) } }
            }
        }
        @if !run.rejects.is_empty() {
            h4 { "Rejected lines" }
            ul.rejects {
                @for reject in &run.rejects {
                    @let file = run.files.iter().find(|f| f.id == reject.file_id);
                    li {
                        (thousands(reject.lines)) " line(s) of "
                        (file.map_or("a file", |f| f.resource_type.as_str()))
                        " from line " (reject.first_line) ": " span.diag { (reject.reason) }
                    }
                }
            }
        }
    }
}

fn runs_table(runs: &[RunSummary], now: OffsetDateTime) -> Markup {
    html! {
        @if runs.is_empty() {
            p.muted { "No runs recorded yet." }
        } @else {
            table #runs {
                thead { tr {
                    th { "Run" } th { "Job" } th { "Status" } th { "Trigger" } th { "Started (UTC)" }
                    th.n { "Duration" } th.n { "Resources" } th.n { "Rejected" } th.n { "Files" } th { "Reason" }
                } }
                tbody {
                    @for run in runs {
                        tr.failed[needs_attention(run.status)] data-run=(run.id) {
                            td { a href={ "/runs/" (run.id) } { "#" (run.id) } }
                            td { (run.job) }
                            td { (status_badge(run.status.as_str())) }
                            td { (run.trigger) }
                            td { (utc(run.started_at)) br; span.muted.small { (relative(run.started_at, now)) } }
                            td.n { (duration(run.duration_seconds(now))) }
                            td.n { (thousands(run.resources_loaded)) }
                            td.n { (thousands(run.lines_rejected)) }
                            td.n { (run.files_loaded) " / " (run.files) }
                            td { @if let Some(error) = &run.error { span.diag { (excerpt(error, ERROR_EXCERPT_CHARS)) } } }
                        }
                    }
                }
            }
        }
    }
}

fn render_run_page(detail: &RunDetail, now: OffsetDateTime) -> Markup {
    let run = &detail.run;
    let title = format!("fhir-sync run #{} ({})", run.id, run.job);
    let body = html! {
        p.small { a href="/" { "← status" } }
        h1 { "Run #" (run.id) " · " (run.job) " " (status_badge(run.status.as_str())) }
        (run_facts(run, now))
        p.small {
            "Resources " (thousands(run.resources_loaded)) " · rejected " (thousands(run.lines_rejected))
            " · bytes " (human_bytes(run.bytes))
            @if let Some(t) = &run.transaction_time { " · transactionTime " code { (t) } }
            @if let Some(url) = &detail.status_url { " · status URL " span.muted { (url) } }
            @if let Some(deleted) = detail.export_deleted_at { " · export deleted " (utc(deleted)) }
        }
        h2 { "Files" }
        (files_table(&detail.files, detail.no_files_note()))
        @if run.error.is_some() || !detail.export_issues.is_empty() || !detail.rejects.is_empty()
            || detail.files.iter().any(|f| f.error.is_some()) {
            h2 { "Reasons" }
            (failure_reasons(detail, usize::MAX))
        }
    };
    layout(&title, body)
}

fn status_badge(status: &str) -> Markup {
    // Statuses come from the database's own vocabulary, but the class is still built only from
    // known names so that an unexpected value cannot inject markup or styles.
    let known = status.parse::<RunStatus>().is_ok() || status.parse::<FileStatus>().is_ok();
    let class = if known {
        format!("badge s-{status}")
    } else {
        "badge".to_string()
    };
    let label = status.replace('_', " ");
    html! {
        @if status == RunStatus::Failed.as_str() {
            span class=(class) { "FAILED" }
        } @else {
            span class=(class) { (label) }
        }
    }
}

fn when(at: Option<OffsetDateTime>, now: OffsetDateTime, missing: &str) -> Markup {
    html! {
        @match at {
            Some(at) => { (utc(at)) br; span.muted.small { (relative(at, now)) } }
            None => { span.muted { (missing) } }
        }
    }
}

/// `2026-11-29 03:47:03 UTC`.
fn utc(at: OffsetDateTime) -> String {
    format!("{} UTC", super::format::utc(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn relative_times_use_the_largest_unit_that_fits() {
        let now = datetime!(2026-11-29 12:00:00 UTC);
        let cases = [
            (datetime!(2026-11-29 12:00:03 UTC), "just now"),
            (datetime!(2026-11-29 11:59:15 UTC), "45 s ago"),
            (datetime!(2026-11-29 11:48:00 UTC), "12 min ago"),
            (datetime!(2026-11-29 09:00:00 UTC), "3 h ago"),
            (datetime!(2026-11-27 12:00:00 UTC), "2 d ago"),
            (datetime!(2026-11-29 12:20:00 UTC), "in 20 min"),
            (datetime!(2026-11-30 02:00:00 UTC), "in 14 h"),
        ];
        for (at, expected) in cases {
            assert_eq!(relative(at, now), expected, "{at}");
        }
    }

    #[test]
    fn times_are_shown_in_utc_whatever_their_offset() {
        assert_eq!(
            utc(datetime!(2026-11-29 04:47:03 +01:00)),
            "2026-11-29 03:47:03 UTC"
        );
    }

    #[test]
    fn numbers_durations_and_sizes_read_naturally() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(-1000), "-1,000");
        assert_eq!(duration(4.24), "4.2s");
        assert_eq!(duration(200.0), "3m 20s");
        assert_eq!(duration(7500.0), "2h 05m");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1500), "1.5 kB");
        assert_eq!(human_bytes(3_200_000), "3.2 MB");
        assert_eq!(percent(999, 1000), "99 %");
        assert_eq!(percent(5, 0), "0 %");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt("abc", 3), "abc");
    }

    #[test]
    fn hostile_text_is_escaped_and_unknown_statuses_get_no_class() {
        let badge = status_badge("x\" onmouseover=\"alert(1)").into_string();
        assert_eq!(
            badge,
            "<span class=\"badge\">x&quot; onmouseover=&quot;alert(1)</span>"
        );
        let file = FileDetail {
            id: 1,
            kind: FileKind::Output,
            resource_type: "Patient".into(),
            url: "https://ehr.example/f/1".into(),
            manifest_count: Some(10),
            status: FileStatus::Failed,
            bytes: 0,
            lines_committed: 4,
            resources_loaded: 4,
            lines_rejected: 0,
            attempts: 2,
            link_refreshes: 0,
            started_at: None,
            finished_at: None,
            error: Some("<script>alert(1)</script>".into()),
        };
        let html = files_table(&[file], "").into_string();
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("<progress value=\"4\" max=\"10\""), "{html}");
    }

    #[test]
    fn the_views_table_escapes_errors_and_links_the_last_run() {
        let now = datetime!(2026-11-29 03:00:00 UTC);
        let view = ViewStatus {
            name: "phone".into(),
            table_schema: "sof".into(),
            resource_type: "Patient".into(),
            status: "error".into(),
            row_count: 1234,
            last_run_id: Some(7),
            pending_run_ids: vec![8],
            built_at: Some(now),
            refreshed_at: Some(now),
            refresh_duration_ms: Some(250),
            error: Some("view \"<b>\" failed".into()),
        };
        let html = views_table(&[view], now).into_string();
        assert!(html.contains("sof.phone"), "{html}");
        assert!(html.contains("1,234"), "{html}");
        assert!(html.contains("(1 runs pending)"), "{html}");
        assert!(html.contains("<a href=\"/runs/7\">#7</a>"), "{html}");
        assert!(
            html.contains("&lt;b&gt;") && !html.contains("<b>"),
            "{html}"
        );
    }
}
