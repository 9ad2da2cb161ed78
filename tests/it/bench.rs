//! The bench's fake FHIR server as a child process (`fhir-sync bench-fake-server`): a real sync
//! through it, plain and then the changed generation gzip-encoded, and a clean stop.

use std::path::Path;

use fhir_sync::bench::{FakeProcess, FakeSpec};
use fhir_sync::demo;
use fhir_sync::fake::Dataset;
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunOptions, SyncContext};

use crate::helpers::{TestDb, queue_settings, sync_settings};

#[tokio::test]
async fn a_sync_through_the_bench_fake_server_process_loads_what_it_serves() {
    let db = TestDb::new().await;
    let pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    let key = SigningKey::from_pem(&pem, SigningAlgorithm::RS384, None, "test key").unwrap();
    let ctx = SyncContext::new(
        db.pool.clone(),
        sync_settings(),
        queue_settings(),
        Vec::new(),
    );
    let exe = Path::new(env!("CARGO_BIN_EXE_fhir-sync"));
    let spec = FakeSpec {
        seed: 5,
        patients: 4,
        changed_every: None,
        resources_per_file: 20,
        gzip: false,
    };
    let dataset = Dataset::new(spec.seed, spec.patients);
    let mut loaded_versions = Vec::new();
    for spec in [
        spec.clone(),
        // The changed generation, gzip-encoded: both flags must reach the child.
        FakeSpec {
            changed_every: Some(3),
            gzip: true,
            ..spec.clone()
        },
    ] {
        let server = FakeProcess::spawn(exe, &spec, &key.public_jwks())
            .await
            .unwrap();
        let mut job = demo::fake_job(server.base_url().clone(), pem.clone());
        job.export.poll_min_interval_seconds = 0.01;
        let report = sync::run_job(&ctx, &job, RunOptions { full: true })
            .await
            .unwrap();
        loaded_versions.push(report.resources_loaded());
        // The child exits cleanly once the bench closes its stdin.
        server.stop().await.unwrap();
    }
    assert_eq!(
        loaded_versions,
        [dataset.total() as i64, dataset.changed(3).total() as i64]
    );
    let (rows, newer): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE last_updated >= '2026-01-01') FROM fhir_sync.resource",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (rows, newer),
        (dataset.total() as i64, dataset.changed(3).total() as i64)
    );
}
