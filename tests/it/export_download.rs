//! Downloads: gzip, the per-source parallelism cap, the file size cap.

use fhir_sync::config::SyncSettings;
use fhir_sync::fake::{FakeOptions, Faults};
use fhir_sync::sync;

use crate::export_env::{
    assert_exactly_the_data_set, ctx, env_with, faulty, retry_fast_settings, run, run_row,
};
use crate::helpers::TestEnv;

#[tokio::test]
async fn gzip_encoded_files_are_decoded() {
    let env = env_with(30, Faults::default().gzip()).await;
    let report = run(&env).await.expect("gzip files load");
    assert_exactly_the_data_set(&env, report.run_id).await;
    assert_eq!(env.fake.gzipped_files(), report.output_files);
}

#[tokio::test]
async fn deflate_encoded_files_are_decoded() {
    let env = env_with(30, Faults::default().deflate()).await;
    let report = run(&env).await.expect("deflate files load");
    assert_exactly_the_data_set(&env, report.run_id).await;
    assert_eq!(env.fake.deflated_files(), report.output_files);
}

#[tokio::test]
async fn parallel_downloads_never_exceed_the_cap() {
    // 40 patients at 10 resources per file: dozens of files for two download slots.
    let options = FakeOptions {
        resources_per_file: 10,
        ..faulty(Faults::default())
    };
    let env = TestEnv::new(40, options).await;
    let settings = SyncSettings {
        max_parallel_downloads: 2,
        ..retry_fast_settings()
    };
    let report = sync::run_job(
        &ctx(&env, settings),
        &env.job,
        sync::RunOptions { full: true },
    )
    .await
    .expect("the sync runs");
    assert!(report.output_files > 20);
    assert_exactly_the_data_set(&env, report.run_id).await;
    let most = env.fake.max_concurrent_files();
    assert!((1..=2).contains(&most), "{most} files at once");
}

#[tokio::test]
async fn a_file_over_the_size_cap_fails_the_run() {
    let env = env_with(20, Faults::default()).await;
    let settings = SyncSettings {
        max_file_bytes: 4096,
        ..retry_fast_settings()
    };
    let failed = sync::run_job(
        &ctx(&env, settings),
        &env.job,
        sync::RunOptions { full: true },
    )
    .await
    .expect_err("the files are bigger than 4 KiB");
    assert!(!failed.error.is_retryable());
    let (_, error, retryable, _) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(retryable, Some(false));
    assert!(error.unwrap().contains("sync.max_file_bytes"));
}

/// (sum of attempts, number of files) of a run.
async fn attempts(env: &TestEnv, run_id: i64) -> (i64, i64) {
    sqlx::query_as(
        "SELECT sum(attempts)::bigint, count(*) FROM fhir_sync.run_file WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request_when_the_server_takes_ranges() {
    let env = env_with(40, Faults::default().truncate_file(2).range()).await;
    let report = run(&env).await.expect("the cut files are resumed");
    assert_exactly_the_data_set(&env, report.run_id).await;
    let partial = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.path.contains("/bulkfiles/") && r.status == 206)
        .count();
    let seen: Vec<(u16, Option<String>)> = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.path.contains("/bulkfiles/"))
        .map(|r| (r.status, r.query.clone()))
        .collect();
    assert!(partial >= 2, "{partial} ranged responses {seen:?}");
    let (attempts, files) = attempts(&env, report.run_id).await;
    assert_eq!(attempts, files, "resuming does not restart a file");
}

#[tokio::test]
async fn a_cut_download_restarts_the_file_when_the_server_takes_no_ranges() {
    let env = env_with(40, Faults::default().truncate_file(2)).await;
    let report = run(&env).await.expect("the cut files are downloaded again");
    assert_exactly_the_data_set(&env, report.run_id).await;
    assert!(
        !env.fake.requests().iter().any(|r| r.status == 206),
        "no Range request to a server that does not advertise them"
    );
    let (attempts, files) = attempts(&env, report.run_id).await;
    assert_eq!(attempts, files + 2);
}

#[tokio::test]
async fn files_whose_urls_differ_only_in_the_query_string_all_load() {
    // `data?part=1` and `data?part=2`: redaction makes them look alike, but each is a file.
    let options = FakeOptions {
        resources_per_file: 10,
        ..faulty(Faults::default().query_string_parts())
    };
    let env = TestEnv::new(5, options).await;
    let report = run(&env).await.expect("every file loads");
    assert_exactly_the_data_set(&env, report.run_id).await;
    let files: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run_file WHERE run_id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert!(files > 4, "several files per type: {files}");
}

#[tokio::test]
async fn a_loaded_file_keeps_no_presigned_query_string() {
    let env = env_with(5, Faults::default()).await;
    let report = run(&env).await.unwrap();
    let kept: Vec<Option<String>> =
        sqlx::query_scalar("SELECT download_url FROM fhir_sync.run_file WHERE run_id = $1")
            .bind(report.run_id)
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert!(!kept.is_empty());
    assert!(
        kept.iter().all(Option::is_none),
        "the signed links are cleared once loaded: {kept:?}"
    );
}

#[tokio::test]
async fn a_file_that_trickles_is_given_up_and_retried() {
    // The first download sends one chunk and then a byte every 100 ms: every read arrives
    // within the read timeout, so only a minimum throughput ends it.
    let env = env_with(3, Faults::default().trickle_file(1)).await;
    let settings = SyncSettings {
        min_download_bytes_per_second: 1000,
        download_window_seconds: 1,
        ..retry_fast_settings()
    };
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        sync::run_job(
            &ctx(&env, settings),
            &env.job,
            sync::RunOptions { full: true },
        ),
    )
    .await
    .expect("the trickling download is given up")
    .expect("its retry loads the file");
    assert_exactly_the_data_set(&env, report.run_id).await;
    let worst: i32 =
        sqlx::query_scalar("SELECT max(attempts) FROM fhir_sync.run_file WHERE run_id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(worst, 2);
}
