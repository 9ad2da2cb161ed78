//! Completeness before the watermark moves: an export whose manifest lists error files, a
//! full export that lists no files at all, and a full run whose Patients drop past the job's
//! gate end `partial`, keep what they loaded, and leave the watermark where the last complete
//! run put it.

use fhir_sync::config::ExportLevel;
use fhir_sync::fake::{FakeOptions, Faults};
use std::sync::Arc;

use fhir_sync::sync::{self, RunOptions, RunReport};
use fhir_sync::views::ViewSet;
use fhir_sync::warehouse::runs::{self, RunStatus};

use crate::export_env::{ctx, retry_fast_settings};
use crate::helpers::TestEnv;
use crate::views::shipped_views;

/// 10 patients in files of 10: 1 Patient, 3 Encounter, 12 Observation and 2 Condition files.
async fn env(faults: Faults) -> TestEnv {
    let mut env = TestEnv::new(
        10,
        FakeOptions {
            faults,
            resources_per_file: 10,
            ..TestEnv::fast()
        },
    )
    .await;
    env.job.export.poll_default_interval_seconds = 0.01;
    env
}

async fn run(env: &TestEnv, full: bool) -> RunReport {
    run_with_views(env, full, &ViewSet::default()).await
}

async fn run_with_views(env: &TestEnv, full: bool, views: &ViewSet) -> RunReport {
    let ctx = ctx(env, retry_fast_settings()).with_views(Arc::new(views.clone()));
    sync::run_job(&ctx, &env.job, RunOptions { full })
        .await
        .expect("the run finishes (succeeded or partial)")
}

/// (transaction_time, run_id) of the job's watermark.
async fn watermark(env: &TestEnv) -> Option<(String, i64)> {
    sqlx::query_as("SELECT transaction_time, run_id FROM fhir_sync.watermark WHERE job = $1")
        .bind(&env.job.name)
        .fetch_optional(&env.db.pool)
        .await
        .unwrap()
}

/// The `_since` each kick-off asked for, in order.
fn kick_off_sinces(env: &TestEnv) -> Vec<Option<String>> {
    env.fake
        .kick_offs()
        .iter()
        .map(|k| {
            k.params
                .iter()
                .find(|(name, _)| name == "_since")
                .map(|(_, v)| v.clone())
        })
        .collect()
}

#[tokio::test]
async fn error_files_end_the_run_partial_hold_the_watermark_and_the_next_run_asks_again() {
    // The second export moves its first three output files (the Patients and two of the
    // Encounter files: 30 resources) to `error[]`.
    let mut env = env(Faults::default().failed_files_in_export(2, 3)).await;
    // Incremental runs re-read five years, so that each of them exports the whole data set
    // again (the fake's resources are dated 2024-2025).
    env.job.export.since_overlap_seconds = 5 * 365 * 24 * 3600;
    let total = env.fake.dataset().total() as i64;

    let first = run(&env, true).await;
    assert_eq!(first.status, RunStatus::Succeeded);
    assert_eq!(first.warning, None);
    let (w1, w1_run) = watermark(&env)
        .await
        .expect("a complete run sets the watermark");
    assert_eq!(w1_run, first.run_id);

    let views = shipped_views();
    let second = run_with_views(&env, false, &views).await;
    assert_eq!(second.status, RunStatus::Partial, "{:?}", second.warning);
    // The data it loaded is real: the views took it in.
    let refreshed: Vec<Option<i64>> =
        sqlx::query_scalar("SELECT last_run_id FROM fhir_sync.view_state ORDER BY name")
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(refreshed, vec![Some(second.run_id); views.views.len()]);
    assert_eq!(second.error_files, 3);
    // What the export did deliver is loaded.
    assert_eq!(second.resources_loaded(), total - 30);
    let warning = second.warning.clone().unwrap();
    assert!(
        warning.contains("the export reported 3 error files"),
        "{warning}"
    );
    assert_eq!(
        watermark(&env).await,
        Some((w1.clone(), first.run_id)),
        "a partial run leaves the watermark at the last complete run"
    );
    // The manifest's counts are of output files: the error files do not trip the check.
    let mismatches: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_sync.run_file WHERE run_id = $1 AND count_mismatch IS NOT NULL",
    )
    .bind(second.run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(mismatches, 0);

    // The run's state and reason, as `status`, the API and the page read them.
    let detail = fhir_sync::ops::report::run_detail(&env.db.pool, second.run_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.run.status, "partial");
    assert!(
        detail
            .run
            .error
            .as_deref()
            .is_some_and(|e| e.contains("3 error files")),
        "{:?}",
        detail.run.error
    );
    assert!(
        detail
            .run
            .hint
            .as_deref()
            .is_some_and(|h| h.contains(&format!("fhir-sync runs show {}", second.run_id))),
        "{:?}",
        detail.run.hint
    );
    // A partial run alerts like a failed one.
    let unalerted = runs::failed_runs_without_alert(&env.db.pool, 24)
        .await
        .unwrap();
    assert_eq!(unalerted, [(second.run_id, env.job.name.clone())]);

    // The next incremental run asks again from the last complete run's transactionTime.
    let third = run(&env, false).await;
    assert_eq!(third.status, RunStatus::Succeeded);
    let sinces = kick_off_sinces(&env);
    assert_eq!(sinces.len(), 3);
    assert_eq!(sinces[0], None, "the first run is full");
    assert!(sinces[1].is_some());
    assert_eq!(
        sinces[2], sinces[1],
        "the run after the partial one exports from the same watermark"
    );
    assert_eq!(
        watermark(&env).await.map(|(_, run)| run),
        Some(third.run_id)
    );
}

#[tokio::test]
async fn the_job_may_let_a_partial_run_advance_the_watermark() {
    let mut env = env(Faults::default().failed_files_in_export(1, 1)).await;
    env.job.export.advance_watermark_on_partial = true;
    let report = run(&env, true).await;
    assert_eq!(report.status, RunStatus::Partial);
    assert!(
        report
            .warning
            .as_deref()
            .is_some_and(|w| w.contains("advanced anyway")),
        "{:?}",
        report.warning
    );
    assert_eq!(
        watermark(&env).await.map(|(_, run)| run),
        Some(report.run_id)
    );
}

#[tokio::test]
async fn a_full_export_that_lists_no_files_is_flagged_not_green() {
    let mut env = env(Faults::default().unknown_groups_empty()).await;
    // One letter off: the server exports an empty group instead of refusing it.
    env.job.export.level = ExportLevel::Group;
    env.job.export.group_id = Some("all-patiens".into());
    let report = run(&env, true).await;
    assert_eq!(report.status, RunStatus::Partial);
    assert_eq!(report.output_files, 0);
    let warning = report.warning.unwrap();
    assert!(
        warning.contains("the full export listed no files"),
        "{warning}"
    );
    assert!(warning.contains("export.group_id"), "{warning}");
    assert_eq!(
        watermark(&env).await,
        None,
        "nothing complete, no watermark"
    );
}

#[tokio::test]
async fn a_full_run_whose_patients_drop_past_the_gate_holds_the_watermark() {
    let mut env = env(Faults::default()).await;
    env.job.export.max_patient_drop_percent = Some(20.0);
    let first = run(&env, true).await;
    assert_eq!(first.status, RunStatus::Succeeded);

    // One patient gone of ten: within the gate.
    env.fake.delete_resource("Patient", 0);
    let second = run(&env, true).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.warning);

    // Three more gone: 6 against the previous full run's 9 is a third fewer.
    for index in 1..4 {
        env.fake.delete_resource("Patient", index);
    }
    let third = run(&env, true).await;
    assert_eq!(third.status, RunStatus::Partial);
    let warning = third.warning.unwrap();
    assert!(
        warning.contains("6 Patients, 33.3% fewer than the previous full run's 9"),
        "{warning}"
    );
    assert_eq!(
        watermark(&env).await.map(|(_, run)| run),
        Some(second.run_id)
    );
}
