//! Status polling: Retry-After in both forms and clamped, X-Progress, 429 and transient
//! OperationOutcomes polled through, fatal ones failing the run, the deadline, Expires.

use std::time::Duration;

use fhir_sync::bulk::{ExportRequest, PollPolicy};
use fhir_sync::fake::{FakeOptions, Faults};
use fhir_sync::sync;

use crate::export_env::{
    assert_exactly_the_data_set, env_with, faulty, retry_fast_settings, run, run_row,
};
use crate::helpers::TestEnv;

/// A generous bound that turns a poll loop ignoring its clamps into a failure, not a hang.
const HANG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn retry_after_is_clamped_and_progress_is_reported() {
    // The server asks for an hour between polls; the policy allows 10 ms at most.
    let options = FakeOptions {
        retry_after_seconds: 3600,
        polls_before_ready: 3,
        ..faulty(Faults::default())
    };
    let env = TestEnv::new(3, options).await;
    let bulk = sync::connect_bulk(&retry_fast_settings(), &env.job)
        .await
        .unwrap();
    let kick_off = bulk
        .kick_off(&ExportRequest::from_config(&env.job.export))
        .await
        .unwrap();
    let policy = PollPolicy {
        min_interval: Duration::from_millis(1),
        max_interval: Duration::from_millis(10),
        default_interval: Duration::from_secs(3600),
        timeout: Duration::from_secs(600),
    };
    let mut progress = Vec::new();
    let manifest = tokio::time::timeout(
        HANG,
        bulk.wait_for_manifest(&kick_off.status_url, &policy, async |p| progress.push(p)),
    )
    .await
    .expect("Retry-After is clamped to max_interval")
    .unwrap();
    assert_eq!(
        progress,
        [
            "in progress (1/3)",
            "in progress (2/3)",
            "in progress (3/3)"
        ]
    );
    assert_eq!(manifest.output.len(), 4);
    assert_eq!(
        manifest.expires.as_deref(),
        Some("Wed, 21 Oct 2099 07:28:00 GMT")
    );
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
}
