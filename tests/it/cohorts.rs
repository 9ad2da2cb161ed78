//! Complete cohorts: a patient who joins a group between runs gets their whole history in the
//! next incremental run (a second export with `patient` and no `_since`), and a patient who
//! leaves is recorded as left, their rows kept.

use fhir_sync::config::ExportLevel;
use fhir_sync::sync::{self, RunOptions, RunReport};
use fhir_sync::warehouse::RunStatus;

use crate::export_env::{ctx, retry_fast_settings};
use crate::helpers::TestEnv;

const GROUP: &str = "cohort";

async fn run(env: &TestEnv, full: bool) -> RunReport {
    let report = sync::run_job(
        &ctx(env, retry_fast_settings()),
        &env.job,
        RunOptions { full },
    )
    .await
    .expect("the run succeeds");
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.warning);
    report
}

/// Live rows in the compartment of `patient` (the Patient included).
async fn rows_of(env: &TestEnv, patient: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM fhir_sync.resource WHERE patient_id = $1 AND deleted_at IS NULL",
    )
    .bind(patient)
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

/// (patient, first_seen_run, left_run) of the group's recorded members.
async fn members(env: &TestEnv) -> Vec<(String, i64, Option<i64>)> {
    sqlx::query_as(
        "SELECT patient_id, first_seen_run, left_run FROM fhir_sync.group_member
         WHERE job = $1 AND group_id = $2 ORDER BY patient_id",
    )
    .bind(&env.job.name)
    .bind(GROUP)
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_patient_who_joins_the_group_gets_their_whole_history_in_the_next_incremental_run() {
    let mut env = TestEnv::new(6, TestEnv::fast()).await;
    env.job.export.level = ExportLevel::Group;
    env.job.export.group_id = Some(GROUP.into());
    env.job.export.poll_default_interval_seconds = 0.01;
    env.fake.set_group(GROUP, [0, 1, 2]);
    let data = env.fake.dataset().clone();
    let id = |i| data.id("Patient", i);
    // A patient's compartment: the Patient, 3 Encounters, 12 Observations, 2 Conditions.
    let compartment = 18;

    let first = run(&env, true).await;
    assert_eq!(first.resources_loaded(), 3 * compartment);
    assert_eq!(
        members(&env).await,
        [0, 1, 2].map(|i| (id(i), first.run_id, None))
    );

    // Patient 4, whose history is years old (older than the watermark), joins; patient 2
    // leaves.
    env.fake.set_group(GROUP, [0, 1, 4]);
    assert_eq!(rows_of(&env, &id(4)).await, 0);
    let second = run(&env, false).await;
    assert_eq!(
        rows_of(&env, &id(4)).await,
        compartment,
        "the new member's whole history is loaded by the incremental run"
    );
    assert_eq!(second.resources_loaded(), compartment);
    // The member left: recorded, and their rows stay.
    assert_eq!(
        members(&env).await,
        vec![
            (id(0), first.run_id, None),
            (id(1), first.run_id, None),
            (id(2), first.run_id, Some(second.run_id)),
            (id(4), second.run_id, None),
        ]
    );
    assert_eq!(rows_of(&env, &id(2)).await, compartment);

    // The second run made two exports: the group's changes since the watermark, then the new
    // member's everything (POST, `patient`, no `_since`).
    let kick_offs = env.fake.kick_offs();
    assert_eq!(kick_offs.len(), 3);
    let has = |k: usize, name: &str| kick_offs[k].params.iter().any(|(n, _)| n == name);
    assert!(has(1, "_since") && !has(1, "patient"));
    assert_eq!(kick_offs[2].method, "POST");
    assert_eq!(kick_offs[2].path, format!("/fhir/Group/{GROUP}/$export"));
    assert!(!has(2, "_since"));
    assert_eq!(
        kick_offs[2]
            .params
            .iter()
            .filter(|(n, _)| n == "patient")
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>(),
        [format!("Patient/{}", id(4))]
    );
    // The watermark is the first export's transactionTime, and both exports were deleted.
    let (watermark_run, exports_left): (i64, usize) = (
        sqlx::query_scalar("SELECT run_id FROM fhir_sync.watermark WHERE job = $1")
            .bind(&env.job.name)
            .fetch_one(&env.db.pool)
            .await
            .unwrap(),
        env.fake.export_count(),
    );
    assert_eq!((watermark_run, exports_left), (second.run_id, 0));
    assert_eq!(
        second.transaction_time,
        sqlx::query_scalar::<_, String>(
            "SELECT transaction_time FROM fhir_sync.watermark WHERE job = $1"
        )
        .bind(&env.job.name)
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
    );

    // A run with no change in the group makes one export.
    run(&env, false).await;
    assert_eq!(env.fake.kick_offs().len(), 4);
}
