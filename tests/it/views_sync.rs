//! The analytics views as a step of every run: a sync through the queue leaves every view
//! current with the run (its table equal to a full rebuild), and a view that fails to refresh
//! never fails the run.

use std::sync::Arc;

use std::path::Path;

use fhir_sync::fake::{Dataset, FakeFhirServer};
use fhir_sync::smart::{SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunOptions, SyncContext};
use fhir_sync::views::ViewSet;

use crate::helpers::TestEnv;
use crate::views::{assert_equals_rebuild, shipped_views};

fn ctx(env: &TestEnv, views: &ViewSet) -> Arc<SyncContext> {
    env.ctx().with_views(Arc::new(views.clone()))
}

/// Each view's state: (name, status, last run applied).
async fn view_states(env: &TestEnv) -> Vec<(String, String, Option<i64>)> {
    sqlx::query_as("SELECT name, status, last_run_id FROM fhir_sync.view_state ORDER BY name")
        .fetch_all(&env.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_run_leaves_each_view_equal_to_a_rebuild() {
    let env = TestEnv::new(12, TestEnv::fast()).await;
    let views = shipped_views();
    assert!(!views.views.is_empty());

    let first = sync::run_job(&ctx(&env, &views), &env.job, RunOptions { full: true })
        .await
        .unwrap();
    assert_eq!(
        view_states(&env).await,
        views
            .views
            .iter()
            .map(|v| (v.name.clone(), "fresh".to_string(), Some(first.run_id)))
            .collect::<Vec<_>>()
    );
    assert_equals_rebuild(&env.db.pool, &views).await;
    let patients: i64 = sqlx::query_scalar("SELECT count(*) FROM sof.patient")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(patients, 12);

    // The same source serves a newer version of every third resource: the run changes those
    // rows only, and the views follow.
    let changed = FakeFhirServer::start(Dataset::new(7, 12).changed(3), TestEnv::fast())
        .await
        .unwrap();
    let key =
        SigningKey::from_pem(&env.key_pem, SigningAlgorithm::RS384, None, "test key").unwrap();
    changed.register_client("fhir-sync-demo", key.public_jwks());
    let mut job = fhir_sync::demo::demo_job(&changed, env.key_pem.clone());
    job.export.poll_min_interval_seconds = 0.001;
    let second = sync::run_job(&ctx(&env, &views), &job, RunOptions { full: true })
        .await
        .unwrap();
    assert!(second.resources_loaded() > 0);
    assert!(
        view_states(&env)
            .await
            .iter()
            .all(|(_, status, last)| status == "fresh" && *last == Some(second.run_id)),
        "{:?}",
        view_states(&env).await
    );
    assert_equals_rebuild(&env.db.pool, &views).await;
}

/// The shipped views and one whose non-collection column yields two values for every patient
/// (an identifier and a phone number), so its refresh fails on any demo data.
fn views_with_one_that_always_fails() -> ViewSet {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("views")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("two_values.json"),
        r#"{"name": "two_values", "resource": "Patient", "select": [{"column": [{"name": "v", "path": "identifier.value | telecom.value", "type": "string"}]}]}"#,
    )
    .unwrap();
    ViewSet::load(dir.path(), "sof").unwrap()
}

#[tokio::test]
async fn a_view_that_cannot_refresh_leaves_the_run_succeeded_and_the_others_fresh() {
    let env = TestEnv::new(6, TestEnv::fast()).await;
    let views = views_with_one_that_always_fails();
    let report = sync::run_job(&ctx(&env, &views), &env.job, RunOptions { full: true })
        .await
        .expect("a view's failure never fails the run");
    let states = view_states(&env).await;
    for (name, status, last) in &states {
        if name == "two_values" {
            assert_eq!(status, "error", "the failing view is marked");
            continue;
        }
        assert_eq!(
            (status.as_str(), *last),
            ("fresh", Some(report.run_id)),
            "{name}"
        );
    }
    // The watermark moved with the data, whatever the fragile view did.
    let watermark: Option<i64> =
        sqlx::query_scalar("SELECT run_id FROM fhir_sync.watermark WHERE job = $1")
            .bind(&env.job.name)
            .fetch_optional(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(watermark, Some(report.run_id));
}
