//! Webhook alerts against a real receiver on loopback: a failed run alerts once, delivery is
//! retried, a dead receiver never holds up a run, and "no recent success" alerts once per
//! episode however often (and from however many processes) it is checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use fhir_sync::config::{AlertConfig, Delivery, Webhook, WebhookSource};
use fhir_sync::fake::Faults;
use fhir_sync::ops::alert::{self, Stale};
use fhir_sync::sync::SyncContext;
use secrecy::SecretString;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::export_env::{env_with, run, run_row};
use crate::helpers::{Captured, TestEnv, eventually, queue_settings, sync_settings};

/// How long a test waits for something that should happen in milliseconds.
const DEADLINE: Duration = Duration::from_secs(30);

/// The webhook's path is its secret, as with Slack; it must never reach a log.
const SECRET_PATH: &str = "/hooks/T0001/B0002/XyZsEcReTtOkEn";

/// An incoming-webhook endpoint that records every request and answers 500 to the first
/// `failures` of them.
struct Receiver {
    url: String,
    requests: mpsc::UnboundedReceiver<(u16, Value)>,
}

#[derive(Clone)]
struct ReceiverState {
    failures: Arc<AtomicU32>,
    seen: mpsc::UnboundedSender<(u16, Value)>,
}

impl Receiver {
    async fn start(failures: u32) -> Receiver {
        let (seen, requests) = mpsc::unbounded_channel();
        let state = ReceiverState {
            failures: Arc::new(AtomicU32::new(failures)),
            seen,
        };
        let app = axum::Router::new()
            .route(SECRET_PATH, post(receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{SECRET_PATH}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, requests }
    }

    /// The next request: the status it was answered with and its JSON body.
    async fn next(&mut self) -> (u16, Value) {
        tokio::time::timeout(DEADLINE, self.requests.recv())
            .await
            .expect("the webhook was called in time")
            .expect("the receiver is running")
    }

    fn nothing_more(&mut self) {
        if let Ok(request) = self.requests.try_recv() {
            panic!("an unexpected webhook call: {request:?}");
        }
    }
}

async fn receive(State(state): State<ReceiverState>, Json(body): Json<Value>) -> StatusCode {
    let fail = state
        .failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let _ = state.seen.send((status.as_u16(), body));
    status
}

fn alerting(url: &str) -> AlertConfig {
    AlertConfig {
        webhook: Some(Webhook {
            source: WebhookSource::Inline(SecretString::from(url.to_string())),
            allow_insecure_http: false,
        }),
        delivery: Delivery {
            attempts: 3,
            timeout_seconds: 5,
            retry_base_delay_ms: 10,
        },
        ..AlertConfig::default()
    }
}

/// (kind, episode, attempts, delivered, last_error, webhook_host) of every recorded alert.
type AlertRow = (String, i64, i32, bool, Option<String>, String);

async fn alert_rows(env: &TestEnv) -> Vec<AlertRow> {
    sqlx::query_as(
        "SELECT kind, episode, attempts, delivered_at IS NOT NULL, last_error, webhook_host
         FROM fhir_sync.alert_sent ORDER BY id",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
}

/// Waits until the recorded alerts satisfy `done` (delivery records them in its own task).
async fn wait_for_rows(env: &TestEnv, done: impl Fn(&[AlertRow]) -> bool) -> Vec<AlertRow> {
    eventually(DEADLINE, "the alert rows", || async {
        let rows = alert_rows(env).await;
        done(&rows).then_some(rows)
    })
    .await
}

/// Runs the env's job to its failure, then sweeps for unsent failure alerts as `serve` does.
async fn fail_and_sweep(env: &TestEnv) -> fhir_sync::sync::RunFailed {
    let failed = run(env).await.expect_err("the export fails on the server");
    let claimed = alert::sweep_failed_runs(&other_process(env)).await.unwrap();
    assert_eq!(claimed, [failed.run_id.unwrap()]);
    failed
}

/// A second process's view of the same database and jobs.
fn other_process(env: &TestEnv) -> Arc<SyncContext> {
    SyncContext::new(
        env.db.pool.clone(),
        sync_settings(),
        queue_settings(),
        vec![env.job.clone()],
    )
}

#[tokio::test]
async fn a_failed_run_alerts_once_with_its_reason() {
    let mut receiver = Receiver::start(0).await;
    let mut env = env_with(
        3,
        Faults::default().status_fatal("the export ran out of disk"),
    )
    .await;
    env.job.alert = alerting(&receiver.url);

    let failed = fail_and_sweep(&env).await;
    let run_id = failed.run_id.unwrap();
    let (status, body) = receiver.next().await;
    assert_eq!(status, 200);
    assert_eq!(body["event"], "run_failed");
    assert_eq!(body["job"], "demo");
    assert_eq!(body["run_id"], run_id);
    assert_eq!(body["retryable"], false);
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("the export ran out of disk"), "{error}");
    let text = body["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("fhir-sync: job demo run {run_id} failed: ")),
        "{text}"
    );
    let started = OffsetDateTime::parse(
        body["started_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let finished = OffsetDateTime::parse(
        body["finished_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(started <= finished);

    let rows = wait_for_rows(&env, |rows| rows.iter().any(|r| r.3)).await;
    assert_eq!(
        rows,
        [(
            "run_failed".to_string(),
            run_id,
            1,
            true,
            None,
            "http://127.0.0.1".to_string()
        )]
    );
    // Another process noticing the same failure does not alert again.
    let again = alert::notify_run_failed(&other_process(&env), run_id)
        .await
        .unwrap();
    assert!(!again, "the alert was already claimed");
    receiver.nothing_more();
    assert_eq!(alert_rows(&env).await.len(), 1);
}

#[tokio::test]
async fn a_receiver_that_fails_once_gets_the_alert_on_the_retry() {
    let mut receiver = Receiver::start(1).await;
    let mut env = env_with(
        3,
        Faults::default().status_fatal("the export ran out of disk"),
    )
    .await;
    env.job.alert = alerting(&receiver.url);

    let failed = fail_and_sweep(&env).await;
    let (first_status, first) = receiver.next().await;
    let (second_status, second) = receiver.next().await;
    assert_eq!((first_status, second_status), (500, 200));
    assert_eq!(first, second, "the same alert is sent again");
    assert_eq!(second["run_id"], failed.run_id.unwrap());
    let rows = wait_for_rows(&env, |rows| rows.iter().any(|r| r.3)).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].2, rows[0].3, rows[0].4.as_deref()),
        (2, true, None),
        "two attempts, delivered"
    );
    receiver.nothing_more();
}

// The default current-thread runtime, so the subscriber set for this thread sees the spawned
// delivery task too.
#[tokio::test]
async fn a_dead_receiver_never_holds_up_the_run_and_is_logged_by_host_only() {
    let (captured, _logs) = Captured::start(tracing::Level::TRACE);

    // A port nothing listens on any more: every connection is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}{SECRET_PATH}", listener.local_addr().unwrap());
    drop(listener);
    let mut env = env_with(
        3,
        Faults::default().status_fatal("the export ran out of disk"),
    )
    .await;
    env.job.alert = alerting(&dead);

    let failed = fail_and_sweep(&env).await;
    let (status, error, _, _) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("the export ran out of disk"));

    eventually(DEADLINE, "the giving-up warning", || async {
        captured
            .text()
            .contains("alert not delivered, giving up")
            .then_some(())
    })
    .await;
    let rows = alert_rows(&env).await;
    assert_eq!(rows.len(), 1);
    let (_, _, attempts, delivered, last_error, host) = &rows[0];
    assert_eq!(
        (*attempts, *delivered),
        (3, false),
        "every attempt was made"
    );
    assert!(last_error.is_some());
    assert_eq!(host, "http://127.0.0.1");

    let logs = captured.text();
    let warning = logs
        .lines()
        .find(|l| l.contains("alert not delivered, giving up"))
        .unwrap();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("http://127.0.0.1"), "{warning}");
    assert!(warning.contains("job.name=demo"), "{warning}");
    assert!(
        logs.contains("alert delivery failed, retrying"),
        "retries are logged"
    );
    assert!(
        !logs.contains("XyZsEcReTtOkEn") && !logs.contains("/hooks/"),
        "the webhook's secret path reached the logs"
    );
}

async fn finished_at(env: &TestEnv, run_id: i64) -> OffsetDateTime {
    sqlx::query_scalar("SELECT finished_at FROM fhir_sync.run WHERE id = $1")
        .bind(run_id)
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

fn hours(n: i64) -> time::Duration {
    time::Duration::hours(n)
}

#[tokio::test]
async fn no_recent_success_alerts_once_per_episode() {
    let mut receiver = Receiver::start(0).await;
    let mut env = TestEnv::new(3, TestEnv::fast()).await;
    env.job.alert = AlertConfig {
        no_success_within_hours: Some(26),
        ..alerting(&receiver.url)
    };
    let jobs = vec![Arc::new(env.job.clone())];
    let first = env.run().await.unwrap().run_id;
    let first_done = finished_at(&env, first).await;

    let fresh = alert::check_staleness(&env.db.pool, &jobs, first_done + hours(25))
        .await
        .unwrap();
    assert_eq!(fresh, [], "25 hours after a success is within 26");

    let now = first_done + hours(27);
    let stale = alert::check_staleness(&env.db.pool, &jobs, now)
        .await
        .unwrap();
    assert_eq!(
        stale,
        [Stale {
            job: "demo".into(),
            episode: first,
            last_success_at: Some(first_done),
        }]
    );
    let (_, body) = receiver.next().await;
    assert_eq!(body["event"], "no_recent_success");
    assert_eq!(body["job"], "demo");
    assert_eq!(body["threshold_hours"], 26);
    let last_success = OffsetDateTime::parse(
        body["last_success_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(last_success, first_done);
    assert!(
        body["text"]
            .as_str()
            .unwrap()
            .starts_with("fhir-sync: job demo has had no successful run for over 26 hours"),
        "{body}"
    );

    // The same episode, checked again here and by a second process's checker a minute on.
    let again = alert::check_staleness(&env.db.pool, &jobs, now)
        .await
        .unwrap();
    assert_eq!(again, []);
    let elsewhere = other_process(&env);
    let again = alert::check_staleness(&env.db.pool, &elsewhere.jobs(), now + hours(1))
        .await
        .unwrap();
    assert_eq!(again, []);

    // A new success ends the episode; going stale again starts a new one.
    let second = env.run().await.unwrap().run_id;
    let second_done = finished_at(&env, second).await;
    let after_success = alert::check_staleness(&env.db.pool, &jobs, second_done + hours(1))
        .await
        .unwrap();
    assert_eq!(after_success, []);
    let stale = alert::check_staleness(&env.db.pool, &jobs, second_done + hours(27))
        .await
        .unwrap();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].episode, second);
    let (_, body) = receiver.next().await;
    assert_eq!(body["event"], "no_recent_success");
    let last_success = OffsetDateTime::parse(
        body["last_success_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(last_success, second_done);

    let rows = wait_for_rows(&env, |rows| rows.iter().all(|r| r.3)).await;
    let episodes: Vec<(&str, i64)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(
        episodes,
        [("no_recent_success", first), ("no_recent_success", second)]
    );
    receiver.nothing_more();
}

#[tokio::test]
async fn a_job_that_never_succeeded_is_stale_once_its_first_run_is_old() {
    let mut receiver = Receiver::start(0).await;
    let mut env = env_with(
        3,
        Faults::default().status_fatal("the export ran out of disk"),
    )
    .await;
    env.job.alert = AlertConfig {
        no_success_within_hours: Some(26),
        on_failure: Some(false),
        ..alerting(&receiver.url)
    };
    let run_id = run(&env).await.unwrap_err().run_id.unwrap();
    // on_failure = false: the failure itself is not alerted.
    assert!(
        !alert::notify_run_failed(&other_process(&env), run_id)
            .await
            .unwrap()
    );
    let started: OffsetDateTime =
        sqlx::query_scalar("SELECT started_at FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    let jobs = vec![Arc::new(env.job.clone())];

    // A job with staleness off, or disabled, is never checked.
    let mut off = env.job.clone();
    off.alert.no_success_within_hours = Some(0);
    let mut disabled = env.job.clone();
    disabled.enabled = false;
    for job in [off, disabled] {
        let checked = alert::check_staleness(&env.db.pool, &[Arc::new(job)], started + hours(99))
            .await
            .unwrap();
        assert_eq!(checked, []);
    }

    let early = alert::check_staleness(&env.db.pool, &jobs, started + hours(25))
        .await
        .unwrap();
    assert_eq!(early, []);
    let stale = alert::check_staleness(&env.db.pool, &jobs, started + hours(27))
        .await
        .unwrap();
    assert_eq!(
        stale,
        [Stale {
            job: "demo".into(),
            episode: 0,
            last_success_at: None,
        }]
    );
    let (_, body) = receiver.next().await;
    assert_eq!(body["event"], "no_recent_success");
    assert_eq!(body["last_success_at"], Value::Null);
    assert!(
        body["text"]
            .as_str()
            .unwrap()
            .ends_with("(it has never succeeded)")
    );
    let rows = wait_for_rows(&env, |rows| rows.iter().all(|r| r.3)).await;
    assert_eq!(rows.len(), 1, "no run_failed alert: {rows:?}");
    receiver.nothing_more();
}

#[tokio::test]
async fn a_failure_alert_survives_the_death_of_the_process_that_failed_the_run() {
    let mut receiver = Receiver::start(0).await;
    let mut env = env_with(3, Faults::default()).await;
    env.job.alert = alerting(&receiver.url);
    // A process fails a run and dies before it could alert: the failure is on record, no
    // alert was claimed.
    let run_id = fhir_sync::warehouse::runs::create(
        &env.db.pool,
        "demo",
        env.job.fhir.base_url.as_str(),
        fhir_sync::sync::Trigger::Manual,
        None,
        false,
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        fhir_sync::warehouse::runs::fail(
            &env.db.pool,
            run_id,
            "the export ran out of disk",
            false,
            None
        )
        .await
        .unwrap()
    );
    assert!(alert_rows(&env).await.is_empty());

    // Whichever process sweeps next sends it, once.
    let claimed = alert::sweep_failed_runs(&other_process(&env))
        .await
        .unwrap();
    assert_eq!(claimed, [run_id]);
    let (status, body) = receiver.next().await;
    assert_eq!(status, 200);
    assert_eq!(body["run_id"], run_id);
    assert!(
        alert::sweep_failed_runs(&other_process(&env))
            .await
            .unwrap()
            .is_empty(),
        "a claimed alert is not swept again"
    );
    receiver.nothing_more();
}
