//! After the export: DELETE when done (404 counts as done), `cancel`, and clean-up of exports
//! fhir-sync started and abandoned, against a server that allows one export at a time.

use fhir_sync::config::SyncSettings;
use fhir_sync::fake::Faults;
use fhir_sync::sync::{self, CancelOutcome};

use crate::export_env::{assert_exactly_the_data_set, ctx, env_with, retry_fast_settings, run};
use crate::helpers::TestEnv;

async fn deleted_at(env: &TestEnv, run_id: i64) -> Option<time::OffsetDateTime> {
    sqlx::query_scalar("SELECT export_deleted_at FROM fhir_sync.run WHERE id = $1")
        .bind(run_id)
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

/// A run that fails after its export started (every file is over the size cap), leaving the
/// export on the server.
async fn abandon_an_export(env: &TestEnv) -> i64 {
    let settings = SyncSettings {
        max_file_bytes: 1024,
        ..retry_fast_settings()
    };
    let failed = sync::run_job(
        &ctx(env, settings),
        &env.job,
        sync::RunOptions { full: true },
    )
    .await
    .expect_err("the files are over the cap");
    assert_eq!(
        env.fake.export_count(),
        1,
        "the failed run's export is left"
    );
    failed.run_id.unwrap()
}

#[tokio::test]
async fn a_finished_export_is_deleted_and_deleting_again_is_fine() {
    let env = env_with(3, Faults::default()).await;
    let report = run(&env).await.unwrap();
    assert_eq!(env.fake.export_count(), 0);
    assert!(deleted_at(&env, report.run_id).await.is_some());
    // The server answers 404 now; that still counts as deleted.
    let bulk = sync::connect_bulk(&retry_fast_settings(), &env.job)
        .await
        .unwrap();
    let status_url: String =
        sqlx::query_scalar("SELECT status_url FROM fhir_sync.run WHERE id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    bulk.delete(&status_url.parse().unwrap())
        .await
        .expect("404 is done");
    let deletes: Vec<u16> = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.status)
        .collect();
    assert_eq!(deletes, [202, 404]);
}

#[tokio::test]
async fn an_abandoned_export_is_deleted_before_the_next_run_starts() {
    let env = env_with(5, Faults::default().one_export_at_a_time()).await;
    let abandoned = abandon_an_export(&env).await;
    assert!(deleted_at(&env, abandoned).await.is_none());
    let report = run(&env)
        .await
        .expect("the abandoned export is cleaned up first");
    assert_exactly_the_data_set(&env, report.run_id).await;
    assert!(deleted_at(&env, abandoned).await.is_some());
    assert_eq!(env.fake.export_count(), 0);
    // Cleaned up before the kick-off, so the server never had to refuse one.
    assert!(
        !env.fake
            .requests()
            .iter()
            .any(|r| r.path.ends_with("$export") && r.status == 429)
    );
}

#[tokio::test]
async fn an_export_whose_delete_failed_is_cleaned_up_before_the_next_kick_off() {
    let env = env_with(5, Faults::default().one_export_at_a_time()).await;
    let left = abandon_an_export(&env).await;
    // What a run leaves when its final DELETE did not get through: succeeded, export still there.
    sqlx::query("UPDATE fhir_sync.run SET status = 'succeeded' WHERE id = $1")
        .bind(left)
        .execute(&env.db.pool)
        .await
        .unwrap();
    let report = run(&env)
        .await
        .expect("the left-over export is deleted first");
    assert_exactly_the_data_set(&env, report.run_id).await;
    assert!(deleted_at(&env, left).await.is_some());
    assert_eq!(env.fake.export_count(), 0);
    let refused = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("$export") && r.status == 429)
        .count();
    assert_eq!(
        refused, 0,
        "cleaned up before the kick-off, so the server never refused one"
    );
}

#[tokio::test]
async fn a_busy_server_with_nothing_to_clean_up_is_reported_clearly() {
    let env = env_with(3, Faults::default().one_export_at_a_time()).await;
    // Another client tool of ours holds the slot: an export not recorded in the database.
    let bulk = sync::connect_bulk(&retry_fast_settings(), &env.job)
        .await
        .unwrap();
    bulk.kick_off(&fhir_sync::bulk::ExportRequest::from_config(
        &env.job.export,
    ))
    .await
    .unwrap();
    let failed = run(&env).await.expect_err("the server stays busy");
    let error = sync::error_chain(&failed.error);
    assert!(error.contains("busy with another export"), "{error}");
    assert!(error.contains("already in progress"), "{error}");
    assert!(error.contains("fhir-sync cancel"), "{error}");
    assert!(failed.error.is_retryable());
}

#[tokio::test]
async fn cancel_deletes_a_runs_export_on_the_server() {
    let env = env_with(5, Faults::default()).await;
    let abandoned = abandon_an_export(&env).await;
    let jobs = vec![env.job.clone()];
    let ctx = ctx(&env, retry_fast_settings());
    let outcome = sync::cancel_run(&ctx, &jobs, abandoned).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Deleted);
    assert_eq!(env.fake.export_count(), 0);
    assert!(deleted_at(&env, abandoned).await.is_some());
    let again = sync::cancel_run(&ctx, &jobs, abandoned).await.unwrap();
    assert_eq!(again, CancelOutcome::AlreadyDeleted);
    let missing = sync::cancel_run(&ctx, &jobs, 999_999).await.unwrap_err();
    assert!(sync::error_chain(&missing).contains("no run 999999"));
}

#[tokio::test]
async fn serve_start_up_deletes_exports_left_by_earlier_runs() {
    let env = env_with(5, Faults::default()).await;
    let abandoned = abandon_an_export(&env).await;
    let jobs = vec![std::sync::Arc::new(env.job.clone())];
    sync::delete_abandoned_exports_at_start_up(&retry_fast_settings(), &env.db.pool, &jobs).await;
    assert_eq!(env.fake.export_count(), 0);
    assert!(deleted_at(&env, abandoned).await.is_some());
    // Nothing left to do the next time: no second DELETE.
    sync::delete_abandoned_exports_at_start_up(&retry_fast_settings(), &env.db.pool, &jobs).await;
    let deletes = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(deletes, 1);
}
