//! A sync through a server that throws every transient failure at once still loads exactly
//! the server's resources, and the run record shows the retries.

use fhir_sync::fake::Faults;

use crate::export_env::{assert_exactly_the_data_set, env_with, retry_fast_settings, run, run_row};

#[tokio::test]
async fn a_storm_of_429s_cut_downloads_and_expired_links_still_loads_exactly_the_data_set() {
    let faults = Faults::default()
        .kick_off_429(3)
        .status_429(3)
        .file_429(4)
        .file_500_once()
        .truncate_file(2)
        .expire_files(1);
    let env = env_with(40, faults).await;
    let report = run(&env).await.expect("the sync rides out every fault");
    assert_exactly_the_data_set(&env, report.run_id).await;

    let (status, error, _, retries) = run_row(&env, report.run_id).await;
    assert_eq!(status, "succeeded");
    assert_eq!(error, None);
    // 3 kick-offs + 3 polls + 4 + 1 + 2 file retries + at least one link refresh.
    assert!(retries >= 14, "run.retries = {retries}");

    let files: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT status, attempts, link_refreshes FROM fhir_sync.run_file WHERE run_id = $1",
    )
    .bind(report.run_id)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(files.len(), 5);
    assert!(
        files
            .iter()
            .all(|(status, attempts, _)| status == "loaded" && *attempts >= 1)
    );
    let attempts: i32 = files.iter().map(|f| f.1).sum();
    assert!(attempts >= 5 + 7, "file attempts {files:?}");
    let refreshes: i32 = files.iter().map(|f| f.2).sum();
    assert!(refreshes >= 1, "{files:?}");

    // The client really met every fault: the server answered each kind of failure.
    let requests = env.fake.requests();
    let count = |path_part: &str, status: u16| {
        requests
            .iter()
            .filter(|r| r.path.contains(path_part) && r.status == status)
            .count()
    };
    assert_eq!(count("$export", 429), 3);
    assert_eq!(count("/bulkstatus/", 429), 3);
    assert_eq!(count("/bulkfiles/", 429), 4);
    assert_eq!(count("/bulkfiles/", 500), 1);
    assert!(count("/bulkfiles/", 410) >= 1);
    assert_eq!(
        env.fake.export_count(),
        0,
        "the export was deleted at the end"
    );
}

#[tokio::test]
async fn a_file_that_keeps_failing_fails_the_run_naming_the_file() {
    let env = env_with(10, Faults::default().file_429(1000)).await;
    let settings = retry_fast_settings();
    let attempts = settings.request_attempts;
    let failed = fhir_sync::sync::run_job(
        &crate::export_env::ctx(&env, settings),
        &env.job,
        fhir_sync::sync::RunOptions { full: true },
    )
    .await
    .expect_err("the file never arrives");
    assert!(failed.error.is_retryable(), "a 429 may go away by itself");
    let run_id = failed.run_id.unwrap();
    let (status, error, retryable, retries) = run_row(&env, run_id).await;
    assert_eq!(status, "failed");
    assert_eq!(retryable, Some(true));
    let error = error.unwrap();
    assert!(
        error.contains("/bulkfiles/") && error.contains("429"),
        "{error}"
    );
    assert!(retries >= i64::from(attempts - 1));
    let worst: i32 = sqlx::query_scalar(
        "SELECT max(attempts) FROM fhir_sync.run_file WHERE run_id = $1 AND status = 'failed'",
    )
    .bind(run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(worst as u32, attempts);
    assert_eq!(
        env.fake.export_count(),
        1,
        "a failed run leaves its export for the next run's clean-up"
    );
}
