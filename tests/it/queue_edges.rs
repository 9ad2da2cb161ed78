//! The sharp edges of apalis-postgres 1.0 (shared/reference/stack.md), each pinned by a test.

use std::time::Duration;

use fhir_sync::queue::{self, Pushed, QueueSettings, TaskQueue};
use fhir_sync::sync::{self, RunOptions, SyncContext, Trigger};

use crate::helpers::{TestDb, TestEnv, eventually, queue_settings, sync_settings};

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Ping {
    n: u32,
}

#[tokio::test]
async fn a_duplicate_idempotency_key_is_dropped_not_queued_twice() {
    let db = TestDb::new().await;
    let queue: TaskQueue<Ping> =
        TaskQueue::new(db.pool.clone(), "test-queue", QueueSettings::default());
    assert_eq!(
        queue
            .push(Ping { n: 1 }, "tick:2026-03-10T02:00", Duration::ZERO)
            .await
            .unwrap(),
        Pushed::Queued
    );
    // A second replica's copy of the same cron tick.
    assert_eq!(
        queue
            .push(Ping { n: 1 }, "tick:2026-03-10T02:00", Duration::ZERO)
            .await
            .unwrap(),
        Pushed::Duplicate
    );
    assert_eq!(
        queue
            .push(Ping { n: 2 }, "tick:2026-03-10T03:00", Duration::ZERO)
            .await
            .unwrap(),
        Pushed::Queued
    );
    assert_eq!(queue.backlog().await.unwrap(), 2);
}

#[tokio::test]
async fn tasks_get_one_attempt_and_delays_are_real() {
    let db = TestDb::new().await;
    let queue: TaskQueue<Ping> =
        TaskQueue::new(db.pool.clone(), "test-queue", QueueSettings::default());
    queue
        .push(Ping { n: 1 }, "now", Duration::ZERO)
        .await
        .unwrap();
    queue
        .push(Ping { n: 2 }, "later", Duration::from_secs(120))
        .await
        .unwrap();
    let rows: Vec<(String, i32, bool)> = sqlx::query_as(
        "SELECT idempotency_key, max_attempts, run_at > now() + interval '100 seconds' FROM apalis.jobs
         WHERE job_type = 'test-queue' ORDER BY idempotency_key",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // max_attempts 1: a failed task is never re-run back-to-back by the database; retries are
    // new tasks pushed with a delay.
    assert_eq!(
        rows,
        [
            ("later".to_string(), 1, true),
            ("now".to_string(), 1, false)
        ]
    );
}

#[tokio::test]
async fn every_worker_name_is_unique() {
    let names: std::collections::HashSet<String> =
        (0..100).map(|_| queue::worker_name("fhir-sync")).collect();
    assert_eq!(names.len(), 100);
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("fhir-sync-") && n.contains(&std::process::id().to_string()))
    );
}

#[tokio::test]
async fn retention_purges_old_finished_tasks_and_keeps_the_rest() {
    let db = TestDb::new().await;
    let queue: TaskQueue<Ping> =
        TaskQueue::new(db.pool.clone(), "test-queue", QueueSettings::default());
    for key in ["old-done", "new-done", "pending"] {
        queue
            .push(Ping { n: 0 }, key, Duration::ZERO)
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Done', done_at = now() - interval '30 days' WHERE idempotency_key = 'old-done'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE apalis.jobs SET status = 'Done', done_at = now() WHERE idempotency_key = 'new-done'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(queue.purge().await.unwrap(), 1);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM apalis.jobs ORDER BY idempotency_key")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, ["new-done", "pending"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_queued_by_another_process_start_without_waiting_for_a_heartbeat() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    // Heartbeats every 60 s: without LISTEN/NOTIFY and the short poll, nothing would start
    // for up to a minute.
    let slow_heartbeat = QueueSettings {
        heartbeat_interval_seconds: 60,
        ..queue_settings()
    };
    let workers = SyncContext::new(
        env.db.pool.clone(),
        sync_settings(),
        slow_heartbeat.clone(),
        Vec::new(),
    );
    workers.register_job(env.job.clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(sync::steps::run_workers(
        workers,
        shutdown.clone(),
        Duration::from_secs(5),
    ));
    // "Another process": a separate context that only queues.
    let producer = SyncContext::new(
        env.db.pool.clone(),
        sync_settings(),
        slow_heartbeat,
        Vec::new(),
    );
    let run_id = sync::enqueue_run(&producer, &env.job, Trigger::Manual, None, true)
        .await
        .unwrap()
        .unwrap();
    let end = tokio::time::timeout(
        Duration::from_secs(30),
        sync::wait_for_run(&env.db.pool, run_id),
    )
    .await
    .expect("the run finishes well before a 60 s heartbeat could have fetched its steps")
    .unwrap();
    assert_eq!(end.status, "succeeded");
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_queued_before_the_workers_start_runs_without_waiting_for_a_poll() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    // A minute between polls: the kick-off, queued before any worker listened for its NOTIFY,
    // starts promptly only if workers fetch once when they start.
    let slow_poll = QueueSettings {
        poll_interval_ms: 60_000,
        ..queue_settings()
    };
    let ctx = SyncContext::new(env.db.pool.clone(), sync_settings(), slow_poll, Vec::new());
    ctx.register_job(env.job.clone());
    let run_id = sync::enqueue_run(&ctx, &env.job, Trigger::Manual, None, true)
        .await
        .unwrap()
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(sync::steps::run_workers(
        ctx,
        shutdown.clone(),
        Duration::from_secs(5),
    ));
    let mut listener = sqlx::postgres::PgListener::connect_with(&env.db.pool)
        .await
        .unwrap();
    listener.listen("fhir_sync_run").await.unwrap();
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let status: String =
                sqlx::query_scalar("SELECT status FROM fhir_sync.run WHERE id = $1")
                    .bind(run_id)
                    .fetch_one(&env.db.pool)
                    .await
                    .unwrap();
            if status != "queued" {
                return status;
            }
            // Every state change notifies; the bound only guards a notification sent between
            // the query and this wait.
            let _ = tokio::time::timeout(Duration::from_millis(200), listener.recv()).await;
        }
    })
    .await
    .expect("the kick-off starts well before the first 60 s poll");
    assert_ne!(started, "failed");
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_mid_run_does_not_end_the_workers() {
    let env = TestEnv::new(
        1_000,
        fhir_sync::fake::FakeOptions {
            retry_after_seconds: 0,
            polls_before_ready: 1,
            resources_per_file: 6_000,
            ..fhir_sync::fake::FakeOptions::default()
        },
    )
    .await;
    let ctx = env.ctx();
    let job = env.job.clone();
    let run =
        tokio::spawn(async move { sync::run_job(&ctx, &job, RunOptions { full: true }).await });
    // Once a file is half loaded, cut every connection to the database (ours excepted).
    let admin = sqlx::PgPool::connect(&env.db.url()).await.unwrap();
    eventually(Duration::from_secs(120), "a file to be half loaded", || async {
        let mid: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run_file WHERE lines_committed > 0 AND status = 'loading'")
            .fetch_one(&admin)
            .await
            .unwrap();
        if mid > 0 {
            return Some(());
        }
        assert!(
            !run.is_finished(),
            "the run ended before the outage could be staged"
        );
        None
    })
    .await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(killed > 0);
    let run_id: i64 = sqlx::query_scalar("SELECT id FROM fhir_sync.run")
        .fetch_one(&admin)
        .await
        .unwrap();
    // Slow is fine (a busy machine); stuck is the failure this test looks for.
    let report = crate::helpers::until_run_ends(&admin, run_id, run)
        .await
        .expect("the run succeeds");
    assert_eq!(
        report.resources_loaded() as usize,
        env.fake.dataset().total()
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(rows as usize, env.fake.dataset().total());
}
