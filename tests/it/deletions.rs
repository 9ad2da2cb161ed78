//! Deletions from servers that never list them: a full run with `export.reconcile_deletes`
//! marks deleted what the export no longer contains, and the views follow; a server that
//! never lets an export be deleted is asked once per export, not by every later clean-up.

use std::sync::Arc;

use fhir_sync::fake::{FakeOptions, Faults};
use fhir_sync::sync::{self, RunOptions, RunReport, SyncContext};
use fhir_sync::views::ViewSet;
use fhir_sync::warehouse::RunStatus;

use crate::helpers::TestEnv;
use crate::views::{assert_equals_rebuild, shipped_views};

fn ctx(env: &TestEnv, views: &ViewSet) -> Arc<SyncContext> {
    env.ctx().with_views(Arc::new(views.clone()))
}

async fn run(env: &TestEnv, views: &ViewSet, full: bool) -> RunReport {
    let report = sync::run_job(&ctx(env, views), &env.job, RunOptions { full })
        .await
        .expect("the run succeeds");
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.warning);
    report
}

/// (deleted_at is set, deleted_by_run_id) of a stored resource.
async fn deletion_of(env: &TestEnv, resource_type: &str, id: &str) -> (bool, Option<i64>) {
    sqlx::query_as(
        "SELECT deleted_at IS NOT NULL, deleted_by_run_id FROM fhir_sync.resource
         WHERE resource_type = $1 AND id = $2",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

async fn in_patient_view(env: &TestEnv, id: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sof.patient WHERE id = $1)")
        .bind(id)
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_full_run_marks_deleted_what_the_server_no_longer_exports_and_the_views_follow() {
    let mut env = TestEnv::new(6, TestEnv::fast()).await;
    env.job.export.reconcile_deletes = Some(true);
    let views = shipped_views();
    run(&env, &views, true).await;
    let patient = env.fake.dataset().id("Patient", 2);
    let encounter = env.fake.dataset().id("Encounter", 0);
    assert!(in_patient_view(&env, &patient).await);

    // Deleted on the server, listed in no `deleted[]`.
    env.fake.delete_resource("Patient", 2);
    env.fake.delete_resource("Encounter", 0);
    // An incremental run cannot tell a deletion from no change.
    run(&env, &views, false).await;
    assert_eq!(deletion_of(&env, "Patient", &patient).await, (false, None));

    let full = run(&env, &views, true).await;
    assert_eq!(
        deletion_of(&env, "Patient", &patient).await,
        (true, Some(full.run_id))
    );
    assert_eq!(
        deletion_of(&env, "Encounter", &encounter).await,
        (true, Some(full.run_id))
    );
    let (live, reconciled): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM fhir_sync.resource WHERE deleted_at IS NULL),
                (SELECT deletions_reconciled FROM fhir_sync.run WHERE id = $1)",
    )
    .bind(full.run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(reconciled, Some(2), "exactly the two deleted resources");
    assert_eq!(live as usize, env.fake.dataset().total() - 2);
    // The views saw the deletions as the run's changes.
    assert!(!in_patient_view(&env, &patient).await);
    assert_equals_rebuild(&env.db.pool, &views).await;
    let analyst_view: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir.patient WHERE id = $1")
        .bind(&patient)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(analyst_view, 0);
}

#[tokio::test]
async fn without_reconcile_deletes_a_deleted_resource_stays() {
    let env = TestEnv::new(4, TestEnv::fast()).await;
    assert_eq!(env.job.export.reconcile_deletes, None, "off by default");
    let views = shipped_views();
    run(&env, &views, true).await;
    env.fake.delete_resource("Patient", 1);
    let full = run(&env, &views, true).await;
    let patient = env.fake.dataset().id("Patient", 1);
    assert_eq!(deletion_of(&env, "Patient", &patient).await, (false, None));
    assert!(in_patient_view(&env, &patient).await);
    let reconciled: Option<i64> =
        sqlx::query_scalar("SELECT deletions_reconciled FROM fhir_sync.run WHERE id = $1")
            .bind(full.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(reconciled, None);
}

#[tokio::test]
async fn an_export_with_error_files_reconciles_nothing() {
    let mut env = TestEnv::new(
        4,
        FakeOptions {
            faults: Faults::default().error_file(),
            ..TestEnv::fast()
        },
    )
    .await;
    env.job.export.reconcile_deletes = Some(true);
    let views = ViewSet::default();
    run(&env, &views, true).await;
    env.fake.delete_resource("Patient", 1);
    run(&env, &views, true).await;
    let patient = env.fake.dataset().id("Patient", 1);
    assert_eq!(
        deletion_of(&env, "Patient", &patient).await,
        (false, None),
        "the server said some resources could not be exported: absence proves nothing"
    );
}

#[tokio::test]
async fn a_refused_export_delete_is_recorded_once_and_not_asked_again() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            faults: Faults::default().delete_status(405),
            ..TestEnv::fast()
        },
    )
    .await;
    let views = ViewSet::default();
    let first = run(&env, &views, true).await;
    let second = run(&env, &views, true).await;
    let third = run(&env, &views, true).await;
    let refused: Vec<(i64, Option<i32>)> = sqlx::query_as(
        "SELECT id, export_delete_refused FROM fhir_sync.run WHERE id = ANY($1) ORDER BY id",
    )
    .bind(vec![first.run_id, second.run_id, third.run_id])
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        refused,
        [
            (first.run_id, Some(405)),
            (second.run_id, Some(405)),
            (third.run_id, Some(405))
        ]
    );
    // Each export was asked to go once, by its own run: no later clean-up asked again.
    let deletes = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(deletes, 3);
}
