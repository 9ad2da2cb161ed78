//! Test harness: a throwaway database per test and a ready-to-run sync environment.

use std::sync::Arc;

use std::str::FromStr;

use fhir_sync::config::{JobConfig, SyncSettings};
use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions};
use fhir_sync::queue::QueueSettings;
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunFailed, RunOptions, RunReport, SyncContext, Trigger};
use fhir_sync::warehouse::runs;
use fhir_sync::warehouse::{FileKind, FileTarget};
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database created for one test and dropped (with its connections) when the value drops.
// The database name is generated here from a UUID, never from input, so formatting it into
// DDL (which cannot take bind parameters) is safe.
pub struct TestDb {
    pub pool: PgPool,
    name: String,
}

impl TestDb {
    /// A URL to this database, for child processes.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
        url.set_path(&self.name);
        url.to_string()
    }
}

impl TestDb {
    pub async fn new() -> TestDb {
        let db = TestDb::unmigrated().await;
        fhir_sync::app::prepare_database(&db.pool).await.unwrap();
        db
    }

    /// A fresh database without any migration applied (for migration tests).
    pub async fn unmigrated() -> TestDb {
        TestDb::create("").await
    }

    /// A migrated database in SQL_ASCII, whose jsonb refuses `\u` escapes beyond ASCII that
    /// every check before COPY accepts (for the tests of what still breaks a COPY batch).
    pub async fn sql_ascii() -> TestDb {
        let db =
            TestDb::create(" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                .await;
        fhir_sync::app::prepare_database(&db.pool).await.unwrap();
        db
    }

    /// `options` is appended to CREATE DATABASE; it is one of the constants above, never input.
    async fn create(options: &str) -> TestDb {
        let name = format!("fhir_sync_test_{}", uuid::Uuid::new_v4().simple());
        let admin =
            PgConnectOptions::from_str(&admin_url()).expect("DATABASE_URL is not a valid URL");
        let mut conn = sqlx::PgConnection::connect_with(&admin)
            .await
            .expect("cannot reach PostgreSQL: set DATABASE_URL or run scripts/test.sh");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name}{options}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        let pool = fhir_sync::warehouse::pool_options()
            .max_connections(8)
            .connect_with(admin.database(&name))
            .await
            .unwrap();
        TestDb { pool, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any async context we can rely on, so the cleanup gets a runtime of
        // its own on a fresh thread and is waited for.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let admin = PgConnectOptions::from_str(&admin_url()).unwrap();
                if let Ok(mut conn) = sqlx::PgConnection::connect_with(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Queue settings for tests: quick pick-up of delayed steps and quick takeover of dead workers.
pub fn queue_settings() -> QueueSettings {
    QueueSettings {
        poll_interval_ms: 50,
        heartbeat_interval_seconds: 1,
        missed_heartbeats: 2,
        file_lease_seconds: 3,
        ..QueueSettings::default()
    }
}

/// Sync settings for tests: small batches so that files span several transactions.
pub fn sync_settings() -> SyncSettings {
    SyncSettings {
        batch_lines: 500,
        // Retries of queue steps and requests wait milliseconds, not seconds.
        retry_base_delay_ms: 20,
        ..SyncSettings::default()
    }
}

/// A database, a fake FHIR server with a registered client, and the job that syncs from it.
pub struct TestEnv {
    pub db: TestDb,
    pub fake: FakeFhirServer,
    pub key_pem: SecretString,
    pub job: JobConfig,
}

impl TestEnv {
    pub async fn new(patients: usize, options: FakeOptions) -> TestEnv {
        let db = TestDb::new().await;
        let fake = FakeFhirServer::start(Dataset::new(7, patients), options)
            .await
            .unwrap();
        let key_pem = smart::generate(SigningAlgorithm::RS384).unwrap();
        let key =
            SigningKey::from_pem(&key_pem, SigningAlgorithm::RS384, None, "test key").unwrap();
        fake.register_client("fhir-sync-demo", key.public_jwks());
        let mut job = fhir_sync::demo::demo_job(&fake, key_pem.clone());
        job.export.poll_min_interval_seconds = 0.001;
        TestEnv {
            db,
            fake,
            key_pem,
            job,
        }
    }

    /// Fake server options that never make the client wait.
    pub fn fast() -> FakeOptions {
        FakeOptions {
            retry_after_seconds: 0,
            polls_before_ready: 2,
            resources_per_file: 250,
            ..FakeOptions::default()
        }
    }

    pub fn ctx(&self) -> Arc<SyncContext> {
        self.ctx_with(sync_settings())
    }

    /// A runtime context with these sync settings.
    pub fn ctx_with(&self, settings: SyncSettings) -> Arc<SyncContext> {
        SyncContext::new(self.db.pool.clone(), settings, queue_settings(), Vec::new())
    }

    /// A full export (ignoring the watermark), through the queue, to its end.
    pub async fn run(&self) -> Result<RunReport, RunFailed> {
        sync::run_job(&self.ctx(), &self.job, RunOptions { full: true }).await
    }

    /// An incremental export from the job's watermark, through the queue, to its end.
    pub async fn run_incremental(&self) -> Result<RunReport, RunFailed> {
        sync::run_job(&self.ctx(), &self.job, RunOptions { full: false }).await
    }
}

impl TestDb {
    /// Connection options for this database, to build a pool of another shape.
    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.url()).expect("a test database URL is valid")
    }
}

/// Collects everything a tracing subscriber writes, for tests that read the logs.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    /// Captures this thread's log lines at `level` and above, without ANSI codes, until the
    /// guard drops. Tests that read logs run on a current-thread runtime, so the fake server,
    /// the client and their tasks all log on this thread.
    pub fn start(level: tracing::Level) -> (Captured, CaptureGuard) {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(captured.clone())
            .finish();
        (captured, capture_with(subscriber))
    }
}

/// This thread's log subscriber while it lives (see [`capture_with`]).
pub struct CaptureGuard {
    // Dropped in this order: the thread's default first, then the second dispatcher.
    _default: tracing::subscriber::DefaultGuard,
    _second: tracing::Dispatch,
}

/// Makes `subscriber` this thread's until the guard drops.
///
/// With a single live dispatcher, tracing caches a callsite's interest from whichever thread
/// hits it first: another test's thread would cache "never" and this test would miss those
/// events. A second live dispatcher makes tracing ask every dispatcher each time, and the
/// rebuild clears what was cached before this test started.
pub fn capture_with(subscriber: impl tracing::Subscriber + Send + Sync + 'static) -> CaptureGuard {
    let second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let default = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    CaptureGuard {
        _default: default,
        _second: second,
    }
}

/// A run with registered files, made the way a run makes them (created, kicked off, exporting,
/// its manifest registered), for tests that drive the loader or the read model directly.
/// `files` holds (kind, resource type, manifest count) per manifest entry; returns the run id
/// and each file's loader target, in manifest order.
pub async fn run_with_files(
    pool: &PgPool,
    job: &str,
    transaction_time: &str,
    files: &[(FileKind, &str, Option<u64>)],
) -> (i64, Vec<FileTarget>) {
    let base = "https://ehr.example.org/fhir";
    // A job has one active run at a time: an earlier fixture run of the job ends first.
    if let Some(earlier) = runs::unfinished_run(pool, job).await.unwrap() {
        runs::cancel(pool, earlier).await.unwrap();
    }
    let run_id = runs::create(pool, job, base, Trigger::Manual, None, true)
        .await
        .unwrap()
        .expect("a manual run is always created");
    assert!(runs::start_kick_off(pool, run_id, None).await.unwrap());
    let status_url = format!("{base}/bulkstatus/{run_id}");
    assert!(
        runs::exporting(pool, run_id, base, &status_url)
            .await
            .unwrap()
    );
    let urls: Vec<url::Url> = (0..files.len())
        .map(|i| {
            url::Url::parse(&format!(
                "https://ehr.example.org/files/{run_id}/{i}.ndjson"
            ))
            .unwrap()
        })
        .collect();
    let new_files: Vec<runs::NewFile<'_>> = files
        .iter()
        .zip(&urls)
        .map(|(&(kind, resource_type, count), url)| runs::NewFile {
            kind,
            resource_type,
            url,
            count,
        })
        .collect();
    let rows = runs::manifest_ready(pool, run_id, transaction_time, true, &new_files)
        .await
        .unwrap()
        .expect("the run was exporting");
    let targets = rows
        .iter()
        .map(|row| FileTarget {
            run_id,
            file_id: row.id,
            source: job.to_string(),
            kind: row.kind,
            resource_type: row
                .kind
                .line_type()
                .map_or_else(|| row.resource_type.clone(), str::to_string),
        })
        .collect();
    (run_id, targets)
}

/// Polls `check` until it returns `Some`, failing the test after `limit`. For conditions only
/// another process can make true and that have no notification of their own.
pub async fn eventually<T, F, Fut>(limit: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// How long a run may go without any sign of progress before [`until_run_ends`] calls it
/// stranded. Generous: on a machine whose cores are busy a single step can take many seconds;
/// a run that is stuck never moves again.
pub const STRANDED_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits for a spawned run (`run_job` in a task) to end, for as long as it makes progress: its
/// status, its files' checkpoints and statuses, and its queue steps. A run whose record and
/// steps stay unchanged for [`STRANDED_AFTER`] is stranded: the test fails with what the run,
/// its files and its steps looked like, instead of with a bare timeout. A slow machine makes a
/// run slower, never stuck.
pub async fn until_run_ends<T>(
    pool: &PgPool,
    run_id: i64,
    mut run: tokio::task::JoinHandle<T>,
) -> T {
    let mut last: Option<String> = None;
    let mut unchanged_since = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(2), &mut run).await {
            Ok(ended) => return ended.expect("the run task does not panic"),
            Err(_) => {
                // A read that fails (the database is away) is no progress, nor a verdict.
                let Ok(now) = run_fingerprint(pool, run_id).await else {
                    continue;
                };
                if last.as_deref() != Some(now.as_str()) {
                    last = Some(now);
                    unchanged_since = tokio::time::Instant::now();
                }
                assert!(
                    unchanged_since.elapsed() < STRANDED_AFTER,
                    "run {run_id} is stranded: nothing moved for {STRANDED_AFTER:?}:\n{}",
                    last.unwrap_or_default()
                );
            }
        }
    }
}

/// The run row, its files and its queue steps, as text: equal texts, no progress.
async fn run_fingerprint(pool: &PgPool, run_id: i64) -> sqlx::Result<String> {
    let run: Option<(String, Option<String>, i64)> =
        sqlx::query_as("SELECT status, error, retries FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_optional(pool)
            .await?;
    let files: Vec<(i64, String, i64, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, status, lines_committed, attempts, lease_owner FROM fhir_sync.run_file
         WHERE run_id = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    let steps: Vec<(String, String, i32, Option<String>)> = sqlx::query_as(
        "SELECT status, convert_from(job, 'UTF8'), attempts, lock_by FROM apalis.jobs
         WHERE convert_from(job, 'UTF8') ~ ('\"run_id\": ?' || $1 || '[,}]')
         ORDER BY run_at, id",
    )
    .bind(run_id.to_string())
    .fetch_all(pool)
    .await?;
    Ok(format!(
        "run: {run:?}\nfiles: {files:#?}\nsteps: {steps:#?}"
    ))
}

/// The ops server publishing `jwks` at `/.well-known/jwks.json` on a free loopback port, as
/// `serve` does, until [`JwksServer::stop`].
pub struct JwksServer {
    pub addr: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(pool: &PgPool, jwks: jsonwebtoken::jwk::JwkSet) -> JwksServer {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (addr, server) = fhir_sync::ops::http::serve(
            "127.0.0.1:0".parse().unwrap(),
            fhir_sync::ops::http::router(fhir_sync::ops::http::OpsState {
                steps: SyncContext::new(
                    pool.clone(),
                    Default::default(),
                    Default::default(),
                    Vec::new(),
                ),
                settings: Arc::new(Default::default()),
                jwks: Arc::new(jwks),
            }),
            shutdown.clone(),
        )
        .await
        .unwrap();
        JwksServer {
            addr,
            shutdown,
            server,
        }
    }

    /// Where the keys are published.
    pub fn url(&self) -> url::Url {
        url::Url::parse(&format!("http://{}/.well-known/jwks.json", self.addr)).unwrap()
    }

    /// Stops the server and waits for it to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap();
    }
}
