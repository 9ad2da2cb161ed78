//! Status polling: Retry-After in both forms and clamped, X-Progress, 429 and transient
//! OperationOutcomes polled through, fatal ones failing the run, the deadline, Expires.

use std::time::Duration;

use fhir_sync::fake::{FakeOptions, Faults};

use crate::export_env::{assert_exactly_the_data_set, env_with, faulty, run, run_row};
use crate::helpers::{Captured, TestEnv};

/// A generous bound that turns a poll loop ignoring its clamps into a failure, not a hang.
const HANG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn retry_after_is_clamped_and_progress_is_reported() {
    // The server asks for an hour between polls; the job allows 10 ms at most.
    let options = FakeOptions {
        retry_after_seconds: 3600,
        polls_before_ready: 3,
        ..faulty(Faults::default())
    };
    let mut env = TestEnv::new(3, options).await;
    env.job.export.poll_max_interval_seconds = 0.01;
    env.job.export.poll_default_interval_seconds = 3600.0;
    let (captured, _logs) = Captured::start(tracing::Level::INFO);
    let report = tokio::time::timeout(HANG, run(&env))
        .await
        .expect("Retry-After is clamped to export.poll_max_interval_seconds")
        .expect("the export completes");
    assert_exactly_the_data_set(&env, report.run_id).await;
    let logs = captured.text();
    for progress in [
        "in progress (1/3)",
        "in progress (2/3)",
        "in progress (3/3)",
    ] {
        assert!(
            logs.contains(&format!("export.progress={progress}")),
            "{progress} is reported:\n{logs}"
        );
    }
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    // `Retry-After` as a date "now"; were it not understood, the client would fall back to
    // the default interval of an hour and hit the one-second deadline instead.
    let mut env = env_with(3, Faults::default().retry_after_http_date()).await;
    env.job.export.poll_default_interval_seconds = 3600.0;
    env.job.export.poll_max_interval_seconds = 3600.0;
    env.job.export.poll_min_interval_seconds = 0.001;
    env.job.export.timeout_seconds = 30;
    let report = tokio::time::timeout(HANG, run(&env))
        .await
        .unwrap()
        .expect("polls follow the date");
    assert_exactly_the_data_set(&env, report.run_id).await;
}

#[tokio::test]
async fn throttled_and_transient_polls_are_polled_through_and_expires_is_noted() {
    let env = env_with(5, Faults::default().status_429(2).status_transient(3)).await;
    let report = run(&env).await.expect("the export completes");
    assert_exactly_the_data_set(&env, report.run_id).await;
    let (_, _, _, retries) = run_row(&env, report.run_id).await;
    assert_eq!(retries, 5);
    let expires: Option<String> =
        sqlx::query_scalar("SELECT export_expires FROM fhir_sync.run WHERE id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(expires.as_deref(), Some("Wed, 21 Oct 2099 07:28:00 GMT"));
}

#[tokio::test]
async fn a_fatal_outcome_fails_the_run_with_its_text() {
    let env = env_with(
        3,
        Faults::default().status_fatal("the export job ran out of disk"),
    )
    .await;
    let failed = run(&env)
        .await
        .expect_err("the export failed on the server");
    assert!(!failed.error.is_retryable());
    let (status, error, retryable, _) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(status, "failed");
    assert_eq!(retryable, Some(false));
    let error = error.unwrap();
    assert!(error.contains("the export job ran out of disk"), "{error}");
    assert!(error.contains("HTTP 500"), "{error}");
}

#[tokio::test]
async fn an_export_that_never_finishes_hits_the_deadline() {
    let options = FakeOptions {
        polls_before_ready: u32::MAX,
        ..faulty(Faults::default())
    };
    let mut env = TestEnv::new(2, options).await;
    env.job.export.timeout_seconds = 1;
    env.job.export.poll_min_interval_seconds = 0.05;
    let failed = tokio::time::timeout(HANG, run(&env))
        .await
        .unwrap()
        .expect_err("the export never completes");
    assert!(failed.error.is_retryable());
    let (_, error, retryable, _) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(retryable, Some(true));
    assert!(error.unwrap().contains("export.timeout_seconds"));
    // The operator's hint has a column of its own, beside the error.
    let hint: Option<String> = sqlx::query_scalar("SELECT hint FROM fhir_sync.run WHERE id = $1")
        .bind(failed.run_id.unwrap())
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert!(hint.unwrap().contains("raise export.timeout_seconds"));
}

#[tokio::test]
async fn a_throttling_storm_longer_than_the_error_limit_is_polled_through() {
    // Throttling is not an error: fifteen 429s in a row (more than any error budget) must not
    // end a run whose job allows minutes.
    let env = env_with(3, Faults::default().status_429(15)).await;
    let report = tokio::time::timeout(HANG, run(&env))
        .await
        .unwrap()
        .expect("429s are waited out");
    assert_exactly_the_data_set(&env, report.run_id).await;
    let (_, _, _, retries) = run_row(&env, report.run_id).await;
    assert_eq!(retries, 15, "each throttled poll is counted as a retry");
}

#[tokio::test]
async fn a_throttled_poll_waits_the_servers_retry_after_beyond_the_poll_interval() {
    // `Retry-After: 3` on a 429 is the server's word, not a hint to clamp to the job's 10 ms
    // poll interval. (Delayed queue steps are scheduled to the whole second, so a 3 s wait
    // is at least 2 s.)
    let mut env = env_with(3, Faults::default().status_429_retry_after(1, 3)).await;
    env.job.export.poll_max_interval_seconds = 0.01;
    let started = std::time::Instant::now();
    let report = tokio::time::timeout(HANG, run(&env))
        .await
        .unwrap()
        .expect("the export completes after the wait");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "polled again after {:?}",
        started.elapsed()
    );
    assert_exactly_the_data_set(&env, report.run_id).await;
}

#[tokio::test]
async fn a_throttled_poll_never_waits_past_the_export_deadline() {
    // An hour's `Retry-After` against a two-second `export.timeout_seconds`: the run ends at
    // its deadline, not an hour later.
    let mut env = env_with(3, Faults::default().status_429_retry_after(1, 3600)).await;
    env.job.export.timeout_seconds = 2;
    env.job.export.poll_max_interval_seconds = 3600.0;
    let failed = tokio::time::timeout(HANG, run(&env))
        .await
        .expect("the deadline bounds the wait")
        .expect_err("the export is not ready by the deadline");
    let (_, error, retryable, _) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(retryable, Some(true));
    assert!(error.unwrap().contains("export.timeout_seconds"));
}

#[tokio::test]
async fn a_transient_error_on_a_poll_is_retried_with_the_retry_backoff_not_the_poll_interval() {
    // Without `Retry-After`, a transient 500 is retried after `sync.retry_base_delay_ms`
    // doubling, never `poll_default_interval_seconds × 2^n` (an hour here).
    let mut env = env_with(3, Faults::default().status_transient(2)).await;
    env.job.export.poll_default_interval_seconds = 3600.0;
    env.job.export.poll_max_interval_seconds = 3600.0;
    let report = tokio::time::timeout(HANG, run(&env))
        .await
        .expect("transient errors are retried soon")
        .expect("the export completes");
    assert_exactly_the_data_set(&env, report.run_id).await;
}
