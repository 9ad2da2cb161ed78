//! Prometheus metrics as served: the `/metrics` route, which renders the process's recorder
//! ([`crate::metrics`]) and appends gauges read from the database at scrape time, so that
//! every process reports the same truth about runs and the queue, even right after a restart.
//!
//! Names follow `fhir_sync_<name>_<unit>[_total]`. Labels are low-cardinality only (see
//! [`crate::metrics`]).

use std::fmt::Write as _;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use time::OffsetDateTime;

use super::state::OpsState;
pub use crate::metrics::install;
use crate::warehouse::runs::RunStatus;

/// The routes this module serves.
pub fn routes() -> Router<OpsState> {
    Router::new().route("/metrics", get(metrics_handler))
}

async fn metrics_handler(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = install().render();
    let jobs: Vec<String> = {
        let mut names: Vec<String> = state.steps.jobs().iter().map(|j| j.name.clone()).collect();
        names.sort();
        names
    };
    let read = async {
        let queue = state.steps.queue.stats().await?;
        let health = super::report::health(&state.steps.pool, &jobs).await?;
        let views = crate::views::materialise::states(&state.steps.pool).await?;
        Ok::<_, sqlx::Error>((queue, health, views))
    }
    .await;
    match read {
        Ok((queue, health, views)) => {
            write_queue(&mut body, &queue);
            write_health(&mut body, &health);
            write_views(&mut body, &views);
            write_database_up(&mut body, true);
        }
        Err(e) => {
            // The details go to the log; the scrape still succeeds so the alert on
            // fhir_sync_database_up can fire.
            tracing::warn!(error = %e, "metrics: cannot read the database");
            write_database_up(&mut body, false);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Appends one gauge family in the text exposition format.
fn write_gauge(out: &mut String, name: &str, help: &str, samples: &[(Vec<(&str, &str)>, f64)]) {
    if samples.is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, value) in samples {
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{key}=\"{}\"", escape_label(value));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

/// Label values escaped as the exposition format requires.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn write_database_up(out: &mut String, up: bool) {
    write_gauge(
        out,
        "fhir_sync_database_up",
        "Whether this scrape could read the database (1) or not (0)",
        &[(vec![], if up { 1.0 } else { 0.0 })],
    );
}

fn write_queue(out: &mut String, queue: &crate::queue::QueueStats) {
    write_gauge(
        out,
        "fhir_sync_queue_depth",
        "Run steps in the queue by state: scheduled (waiting for their time), pending (due), queued (fetched by a worker), running",
        &[
            (vec![("state", "scheduled")], queue.scheduled as f64),
            (vec![("state", "pending")], queue.pending as f64),
            (vec![("state", "queued")], queue.queued as f64),
            (vec![("state", "running")], queue.running as f64),
        ],
    );
    write_gauge(
        out,
        "fhir_sync_queue_oldest_age_seconds",
        "How long the oldest due step has waited for a worker (0 when none waits)",
        &[(vec![], queue.oldest_due_seconds)],
    );
}

fn seconds(at: OffsetDateTime) -> f64 {
    at.unix_timestamp_nanos() as f64 / 1e9
}

fn write_health(out: &mut String, health: &super::report::Health) {
    let mut active = Vec::new();
    for (job, status, count) in &health.active_runs {
        active.push((
            vec![("job", job.as_str()), ("status", status.as_str())],
            *count as f64,
        ));
    }
    // Configured jobs report every unfinished status, 0 included, so that a rule such as
    // `fhir_sync_runs_active{status="exporting"} > 0` has a series to compare.
    for job in &health.jobs {
        for status in RunStatus::UNFINISHED {
            let present = health
                .active_runs
                .iter()
                .any(|(j, s, _)| j == &job.job && *s == status);
            if !present {
                active.push((
                    vec![("job", job.job.as_str()), ("status", status.as_str())],
                    0.0,
                ));
            }
        }
    }
    write_gauge(
        out,
        "fhir_sync_runs_active",
        "Runs not finished yet, by job and status",
        &active,
    );

    let mut last = Vec::new();
    let mut since = Vec::new();
    let mut watermarks = Vec::new();
    for job in &health.jobs {
        let label = vec![("job", job.job.as_str())];
        if let Some(at) = job.last_success_at {
            last.push((label.clone(), seconds(at)));
        }
        // A job that never succeeded counts from its first run, so "no success within 26 h"
        // also fires for a new job that keeps failing; a job that never ran has no series.
        if let Some(from) = job.last_success_at.or(job.first_run_at) {
            since.push((label.clone(), (health.now - from).as_seconds_f64().max(0.0)));
        }
        if let Some(at) = job
            .watermark
            .as_deref()
            .and_then(crate::fhir::parse_instant)
        {
            watermarks.push((label, seconds(at)));
        }
    }
    write_gauge(
        out,
        "fhir_sync_last_success_timestamp_seconds",
        "When the job's last successful run finished (Unix time)",
        &last,
    );
    write_gauge(
        out,
        "fhir_sync_seconds_since_last_success",
        "Seconds since the job's last successful run finished, or since its first run when none succeeded yet",
        &since,
    );
    write_gauge(
        out,
        "fhir_sync_watermark_timestamp_seconds",
        "The job's watermark: the transactionTime the next incremental run exports from (Unix time)",
        &watermarks,
    );
}

/// The states a view's table can be in (`fhir_sync.view_state.status`).
const VIEW_STATUSES: [&str; 4] = ["fresh", "stale", "building", "error"];

/// Per analytics view: its state (one series per possible state, 1 for the current one, so an
/// alert can say `fhir_sync_view_status{status="error"} == 1`), rows, runs still to apply, and
/// the last refresh's duration and time.
fn write_views(out: &mut String, views: &[crate::views::materialise::ViewStatus]) {
    let mut status = Vec::new();
    let mut rows = Vec::new();
    let mut pending = Vec::new();
    let mut duration = Vec::new();
    let mut refreshed = Vec::new();
    for view in views {
        let label = vec![("view", view.name.as_str())];
        for state in VIEW_STATUSES {
            let current = if view.status == state { 1.0 } else { 0.0 };
            status.push((
                vec![("view", view.name.as_str()), ("status", state)],
                current,
            ));
        }
        rows.push((label.clone(), view.row_count as f64));
        pending.push((label.clone(), view.pending_run_ids.len() as f64));
        if let Some(ms) = view.refresh_duration_ms {
            duration.push((label.clone(), ms as f64 / 1000.0));
        }
        if let Some(at) = view.refreshed_at.or(view.built_at) {
            refreshed.push((label, seconds(at)));
        }
    }
    write_gauge(
        out,
        "fhir_sync_view_status",
        "The analytics view's state: 1 for the state it is in, 0 for the others",
        &status,
    );
    write_gauge(
        out,
        "fhir_sync_view_rows",
        "Rows in the analytics view's table",
        &rows,
    );
    write_gauge(
        out,
        "fhir_sync_view_pending_runs",
        "Runs whose changes the analytics view has not applied yet (a failed or killed refresh)",
        &pending,
    );
    write_gauge(
        out,
        "fhir_sync_view_refresh_duration_seconds",
        "How long the analytics view's last refresh or build took",
        &duration,
    );
    write_gauge(
        out,
        "fhir_sync_view_refreshed_timestamp_seconds",
        "When the analytics view was last refreshed or built (Unix time)",
        &refreshed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_written_in_the_exposition_format_with_escaped_labels() {
        let mut out = String::from("# TYPE x counter\nx 1");
        write_gauge(
            &mut out,
            "fhir_sync_example",
            "An example",
            &[
                (vec![("job", "a\"b\\c\nd")], 2.5),
                (vec![("job", "e"), ("state", "f")], 0.0),
            ],
        );
        write_gauge(&mut out, "fhir_sync_empty", "Nothing", &[]);
        assert_eq!(
            out,
            "# TYPE x counter\nx 1\n# HELP fhir_sync_example An example\n# TYPE fhir_sync_example gauge\n\
             fhir_sync_example{job=\"a\\\"b\\\\c\\nd\"} 2.5\nfhir_sync_example{job=\"e\",state=\"f\"} 0\n"
        );
    }
}
