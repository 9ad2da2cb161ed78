//! Full sync runs against the fake server.

use std::collections::BTreeMap;

use fhir_sync::fake::RESOURCE_TYPES;
use serde_json::Value;

use crate::helpers::TestEnv;

/// id, version_id, last_updated, resource, last_run_id
type StoredRow = (
    String,
    Option<String>,
    Option<time::OffsetDateTime>,
    Value,
    i64,
);

#[tokio::test]
async fn a_full_sync_lands_exactly_the_generated_resources() {
    let env = TestEnv::new(40, TestEnv::fast()).await;
    let report = env.run().await.expect("sync succeeds");
    let dataset = env.fake.dataset();

    for resource_type in RESOURCE_TYPES {
        let expected: BTreeMap<String, Value> = (0..dataset.count(resource_type))
            .map(|i| {
                let resource = dataset.resource(resource_type, i);
                (resource["id"].as_str().unwrap().to_string(), resource)
            })
            .collect();
        let rows: Vec<StoredRow> = sqlx::query_as(
            "SELECT id, version_id, last_updated, resource, last_run_id FROM fhir_sync.resource
             WHERE source = 'demo' AND resource_type = $1 ORDER BY id",
        )
        .bind(resource_type)
        .fetch_all(&env.db.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), expected.len(), "{resource_type}: row count");
        for (id, version_id, last_updated, resource, run_id) in rows {
            let generated = expected
                .get(&id)
                .unwrap_or_else(|| panic!("{resource_type}/{id} was not generated"));
            assert_eq!(&resource, generated, "{resource_type}/{id} content");
            assert_eq!(
                version_id.as_deref(),
                generated["meta"]["versionId"].as_str()
            );
            let instant =
                fhir_sync::fhir::parse_instant(generated["meta"]["lastUpdated"].as_str().unwrap());
            assert_eq!(last_updated, instant, "{resource_type}/{id} lastUpdated");
            assert_eq!(run_id, report.run_id);
        }
    }

    // The run and its files are recorded.
    let (status, loaded, rejected, transaction_time, request): (String, i64, i64, Option<String>, Option<String>) =
        sqlx::query_as("SELECT status, resources_loaded, lines_rejected, transaction_time, export_request FROM fhir_sync.run WHERE id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded");
    assert_eq!(loaded as usize, dataset.total());
    assert_eq!(rejected, 0);
    assert_eq!(
        transaction_time.as_deref(),
        Some(report.transaction_time.as_str())
    );
    assert!(
        request
            .unwrap()
            .contains("_type=Patient%2CEncounter%2CObservation%2CCondition")
    );
    let files: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT status, resource_type, resources_loaded, bytes FROM fhir_sync.run_file WHERE run_id = $1",
    )
    .bind(report.run_id)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    // 40 patients, 250 per file: Patient 1 file, Encounter 1, Observation 2, Condition 1.
    assert_eq!(files.len(), 5);
    assert!(
        files
            .iter()
            .all(|(status, _, _, bytes)| status == "loaded" && *bytes > 0),
        "{files:?}"
    );
    assert_eq!(report.output_files, 5);
    assert_eq!(report.resources_loaded() as usize, dataset.total());

    // The client polled, sent the spec's headers, and deleted the export when done.
    let requests = env.fake.requests();
    let kick_off = requests
        .iter()
        .find(|r| r.path.ends_with("/$export"))
        .expect("a kick-off");
    assert_eq!(kick_off.accept.as_deref(), Some("application/fhir+json"));
    assert_eq!(kick_off.prefer.as_deref(), Some("respond-async"));
    assert!(kick_off.had_authorization);
    let polls = requests
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/bulkstatus/"))
        .count();
    assert_eq!(polls, 3, "two 202 polls and the manifest");
    assert!(
        requests
            .iter()
            .any(|r| r.method == "DELETE" && r.path.contains("/bulkstatus/") && r.status == 202)
    );
}

#[tokio::test]
async fn a_second_identical_run_does_not_duplicate_rows() {
    let env = TestEnv::new(20, TestEnv::fast()).await;
    let first = env.run().await.unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM fhir_sync.resource")
            .fetch_one(&env.db.pool)
            .await
            .unwrap()
    };
    let after_first = count().await;
    assert_eq!(after_first as usize, env.fake.dataset().total());

    let second = env.run().await.unwrap();
    assert_ne!(first.run_id, second.run_id);
    assert_eq!(
        count().await,
        after_first,
        "re-running the same sync must not add rows"
    );
    let (first_runs, last_runs): (Vec<i64>, Vec<i64>) = sqlx::query_as::<_, (i64, i64)>(
        "SELECT DISTINCT first_run_id, last_run_id FROM fhir_sync.resource",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
    .into_iter()
    .unzip();
    assert_eq!(
        first_runs,
        [first.run_id],
        "rows remember the run that first loaded them"
    );
    assert_eq!(
        last_runs,
        [second.run_id],
        "and the run that last loaded them"
    );
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run WHERE status = 'succeeded'")
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 2);
}

#[tokio::test]
async fn an_unregistered_key_fails_the_run_fatally_with_a_hint() {
    let mut env = TestEnv::new(5, TestEnv::fast()).await;
    // A different key than the one registered with the fake server.
    env.job.auth.key = fhir_sync::config::KeySource::Inline(
        fhir_sync::smart::generate(fhir_sync::smart::SigningAlgorithm::RS384).unwrap(),
    );
    let failed = env
        .run()
        .await
        .expect_err("the token request must be refused");
    assert!(!failed.error.is_retryable());
    let run_id = failed.run_id.expect("the run was recorded");
    let (status, error, retryable): (String, String, bool) =
        sqlx::query_as("SELECT status, error, error_retryable FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(!retryable);
    assert!(error.contains("invalid_client"), "{error}");
    assert!(
        error.contains("hint:") && error.contains("fhir-sync-demo"),
        "{error}"
    );
    let loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(loaded, 0);
}
