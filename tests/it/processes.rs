//! Real `fhir-sync serve` processes against one database: one run per tick across processes,
//! and work that survives a killed or stopped process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fhir_sync::fake::FakeOptions;
use fhir_sync::sync::{self, SyncContext, Trigger};

use crate::helpers::{TestEnv, eventually, queue_settings, sync_settings};

/// A `serve` process; killed when dropped so a failing test leaves nothing running.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path, db_url: &str, name: &str) -> Serve {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
            .arg("--config-dir")
            .arg(dir.join("config"))
            .arg("--jobs-dir")
            .arg(dir.join("jobs"))
            .arg("serve")
            .env("FHIR_SYNC_DATABASE__URL", db_url)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("FHIR_SYNC_ENV")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Serve { child, log }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (after SIGTERM) and returns whether it exited cleanly.
    fn wait(&mut self) -> bool {
        self.child.wait().unwrap().success()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes config/ and jobs/demo.toml for serve processes talking to the test's fake server.
pub(crate) fn write_setup(env: &TestEnv, dir: &Path, schedule: Option<&str>) {
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::create_dir_all(dir.join("jobs")).unwrap();
    std::fs::write(
        dir.join("config/default.toml"),
        "[sync]\nbatch_lines = 500\n[queue]\npoll_interval_ms = 50\nheartbeat_interval_seconds = 1\n\
         missed_heartbeats = 2\nfile_lease_seconds = 3\nshutdown_grace_seconds = 1\n\
         [ops]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let key = dir.join("jobs/demo.pem");
    fhir_sync::smart::write_private_key(&key, &env.key_pem, true).unwrap();
    let mut job = format!(
        "[fhir]\nbase_url = \"{}\"\n[auth]\nclient_id = \"fhir-sync-demo\"\nprivate_key_file = \"demo.pem\"\n\
         [export]\ntypes = [\"Patient\", \"Encounter\", \"Observation\", \"Condition\"]\npoll_min_interval_seconds = 0.01\n",
        env.fake.fhir_base_url()
    );
    if let Some(cron) = schedule {
        job.push_str(&format!(
            "[schedule]\ncron = \"{cron}\"\ntimezone = \"UTC\"\noverlap = \"skip\"\n"
        ));
    }
    std::fs::write(dir.join("jobs/demo.toml"), job).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_start_one_run_per_tick() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            retry_after_seconds: 0,
            polls_before_ready: 1,
            ..FakeOptions::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Every two seconds: a per-second nightly job, in effect.
    write_setup(&env, dir.path(), Some("*/2 * * * * *"));
    let a = Serve::start(dir.path(), &env.db.url(), "a");
    let b = Serve::start(dir.path(), &env.db.url(), "b");
    let pool = env.db.pool.clone();
    eventually(Duration::from_secs(60), "three scheduled runs to succeed", || {
        let pool = pool.clone();
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM fhir_sync.run WHERE trigger = 'schedule' AND status = 'succeeded'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (done >= 3).then_some(())
        }
    })
    .await;
    drop(a);
    drop(b);
    let runs: Vec<(time::OffsetDateTime, String)> = sqlx::query_as(
        "SELECT scheduled_for, status FROM fhir_sync.run WHERE trigger = 'schedule' ORDER BY scheduled_for",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    let mut ticks: Vec<_> = runs.iter().map(|r| r.0).collect();
    ticks.dedup();
    assert_eq!(ticks.len(), runs.len(), "one run per tick: {runs:?}");
    assert!(
        runs.iter()
            .all(|(t, _)| t.second() % 2 == 0 && t.nanosecond() == 0),
        "runs carry their tick: {runs:?}"
    );
    assert!(runs.iter().all(|(_, s)| {
        [
            "succeeded",
            "skipped",
            "queued",
            "kicking_off",
            "exporting",
            "loading",
            "completing",
            "failed",
        ]
        .contains(&s.as_str())
    }));
    let failed: Vec<_> = runs.iter().filter(|r| r.1 == "failed").collect();
    assert!(failed.is_empty(), "no run failed: {failed:?}");
}

/// Starts a run from the test (no workers here) of a data set big enough that loading takes a
/// while, and returns its id.
async fn queue_big_run(env: &TestEnv) -> i64 {
    let ctx = SyncContext::new(
        env.db.pool.clone(),
        sync_settings(),
        queue_settings(),
        Vec::new(),
    );
    sync::enqueue_run(&ctx, &env.job, Trigger::Manual, None, true)
        .await
        .unwrap()
        .unwrap()
}

/// Waits until some file of the run has committed part of its lines but not all of them.
async fn wait_mid_file(env: &TestEnv, run_id: i64) {
    let pool = env.db.pool.clone();
    eventually(Duration::from_secs(120), "a file to be half loaded", || {
        let pool = pool.clone();
        async move {
            let mid: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM fhir_sync.run_file WHERE run_id = $1 AND status = 'loading' AND lines_committed > 0",
            )
            .bind(run_id)
            .fetch_one(&pool)
            .await
            .unwrap();
            (mid > 0).then_some(())
        }
    })
    .await;
}

async fn assert_exact_rows(env: &TestEnv, run_id: i64) {
    let end = tokio::time::timeout(
        Duration::from_secs(180),
        sync::wait_for_run(&env.db.pool, run_id),
    )
    .await
    .expect("the run ends")
    .unwrap();
    assert_eq!(end.status, "succeeded", "{:?}", end.error);
    let dataset = env.fake.dataset();
    let per_type: Vec<(String, i64)> = sqlx::query_as(
        "SELECT resource_type, count(*) FROM fhir_sync.resource GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    for (resource_type, count) in &per_type {
        assert_eq!(
            *count as usize,
            dataset.count(resource_type),
            "{resource_type}"
        );
    }
    assert_eq!(per_type.len(), 4);
    // Every line counted once across both processes: the checkpoints never double-committed.
    let (loaded, rejected): (i64, i64) = sqlx::query_as(
        "SELECT sum(resources_loaded)::bigint, sum(lines_rejected)::bigint FROM fhir_sync.run_file WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!((loaded as usize, rejected), (dataset.total(), 0));
}

fn big_env_options() -> FakeOptions {
    FakeOptions {
        retry_after_seconds: 0,
        polls_before_ready: 1,
        resources_per_file: 12_000,
        ..FakeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_file_is_finished_by_another_process() {
    let env = TestEnv::new(2_000, big_env_options()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    let run_id = queue_big_run(&env).await;
    let a = Serve::start(dir.path(), &env.db.url(), "a");
    wait_mid_file(&env, run_id).await;
    a.signal("KILL");
    drop(a);
    let b = Serve::start(dir.path(), &env.db.url(), "b");
    assert_exact_rows(&env, run_id).await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_process_s_run_completes_after_a_restart() {
    let env = TestEnv::new(2_000, big_env_options()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    let run_id = queue_big_run(&env).await;
    let mut a = Serve::start(dir.path(), &env.db.url(), "a");
    wait_mid_file(&env, run_id).await;
    a.signal("TERM");
    assert!(a.wait(), "serve exits cleanly on SIGTERM:\n{}", a.log());
    assert!(a.log().contains("stopping"), "{}", a.log());
    // The stopped process handed its files back: the next one need not wait out a lease.
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_sync.run_file WHERE run_id = $1 AND lease_owner IS NOT NULL",
    )
    .bind(run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(held, 0, "a stopped process holds no file lease");
    let b = Serve::start(dir.path(), &env.db.url(), "b");
    assert_exact_rows(&env, run_id).await;
    drop(b);
}
