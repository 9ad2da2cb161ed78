//! Webhook alerts: a run failed, or a job has had no successful run for too long.
//!
//! Each alert is sent once across all processes: a row in `fhir_sync.alert_sent`, keyed by job,
//! kind and episode, is inserted first, and only the process whose insert won sends the alert.
//! Failed runs are found by a sweep of the run table (every few seconds in `serve`, and by the
//! foreground `run` for its own run), so an alert survives the death of the process that
//! failed the run. Delivery retries network errors, 5xx and 429 with the one backoff, records
//! its outcome on the row, and never blocks or fails a run. The webhook URL is
//! a secret: logs and the database only ever see its scheme and host.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{Delivery, JobConfig, Webhook, WebhookUrl};
use crate::sync::{SyncContext, error_chain};
use crate::warehouse::runs::{self, RunStatus};

/// How often `serve` looks for jobs without a recent success.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// How often `serve` looks for failed runs whose alert was not sent.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How far back the failure sweep looks: a failure older than this (one from before alerts
/// were configured, say) is not alerted any more.
pub const SWEEP_HOURS: i64 = 24;

/// How long the foreground `run` waits for its alerts to be delivered before it exits.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(60);

/// The longest error text an alert carries; the run record has all of it.
const MAX_ERROR_CHARS: usize = 1000;

/// An alert as posted to the webhook (JSON, tagged by `event`). `text` is a one-line summary,
/// so that Slack, Teams and Mattermost incoming webhooks show it without any adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Alert {
    /// A run of the job failed.
    RunFailed {
        job: String,
        run_id: i64,
        /// Why, as recorded on the run (cut to 1000 characters).
        error: String,
        /// Whether the failure may go away by itself (a 503) rather than need an operator.
        retryable: bool,
        #[serde(with = "time::serde::rfc3339")]
        started_at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339::option")]
        finished_at: Option<OffsetDateTime>,
        text: String,
    },
    /// The job's last successful run finished more than `threshold_hours` ago (or it never
    /// succeeded and its first run started that long ago).
    NoRecentSuccess {
        job: String,
        #[serde(with = "time::serde::rfc3339::option")]
        last_success_at: Option<OffsetDateTime>,
        threshold_hours: u32,
        text: String,
    },
}

impl Alert {
    /// The `run_failed` alert.
    pub fn run_failed(
        job: &str,
        run_id: i64,
        error: &str,
        retryable: bool,
        started_at: OffsetDateTime,
        finished_at: Option<OffsetDateTime>,
    ) -> Alert {
        let kind = if retryable {
            "failed (may pass on a retry)"
        } else {
            "failed"
        };
        Self::run_ended(job, run_id, kind, error, retryable, started_at, finished_at)
    }

    /// The `run_failed` alert of a run that ended `partial`: it finished, but its export was
    /// not complete and the watermark was held. Same event, so a receiver that pages on
    /// failures pages on this too; the text says "ended partial".
    pub fn run_partial(
        job: &str,
        run_id: i64,
        error: &str,
        started_at: OffsetDateTime,
        finished_at: Option<OffsetDateTime>,
    ) -> Alert {
        Self::run_ended(
            job,
            run_id,
            "ended partial",
            error,
            false,
            started_at,
            finished_at,
        )
    }

    fn run_ended(
        job: &str,
        run_id: i64,
        kind: &str,
        error: &str,
        retryable: bool,
        started_at: OffsetDateTime,
        finished_at: Option<OffsetDateTime>,
    ) -> Alert {
        let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
        Alert::RunFailed {
            // The error quotes server text: escaped, it cannot mention @channel or forge a link.
            text: format!(
                "fhir-sync: job {job} run {run_id} {kind}: {}",
                crate::untrusted::for_slack(&error)
            ),
            job: job.to_string(),
            run_id,
            error,
            retryable,
            started_at: utc(started_at),
            finished_at: finished_at.map(utc),
        }
    }

    /// The `no_recent_success` alert.
    pub fn no_recent_success(
        job: &str,
        last_success_at: Option<OffsetDateTime>,
        threshold_hours: u32,
    ) -> Alert {
        let since = match last_success_at {
            Some(at) => format!("last success {}", rfc3339(at)),
            None => "it has never succeeded".to_string(),
        };
        Alert::NoRecentSuccess {
            text: format!(
                "fhir-sync: job {job} has had no successful run for over {threshold_hours} hours ({since})"
            ),
            job: job.to_string(),
            last_success_at: last_success_at.map(utc),
            threshold_hours,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Alert::RunFailed { .. } => "run_failed",
            Alert::NoRecentSuccess { .. } => "no_recent_success",
        }
    }
}

/// Timestamps go out in UTC, whatever offset they were read with.
fn utc(at: OffsetDateTime) -> OffsetDateTime {
    at.to_offset(time::UtcOffset::UTC)
}

fn rfc3339(at: OffsetDateTime) -> String {
    utc(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

/// Deliveries still running in this process, so that a short-lived process can wait for them.
static IN_FLIGHT: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

fn track(handle: JoinHandle<()>) {
    let mut in_flight = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
    in_flight.retain(|h| !h.is_finished());
    in_flight.push(handle);
}

/// Waits up to `limit` for this process's alert deliveries to end. `false` if some did not.
pub async fn flush(limit: Duration) -> bool {
    let handles = std::mem::take(&mut *IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()));
    tokio::time::timeout(limit, futures::future::join_all(handles))
        .await
        .is_ok()
}

/// Sends the `run_failed` alert of every run that failed in the last [`SWEEP_HOURS`] and whose
/// alert nobody has claimed, waiting for each delivery. The run's failure and its alert are
/// two writes, possibly by two processes: a process that fails a run and dies is covered by
/// whichever process sweeps next, and the claim (the `alert_sent` insert) makes each alert go
/// out once however many processes sweep. Returns the runs whose alerts this call claimed.
pub async fn sweep_failed_runs(ctx: &SyncContext) -> sqlx::Result<Vec<i64>> {
    let mut claimed = Vec::new();
    for (run_id, job) in runs::failed_runs_without_alert(&ctx.pool, SWEEP_HOURS).await? {
        // A job this process does not know may be another process's to alert for.
        if ctx.job(&job).is_none() {
            continue;
        }
        let span = tracing::info_span!("alert", job.name = %job, run.id = run_id, alert.event = "run_failed");
        if notify_run_failed(ctx, run_id).instrument(span).await? {
            claimed.push(run_id);
        }
    }
    Ok(claimed)
}

/// Sends the `run_failed` alert of run `run_id` and waits for the delivery to end. `true` when
/// this call claimed the alert; `false` when the job wants no such alert or the alert was
/// already claimed (by another process, or an earlier call).
pub async fn notify_run_failed(ctx: &SyncContext, run_id: i64) -> sqlx::Result<bool> {
    let (job, status, error, retryable, started_at, finished_at): (
        String,
        RunStatus,
        Option<String>,
        Option<bool>,
        OffsetDateTime,
        Option<OffsetDateTime>,
    ) = sqlx::query_as(
        "SELECT job, status, error, error_retryable, started_at, finished_at FROM fhir_sync.run WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&ctx.pool)
    .await?;
    let Some(config) = ctx.job(&job) else {
        return Ok(false);
    };
    let Some(webhook) = config.alert.failure_webhook() else {
        return Ok(false);
    };
    let error = error.as_deref().unwrap_or("no reason recorded");
    let alert = match status {
        RunStatus::Partial => Alert::run_partial(&job, run_id, error, started_at, finished_at),
        _ => Alert::run_failed(
            &job,
            run_id,
            error,
            retryable.unwrap_or(false),
            started_at,
            finished_at,
        ),
    };
    let Some(claim) = claim(&ctx.pool, &job, &alert, run_id, webhook).await? else {
        return Ok(false);
    };
    deliver(&ctx.pool, &job, claim, &alert, config.alert.delivery).await;
    Ok(true)
}

/// A job found without a recent success, whose alert this call claimed and is sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub job: String,
    /// The last successful run's id, 0 when the job never succeeded.
    pub episode: i64,
    pub last_success_at: Option<OffsetDateTime>,
}

/// Looks at every enabled job with a `no_success_within_hours` threshold and a webhook, and
/// alerts (in the background) for each one whose last success is older than its threshold, or
/// that never succeeded and whose first run is that old. An episode (a last success, or none)
/// is alerted once across every process and every call; returns the ones this call claimed.
pub async fn check_staleness(
    pool: &PgPool,
    jobs: &[Arc<JobConfig>],
    now: OffsetDateTime,
) -> sqlx::Result<Vec<Stale>> {
    let mut claimed = Vec::new();
    for job in jobs.iter().filter(|j| j.enabled) {
        let Some((webhook, hours)) = job.alert.staleness() else {
            continue;
        };
        let cutoff = now - time::Duration::hours(i64::from(hours));
        let last_success: Option<(i64, OffsetDateTime)> = sqlx::query_as(
            "SELECT id, finished_at FROM fhir_sync.run
             WHERE job = $1 AND status = $2 AND finished_at IS NOT NULL
             ORDER BY finished_at DESC, id DESC LIMIT 1",
        )
        .bind(&job.name)
        .bind(RunStatus::Succeeded)
        .fetch_optional(pool)
        .await?;
        let (episode, last_success_at, stale) = match last_success {
            Some((id, finished_at)) => (id, Some(finished_at), finished_at < cutoff),
            None => {
                let first: Option<OffsetDateTime> =
                    sqlx::query_scalar("SELECT min(started_at) FROM fhir_sync.run WHERE job = $1")
                        .bind(&job.name)
                        .fetch_one(pool)
                        .await?;
                (0, None, first.is_some_and(|at| at < cutoff))
            }
        };
        if !stale {
            continue;
        }
        let alert = Alert::no_recent_success(&job.name, last_success_at, hours);
        let Some(claim) = claim(pool, &job.name, &alert, episode, webhook).await? else {
            continue;
        };
        let span = tracing::info_span!("alert", job.name = %job.name, alert.event = alert.kind());
        let pool = pool.clone();
        let delivery = job.alert.delivery;
        let job_name = job.name.clone();
        track(tokio::spawn(
            async move { deliver(&pool, &job_name, claim, &alert, delivery).await }
                .instrument(span),
        ));
        claimed.push(Stale {
            job: job.name.clone(),
            episode,
            last_success_at,
        });
    }
    Ok(claimed)
}

/// Runs [`sweep_failed_runs`] every [`SWEEP_INTERVAL`] and [`check_staleness`] every
/// [`CHECK_INTERVAL`] until `shutdown`.
pub fn spawn_alerting(ctx: Arc<SyncContext>, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut every = tokio::time::interval(CHECK_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sweep.tick() => {
                    if let Err(e) = sweep_failed_runs(&ctx).await {
                        tracing::warn!(error = %e, "the failed-run alert sweep failed");
                    }
                }
                _ = every.tick() => {
                    let now = OffsetDateTime::now_utc();
                    if let Err(e) = check_staleness(&ctx.pool, &ctx.jobs(), now).await {
                        tracing::warn!(error = %e, "the no-recent-success check failed");
                    }
                }
            }
        }
    })
}

/// A claimed alert: its row and the resolved URL to send it to.
struct Claim {
    id: i64,
    url: WebhookUrl,
}

/// Resolves the webhook and records the alert; `None` when another call or process recorded
/// this episode first, or when the URL cannot be read (logged; the episode stays unclaimed so
/// that a fixed configuration still alerts).
async fn claim(
    pool: &PgPool,
    job: &str,
    alert: &Alert,
    episode: i64,
    webhook: &Webhook,
) -> sqlx::Result<Option<Claim>> {
    let url = match webhook.resolve("alert.allow_insecure_http") {
        Ok(url) => url,
        Err(message) => {
            tracing::warn!(job.name = %job, alert.event = alert.kind(), error = %message, "cannot read the alert webhook URL");
            return Ok(None);
        }
    };
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO fhir_sync.alert_sent (job, kind, episode, webhook_host) VALUES ($1, $2, $3, $4)
         ON CONFLICT (job, kind, episode) DO NOTHING RETURNING id",
    )
    .bind(job)
    .bind(alert.kind())
    .bind(episode)
    .bind(url.host())
    .fetch_optional(pool)
    .await?;
    Ok(id.map(|id| Claim { id, url }))
}

/// Posts the alert, retrying what may pass (network errors, timeouts, 5xx, 429), and records
/// each attempt on the alert's row. Failures end up in a warning, never in the caller.
async fn deliver(pool: &PgPool, job: &str, claim: Claim, alert: &Alert, delivery: Delivery) {
    let host = claim.url.host();
    let client = match reqwest::Client::builder()
        .user_agent(concat!("fhir-sync/", env!("CARGO_PKG_VERSION")))
        .timeout(Duration::from_secs(delivery.timeout_seconds))
        // A webhook that redirects is misconfigured; following it could carry the alert
        // somewhere the operator did not choose.
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(job.name = %job, webhook.host = %host, error = %error_chain(&e.without_url()), "cannot build the alert HTTP client");
            return;
        }
    };
    let attempts = delivery.attempts.max(1);
    let backoff = Backoff::new(Duration::from_millis(delivery.retry_base_delay_ms));
    for attempt in 1..=attempts {
        let (error, retryable, retry_after) = match client
            .post(claim.url.expose().clone())
            .json(alert)
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => {
                record(pool, claim.id, attempt, None).await;
                tracing::info!(job.name = %job, webhook.host = %host, attempt, "alert delivered");
                return;
            }
            Ok(response) => {
                let status = response.status();
                (
                    format!("HTTP {}", status.as_u16()),
                    status.is_server_error() || status.as_u16() == 429,
                    crate::bulk::retry_after(&response),
                )
            }
            // Without the URL: its path is the webhook's secret.
            Err(e) => (error_chain(&e.without_url()), true, None),
        };
        record(pool, claim.id, attempt, Some(&error)).await;
        if !retryable || attempt == attempts {
            tracing::warn!(job.name = %job, webhook.host = %host, attempts = attempt, error = %error, "alert not delivered, giving up");
            return;
        }
        let delay = backoff.delay(attempt, retry_after);
        tracing::warn!(job.name = %job, webhook.host = %host, attempt, error = %error, retry_in_ms = delay.as_millis() as u64, "alert delivery failed, retrying");
        tokio::time::sleep(delay).await;
    }
}

async fn record(pool: &PgPool, id: i64, attempts: u32, error: Option<&str>) {
    let updated = sqlx::query(
        "UPDATE fhir_sync.alert_sent SET attempts = $2, last_error = $3,
             delivered_at = CASE WHEN $3::text IS NULL THEN now() END
         WHERE id = $1",
    )
    .bind(id)
    .bind(attempts as i32)
    .bind(error)
    .execute(pool)
    .await;
    if let Err(e) = updated {
        tracing::warn!(error = %e, "cannot record the alert delivery");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn run_failed_payload_is_stable() {
        let alert = Alert::run_failed(
            "nightly",
            42,
            "export failed: the server refused the export (HTTP 400): bad _type",
            false,
            datetime!(2026-11-29 02:00:00 UTC),
            Some(datetime!(2026-11-29 02:00:07 UTC)),
        );
        assert_eq!(
            serde_json::to_value(&alert).unwrap(),
            json!({
                "event": "run_failed",
                "job": "nightly",
                "run_id": 42,
                "error": "export failed: the server refused the export (HTTP 400): bad _type",
                "retryable": false,
                "started_at": "2026-11-29T02:00:00Z",
                "finished_at": "2026-11-29T02:00:07Z",
                "text": "fhir-sync: job nightly run 42 failed: export failed: the server refused the export (HTTP 400): bad _type",
            })
        );
        let retryable = Alert::run_failed(
            "nightly",
            43,
            "x",
            true,
            datetime!(2026-11-29 02:00:00 UTC),
            None,
        );
        let value = serde_json::to_value(&retryable).unwrap();
        assert_eq!(value["finished_at"], serde_json::Value::Null);
        assert_eq!(
            value["text"],
            "fhir-sync: job nightly run 43 failed (may pass on a retry): x"
        );
    }

    #[test]
    fn no_recent_success_payload_is_stable() {
        let cases = [
            (
                Some(datetime!(2026-11-27 02:14:03 +01:00)),
                json!("2026-11-27T01:14:03Z"),
                "fhir-sync: job nightly has had no successful run for over 26 hours (last success 2026-11-27T01:14:03Z)",
            ),
            (
                None,
                serde_json::Value::Null,
                "fhir-sync: job nightly has had no successful run for over 26 hours (it has never succeeded)",
            ),
        ];
        for (last, last_json, text) in cases {
            let alert = Alert::no_recent_success("nightly", last, 26);
            assert_eq!(
                serde_json::to_value(&alert).unwrap(),
                json!({
                    "event": "no_recent_success",
                    "job": "nightly",
                    "last_success_at": last_json,
                    "threshold_hours": 26,
                    "text": text,
                })
            );
        }
    }

    #[test]
    fn a_long_error_is_cut() {
        let long = "é".repeat(5000);
        let Alert::RunFailed { error, text, .. } = Alert::run_failed(
            "j",
            1,
            &long,
            false,
            datetime!(2026-11-29 02:00:00 UTC),
            None,
        ) else {
            unreachable!()
        };
        assert_eq!(error.chars().count(), MAX_ERROR_CHARS);
        assert!(text.len() < 2100);
    }
}
