//! Manifests: error files stored and counted, relative URLs, paging, the string "true".

use fhir_sync::fake::Faults;

use crate::export_env::{assert_exactly_the_data_set, env_with, run};

#[tokio::test]
async fn error_files_are_downloaded_stored_and_counted() {
    let env = env_with(6, Faults::default().error_file()).await;
    let report = run(&env)
        .await
        .expect("errors in the manifest do not fail the run");
    assert_exactly_the_data_set(&env, report.run_id).await;
    assert_eq!(report.error_files, 1);
    // Its outcomes are warnings: the export is complete, the watermark moves.
    assert_eq!(
        report.status,
        fhir_sync::warehouse::RunStatus::Succeeded,
        "{:?}",
        report.warning
    );
    // One OperationOutcome per exported type.
    assert_eq!(report.export_errors, 4);
    let (counted, stored): (i64, i64) = sqlx::query_as(
        "SELECT r.export_errors, (SELECT count(*) FROM fhir_sync.export_error e WHERE e.run_id = r.id)
         FROM fhir_sync.run r WHERE r.id = $1",
    )
    .bind(report.run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!((counted, stored), (4, 4));
    let diagnostics: Vec<String> = sqlx::query_scalar(
        "SELECT outcome #>> '{issue,0,diagnostics}' FROM fhir_sync.export_error WHERE run_id = $1 ORDER BY line_number",
    )
    .bind(report.run_id)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        diagnostics[0],
        "some Patient resources could not be exported"
    );
}

#[tokio::test]
async fn relative_urls_paged_manifests_and_a_string_flag_are_understood() {
    let faults = Faults::default()
        .relative_urls()
        .manifest_page_size(2)
        .requires_access_token_as_string();
    // 40 patients at 250 per file: 5 files, so three pages.
    let env = env_with(40, faults).await;
    let report = run(&env).await.expect("every page is followed");
    assert_eq!(report.output_files, 5);
    assert_exactly_the_data_set(&env, report.run_id).await;
    let requests = env.fake.requests();
    let pages: Vec<Option<String>> = requests
        .iter()
        .filter(|r| r.path.contains("/bulkstatus/") && r.method == "GET" && r.status == 200)
        .map(|r| r.query.clone())
        .collect();
    assert_eq!(
        pages,
        [None, Some("page=2".to_string()), Some("page=3".to_string())]
    );
    // "true" as a string still means the files need the token.
    assert!(
        requests
            .iter()
            .filter(|r| r.path.contains("/bulkfiles/"))
            .all(|r| r.had_authorization && r.status == 200)
    );
}
