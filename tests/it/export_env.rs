//! Shared pieces of the export tests: settings that retry without waiting, and checks that the
//! warehouse holds exactly the fake server's data set.

use std::sync::Arc;

use std::collections::BTreeSet;

use fhir_sync::config::SyncSettings;
use fhir_sync::fake::{FakeOptions, Faults, RESOURCE_TYPES};
use fhir_sync::sync::{self, RunFailed, RunReport, SyncContext};

use crate::helpers::{TestEnv, sync_settings};

/// Test settings whose retries wait a millisecond or so instead of seconds, and whose small
/// batches make a file span several committed checkpoints.
pub fn retry_fast_settings() -> SyncSettings {
    SyncSettings {
        batch_lines: 50,
        retry_base_delay_ms: 1,
        // Scripted faults are counted per server, so one file can meet all of them in a row.
        request_attempts: 12,
        ..sync_settings()
    }
}

/// The fast fake server options with `faults` scripted.
pub fn faulty(faults: Faults) -> FakeOptions {
    FakeOptions {
        faults,
        ..TestEnv::fast()
    }
}

/// A test environment over `patients` patients whose fake server injects `faults`, with a
/// job that polls without waiting long.
pub async fn env_with(patients: usize, faults: Faults) -> TestEnv {
    let mut env = TestEnv::new(patients, faulty(faults)).await;
    env.job.export.poll_default_interval_seconds = 0.01;
    env
}

pub fn ctx(env: &TestEnv, settings: SyncSettings) -> Arc<SyncContext> {
    env.ctx_with(settings)
}

/// Runs the env's job with [`retry_fast_settings`].
pub async fn run(env: &TestEnv) -> Result<RunReport, RunFailed> {
    sync::run_job(
        &ctx(env, retry_fast_settings()),
        &env.job,
        sync::RunOptions { full: true },
    )
    .await
}

/// Asserts the warehouse holds every resource of the data set once, with its generated
/// content, and nothing else; and that the run counted each resource once.
pub async fn assert_exactly_the_data_set(env: &TestEnv, run_id: i64) {
    let dataset = env.fake.dataset();
    for resource_type in RESOURCE_TYPES {
        let expected: BTreeSet<String> = (0..dataset.count(resource_type))
            .map(|i| {
                dataset.resource(resource_type, i)["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let stored: Vec<(String, serde_json::Value)> = sqlx::query_as(
            "SELECT id, resource FROM fhir_sync.resource WHERE resource_type = $1 ORDER BY id",
        )
        .bind(resource_type)
        .fetch_all(&env.db.pool)
        .await
        .unwrap();
        let ids: BTreeSet<String> = stored.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(ids, expected, "{resource_type}: stored ids");
        for (id, resource) in stored {
            assert_eq!(resource["id"], id.as_str());
            assert_eq!(resource["resourceType"], resource_type);
        }
    }
    let (loaded, rejected): (i64, i64) =
        sqlx::query_as("SELECT resources_loaded, lines_rejected FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(
        loaded as usize,
        dataset.total(),
        "every resource is counted exactly once, retries included"
    );
    assert_eq!(rejected, 0);
}

/// (status, error, error_retryable, retries) of a run.
pub async fn run_row(env: &TestEnv, run_id: i64) -> (String, Option<String>, Option<bool>, i64) {
    sqlx::query_as(
        "SELECT status, error, error_retryable, retries FROM fhir_sync.run WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}
