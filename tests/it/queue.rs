//! Runs through the queue: incremental sync and the watermark, schedules, catch-up, overlap.

use fhir_sync::config::Overlap;
use fhir_sync::schedule::{self, TickOutcome};
use fhir_sync::sync::{SyncContext, Trigger};
use fhir_sync::warehouse::runs as state;

use crate::helpers::{TestEnv, queue_settings, sync_settings};

fn at(text: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
}

async fn watermark(env: &TestEnv) -> Option<(String, i64)> {
    sqlx::query_as("SELECT transaction_time, run_id FROM fhir_sync.watermark WHERE job = 'demo'")
        .fetch_optional(&env.db.pool)
        .await
        .unwrap()
}

fn kick_off_queries(env: &TestEnv) -> Vec<String> {
    env.fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/$export"))
        .map(|r| r.query.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn an_incremental_run_asks_for_changes_since_the_last_success() {
    let env = TestEnv::new(10, TestEnv::fast()).await;
    let first = env.run_incremental().await.unwrap();
    assert_eq!(
        first.since, None,
        "the first run has no watermark to start from"
    );
    assert_eq!(
        watermark(&env).await,
        Some((first.transaction_time.clone(), first.run_id))
    );

    let second = env.run_incremental().await.unwrap();
    assert_eq!(
        second.since.as_deref(),
        Some(first.transaction_time.as_str())
    );
    let queries = kick_off_queries(&env);
    assert_eq!(queries.len(), 2);
    assert!(!queries[0].contains("_since"), "{}", queries[0]);
    let encoded: String =
        url::form_urlencoded::byte_serialize(first.transaction_time.as_bytes()).collect();
    assert!(
        queries[1].contains(&format!("_since={encoded}")),
        "{} lacks {encoded}",
        queries[1]
    );
    // Nothing changed on the server since the first run: the second loads nothing, the rows
    // stay, and the watermark moves to the second run's transactionTime.
    assert_eq!(second.resources_loaded(), 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, env.fake.dataset().total());
    assert_eq!(
        watermark(&env).await,
        Some((second.transaction_time.clone(), second.run_id))
    );

    // --full ignores the watermark.
    let full = env.run().await.unwrap();
    assert_eq!(full.since, None);
    assert!(!kick_off_queries(&env)[2].contains("_since"));
}

#[tokio::test]
async fn a_failed_run_leaves_the_watermark_where_it_was() {
    let mut env = TestEnv::new(5, TestEnv::fast()).await;
    let first = env.run_incremental().await.unwrap();
    env.job.auth.key = fhir_sync::config::KeySource::Inline(
        fhir_sync::smart::generate(fhir_sync::smart::SigningAlgorithm::RS384).unwrap(),
    );
    let failed = env
        .run_incremental()
        .await
        .expect_err("an unregistered key fails the run");
    let (status, since): (String, Option<String>) =
        sqlx::query_as("SELECT status, since FROM fhir_sync.run WHERE id = $1")
            .bind(failed.run_id.unwrap())
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert_eq!(
        since.as_deref(),
        Some(first.transaction_time.as_str()),
        "the failed run did ask from the watermark"
    );
    assert_eq!(
        watermark(&env).await,
        Some((first.transaction_time, first.run_id))
    );
}

fn steps(env: &TestEnv) -> std::sync::Arc<SyncContext> {
    let ctx = SyncContext::new(
        env.db.pool.clone(),
        sync_settings(),
        queue_settings(),
        Vec::new(),
    );
    ctx.register_job(env.job.clone());
    ctx
}

fn with_schedule(env: &mut TestEnv, cron: &str, overlap: Overlap) {
    env.job.schedule = Some(fhir_sync::config::ScheduleConfig {
        cron: cron.into(),
        timezone: "UTC".into(),
        overlap,
    });
}

#[tokio::test]
async fn a_tick_starts_one_run_and_a_repeat_of_the_same_tick_starts_none() {
    let mut env = TestEnv::new(2, TestEnv::fast()).await;
    with_schedule(&mut env, "0 0 2 * * *", Overlap::Queue);
    let ctx = steps(&env);
    let fired = at("2026-03-10T02:00:00.300Z");
    let first = schedule::tick(&ctx, &env.job, fired).await.unwrap();
    let TickOutcome::Started(run_id) = first else {
        panic!("{first:?}")
    };
    // Another process's timer for the same tick, firing a moment later.
    let again = schedule::tick(&ctx, &env.job, at("2026-03-10T02:00:00.900Z"))
        .await
        .unwrap();
    assert_eq!(again, TickOutcome::AlreadyStarted);
    let run = state::load(&env.db.pool, run_id).await.unwrap();
    assert_eq!(run.status, "queued");
    let (scheduled_for, trigger): (time::OffsetDateTime, String) =
        sqlx::query_as("SELECT scheduled_for, trigger FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(scheduled_for, at("2026-03-10T02:00:00Z"));
    assert_eq!(trigger, "schedule");
}

#[tokio::test]
async fn a_tick_while_the_previous_run_is_going_is_skipped_and_recorded() {
    let mut env = TestEnv::new(2, TestEnv::fast()).await;
    with_schedule(&mut env, "0 0 * * * *", Overlap::Skip);
    let ctx = steps(&env);
    let TickOutcome::Started(busy) = schedule::tick(&ctx, &env.job, at("2026-03-10T02:00:00Z"))
        .await
        .unwrap()
    else {
        panic!("the first tick starts a run")
    };
    let next = schedule::tick(&ctx, &env.job, at("2026-03-10T03:00:00Z"))
        .await
        .unwrap();
    assert_eq!(next, TickOutcome::Skipped { busy_run: busy });
    let (status, error): (String, String) = sqlx::query_as(
        "SELECT status, error FROM fhir_sync.run WHERE job = 'demo' AND scheduled_for = $1",
    )
    .bind(at("2026-03-10T03:00:00Z"))
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(status, "skipped");
    assert!(error.contains(&format!("run {busy}")), "{error}");
}

#[tokio::test]
async fn missed_ticks_are_caught_up_once() {
    let mut env = TestEnv::new(2, TestEnv::fast()).await;
    with_schedule(&mut env, "0 0 * * * *", Overlap::Skip);
    let ctx = steps(&env);
    let now = at("2026-03-10T12:30:00Z");
    // A new job with no history does not run at start-up.
    assert_eq!(schedule::catch_up(&ctx, &env.job, now).await.unwrap(), None);
    // The job last ran at 08:00; the 09:00 to 12:00 ticks were missed while nothing ran.
    let old = state::create(
        &env.db.pool,
        "demo",
        "x",
        Trigger::Schedule,
        Some(at("2026-03-10T08:00:00Z")),
        false,
    )
    .await
    .unwrap()
    .unwrap();
    sqlx::query("UPDATE fhir_sync.run SET status = 'succeeded', started_at = $2, finished_at = $2 WHERE id = $1")
        .bind(old)
        .bind(at("2026-03-10T08:00:00Z"))
        .execute(&env.db.pool)
        .await
        .unwrap();
    let caught = schedule::catch_up(&ctx, &env.job, now)
        .await
        .unwrap()
        .expect("one catch-up run");
    let (scheduled_for, trigger): (time::OffsetDateTime, String) =
        sqlx::query_as("SELECT scheduled_for, trigger FROM fhir_sync.run WHERE id = $1")
            .bind(caught)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(
        scheduled_for,
        at("2026-03-10T12:00:00Z"),
        "the latest missed tick"
    );
    assert_eq!(trigger, "catch-up");
    // A second start-up (another process, or a restart) does not catch up again.
    assert_eq!(schedule::catch_up(&ctx, &env.job, now).await.unwrap(), None);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(
        runs, 2,
        "one old run and one catch-up, not one per missed tick"
    );
}

#[tokio::test]
async fn deletion_files_are_applied_after_the_output_through_the_queue() {
    use fhir_sync::fake::Faults;
    let env = crate::export_env::env_with(5, Faults::default().deleted_resources(2)).await;
    let report = env.run().await.expect("a manifest with deletions syncs");
    // The fake's deletion Bundle names two patients it never served: they become tombstones,
    // so an older copy arriving later cannot bring them back; nothing visible is lost.
    let tombstones: Vec<(String, bool)> = sqlx::query_as(
        "SELECT id, deleted_by_run_id = $1 FROM fhir_sync.resource WHERE deleted_at IS NOT NULL ORDER BY id",
    )
    .bind(report.run_id)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        tombstones,
        [
            ("deleted-1".to_string(), true),
            ("deleted-2".to_string(), true)
        ]
    );
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir.patient")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(visible as usize, env.fake.dataset().count("Patient"));
    // The deletion file started only after every output file had finished.
    let (last_output_done, deletion_started): (time::OffsetDateTime, time::OffsetDateTime) = sqlx::query_as(
        "SELECT (SELECT max(finished_at) FROM fhir_sync.run_file WHERE run_id = $1 AND kind <> 'deleted'),
                (SELECT min(started_at) FROM fhir_sync.run_file WHERE run_id = $1 AND kind = 'deleted')",
    )
    .bind(report.run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert!(
        deletion_started >= last_output_done,
        "{deletion_started} < {last_output_done}"
    );
}

#[tokio::test]
async fn a_refused_kick_off_is_retried_as_a_step_within_the_request_attempts() {
    use fhir_sync::fake::Faults;
    let settings = crate::export_env::retry_fast_settings();
    // One 503 fewer than the request attempts: each kick-off request is one step, the queue
    // runs it again later, and the last one gets through.
    let storm = settings.request_attempts - 1;
    let env = crate::export_env::env_with(3, Faults::default().kick_off_503(storm)).await;
    let ctx = crate::export_env::ctx(&env, settings.clone());
    let report =
        fhir_sync::sync::run_job(&ctx, &env.job, fhir_sync::sync::RunOptions { full: true })
            .await
            .expect("the step retry gets through");
    crate::export_env::assert_exactly_the_data_set(&env, report.run_id).await;
    let retries: i64 = sqlx::query_scalar("SELECT retries FROM fhir_sync.run WHERE id = $1")
        .bind(report.run_id)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(retries, storm as i64, "every refused kick-off is counted");
    let kick_offs = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/$export"))
        .count();
    assert_eq!(kick_offs as u32, storm + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_fails_its_run_and_the_workers_go_on() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    // A job whose poll policy cannot be built (a NaN interval panics in Duration): job files
    // are validated against this, so it stands in for a bug inside a step.
    let mut broken = env.job.clone();
    broken.name = "broken".into();
    broken.export.poll_min_interval_seconds = f64::NAN;
    let ctx = SyncContext::new(
        env.db.pool.clone(),
        sync_settings(),
        queue_settings(),
        Vec::new(),
    );
    ctx.register_job(broken.clone());
    ctx.register_job(env.job.clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let workers = tokio::spawn(fhir_sync::sync::steps::run_workers(
        ctx.clone(),
        shutdown.clone(),
        std::time::Duration::from_secs(5),
    ));
    let bad = fhir_sync::sync::enqueue_run(&ctx, &broken, Trigger::Manual, None, true)
        .await
        .unwrap()
        .unwrap();
    let wait = |run_id| {
        let pool = env.db.pool.clone();
        async move {
            tokio::time::timeout(
                std::time::Duration::from_secs(60),
                fhir_sync::sync::wait_for_run(&pool, run_id),
            )
            .await
            .expect("the run ends")
            .unwrap()
        }
    };
    let bad_end = wait(bad).await;
    assert_eq!(bad_end.status, "failed");
    assert!(
        bad_end
            .error
            .as_deref()
            .unwrap_or("")
            .contains("a step panicked"),
        "{:?}",
        bad_end.error
    );
    // The same workers still run the next run to its end.
    let good = fhir_sync::sync::enqueue_run(&ctx, &env.job, Trigger::Manual, None, true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(wait(good).await.status, "succeeded");
    shutdown.cancel();
    workers.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_progress_is_recorded_on_the_run_while_it_exports() {
    // Three 202s with Retry-After: 1, so the export is in progress for a couple of seconds.
    let env = TestEnv::new(
        3,
        fhir_sync::fake::FakeOptions {
            retry_after_seconds: 1,
            polls_before_ready: 3,
            ..TestEnv::fast()
        },
    )
    .await;
    let ctx = env.ctx();
    let job = env.job.clone();
    let run = tokio::spawn(async move {
        fhir_sync::sync::run_job(&ctx, &job, fhir_sync::sync::RunOptions { full: true }).await
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let progress = loop {
        let seen: Option<String> =
            sqlx::query_scalar("SELECT progress FROM fhir_sync.run WHERE status = 'exporting' AND progress IS NOT NULL")
                .fetch_optional(&env.db.pool)
                .await
                .unwrap();
        if let Some(progress) = seen {
            break progress;
        }
        assert!(
            tokio::time::Instant::now() < deadline && !run.is_finished(),
            "no progress was recorded while exporting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(progress.starts_with("in progress"), "{progress}");
    let report = run.await.unwrap().unwrap();
    let after: Option<String> =
        sqlx::query_scalar("SELECT progress FROM fhir_sync.run WHERE id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(
        after, None,
        "progress is cleared once the export is complete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_run_waits_for_the_active_run_of_its_job() {
    let env = TestEnv::new(
        5,
        fhir_sync::fake::FakeOptions {
            retry_after_seconds: 1,
            polls_before_ready: 2,
            ..TestEnv::fast()
        },
    )
    .await;
    let ctx = steps(&env);
    let first = fhir_sync::sync::enqueue_run(&ctx, &env.job, Trigger::Manual, None, true)
        .await
        .unwrap()
        .unwrap();
    // `overlap = "queue"`: the second run is created while the first is going, and waits.
    let second = fhir_sync::sync::enqueue_run(&ctx, &env.job, Trigger::Manual, None, true)
        .await
        .unwrap()
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let workers = tokio::spawn(fhir_sync::sync::steps::run_workers(
        ctx.clone(),
        shutdown.clone(),
        std::time::Duration::from_secs(5),
    ));
    for run_id in [first, second] {
        let end = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            fhir_sync::sync::wait_for_run(&env.db.pool, run_id),
        )
        .await
        .expect("the run ends")
        .unwrap();
        assert_eq!(end.status, "succeeded");
    }
    shutdown.cancel();
    workers.await.unwrap().unwrap();
    // The runs did not overlap: the second loaded nothing before the first had finished.
    let (first_done, second_loading): (time::OffsetDateTime, time::OffsetDateTime) =
        sqlx::query_as(
            "SELECT (SELECT finished_at FROM fhir_sync.run WHERE id = $1),
                (SELECT min(started_at) FROM fhir_sync.run_file WHERE run_id = $2)",
        )
        .bind(first)
        .bind(second)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert!(
        second_loading >= first_done,
        "{second_loading} < {first_done}"
    );
    let kick_offs = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/$export"))
        .count();
    assert_eq!(kick_offs, 2);
}
