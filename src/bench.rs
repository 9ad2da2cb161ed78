//! `fhir-sync bench`: the loader's throughput against the two `psql` baselines, on this machine.
//!
//! One run generates a deterministic synthetic data set (Observation-heavy, 0.5–2 KB per
//! resource), serves it from the fake FHIR server on loopback, runs a full sync end to end into a
//! database the bench creates (and drops at the end), and on the same NDJSON measures (a) `psql`
//! COPY into a bare `jsonb` table and (b) `psql` COPY into a staging table plus one
//! `INSERT ... ON CONFLICT` into the same keyed schema. It then repeats the three for an
//! incremental export in which a tenth of the resources changed. With `--single-file-mb` it
//! instead loads one Observation file of that size, the memory target's case.
//!
//! The fake server (and the data generation it does while serving) runs in a child process,
//! `fhir-sync bench-fake-server`, so that this process is only fhir-sync and its peak RSS
//! (`VmHWM`, reset before each sync) is fhir-sync's alone. It is a measurement, not a test: it
//! asserts nothing about speed and never runs in CI. It must not touch any database but its own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use jsonwebtoken::jwk::JwkSet;
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgPool};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use url::Url;

use crate::config::SyncSettings;
use crate::fake::{Dataset, FakeFhirServer, FakeOptions, Faults, RESOURCE_TYPES};
use crate::smart::{self, SigningAlgorithm, SigningKey};
use crate::sync::{self, SyncContext};
use crate::{demo, localpg};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Synthetic patients; each brings 17 more resources, 12 of them Observations.
    pub patients: usize,
    pub seed: u64,
    /// At most this many resources per NDJSON file the fake serves.
    pub resources_per_file: usize,
    /// One resource in this many changes for the incremental run (10 = 10%).
    pub changed_every: usize,
    /// Where to keep a PostgreSQL cluster if the bench has to start one.
    pub state_dir: PathBuf,
    /// Sync settings (batch size, parallel downloads) for the measured syncs.
    pub sync: SyncSettings,
    pub queue: crate::queue::QueueSettings,
    /// Serve every file with `Content-Encoding: gzip`.
    pub gzip: bool,
    /// Instead of the full and incremental comparison, load one Observation file of about this
    /// many megabytes (10^6 bytes) and report fhir-sync's peak RSS while loading it.
    pub single_file_mb: Option<u64>,
    /// Instead of the comparison, sync this many one-line files (one Patient each) and report
    /// the cost per file: the queue and bookkeeping work a file costs whatever its size.
    pub files: Option<usize>,
    /// The `fhir-sync` executable that serves the fake server (this one, normally).
    pub exe: PathBuf,
    /// Also measure the analytics views of this folder and schema: their full build after the
    /// full sync, and their incremental refresh after the incremental run against a rebuild.
    pub views: Option<crate::config::ViewsSettings>,
}

/// One measured load.
#[derive(Debug, Clone, Copy)]
struct Measurement {
    resources: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.resources as f64 / self.elapsed.as_secs_f64()
    }
    fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1_000_000.0 / self.elapsed.as_secs_f64()
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(options: &BenchOptions) -> anyhow::Result<()> {
    let local = localpg::find_or_start(&options.state_dir.join("pg")).await?;
    let name = format!("fhir_sync_bench_{}", uuid::Uuid::new_v4().simple());
    let database_url = localpg::ensure_database(&local.admin_url, &name).await?;
    let result = measure(options, &database_url).await;
    // The database is dropped whatever happened; the report (or the error) comes after.
    let dropped = drop_database(&local.admin_url, &name).await;
    if let Some(started) = &local.started {
        println!(
            "\nPostgreSQL was started by the bench in {} (port {}); stop it with: {}",
            started.data_dir.display(),
            started.port,
            started.stop_command
        );
    }
    result?;
    dropped
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let admin = PgConnectOptions::from_str(admin_url).context("the admin URL is invalid")?;
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .context("cannot connect to drop the bench database")?;
    // `name` is generated above from a UUID, never from input, so formatting it is safe.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .with_context(|| format!("cannot drop the bench database {name}"))?;
    Ok(())
}

async fn measure(options: &BenchOptions, database_url: &str) -> anyhow::Result<()> {
    let pool = crate::warehouse::pool_options()
        .max_connections(options.sync.max_parallel_downloads as u32 + 4)
        .connect_with(crate::warehouse::quiet_slow_statements(
            PgConnectOptions::from_str(database_url)?,
        ))
        .await
        .context("cannot connect to the bench database")?;
    crate::app::prepare_database(&pool).await?;
    println!(
        "sync.batch_lines = {}, sync.max_parallel_downloads = {}, files {}",
        options.sync.batch_lines,
        options.sync.max_parallel_downloads,
        if options.gzip {
            "gzip-encoded"
        } else {
            "not encoded"
        }
    );
    let result = match (options.files, options.single_file_mb) {
        (Some(files), _) => measure_many_files(options, &pool, files).await,
        (None, Some(megabytes)) => measure_single_file(options, &pool, megabytes).await,
        (None, None) => measure_full_and_incremental(options, &pool, database_url).await,
    };
    pool.close().await;
    result
}

/// The memory target's case: one NDJSON file of Observations, `megabytes` large, loaded into an
/// empty warehouse.
async fn measure_single_file(
    options: &BenchOptions,
    pool: &PgPool,
    megabytes: u64,
) -> anyhow::Result<()> {
    let observation_bytes = mean_observation_bytes(options.seed);
    let patients = patients_for_bytes(megabytes * 1_000_000, observation_bytes);
    let dataset = Dataset::new(options.seed, patients);
    let observations = dataset.count("Observation");
    println!(
        "\nsingle file: {observations} Observations in one file of about {megabytes} MB \
         ({observation_bytes:.0} bytes per Observation on average), {}",
        if options.gzip {
            "gzip-encoded"
        } else {
            "not encoded"
        }
    );
    let key_pem = smart::generate(SigningAlgorithm::RS384)?;
    let key = SigningKey::from_pem(&key_pem, SigningAlgorithm::RS384, None, "the bench key")?;
    let spec = FakeSpec {
        seed: options.seed,
        patients,
        changed_every: None,
        resources_per_file: observations.max(1),
        gzip: options.gzip,
    };
    let (sync, rss) =
        sync_from_fake(options, pool, &spec, &["Observation"], &key, &key_pem).await?;
    check_rows(pool, observations as i64).await?;
    println!(
        "  {:<48} {:>8} {:>12} {:>7}",
        "", "seconds", "resources/s", "MB/s"
    );
    print_line("fhir-sync, end to end (HTTP → warehouse)", &sync);
    println!(
        "  {:.1} MB of NDJSON (decoded); peak RSS of fhir-sync: {rss} (target: under 128 MB)",
        sync.bytes as f64 / 1e6,
    );
    Ok(())
}

/// The many-small-files case: `files` Patient files of one line each, so that the time is the
/// per-file cost of a run (queueing, leases, slots, bookkeeping), which must stay linear.
async fn measure_many_files(
    options: &BenchOptions,
    pool: &PgPool,
    files: usize,
) -> anyhow::Result<()> {
    println!(
        "
many files: {files} files of one Patient line each"
    );
    let key_pem = smart::generate(SigningAlgorithm::RS384)?;
    let key = SigningKey::from_pem(&key_pem, SigningAlgorithm::RS384, None, "the bench key")?;
    let spec = FakeSpec {
        seed: options.seed,
        patients: files,
        changed_every: None,
        resources_per_file: 1,
        gzip: options.gzip,
    };
    let (sync, _) = sync_from_fake(options, pool, &spec, &["Patient"], &key, &key_pem).await?;
    check_rows(pool, files as i64).await?;
    let seconds = sync.elapsed.as_secs_f64();
    println!(
        "  {files} files in {seconds:.1} s end to end: {:.1} ms per file",
        seconds * 1000.0 / files.max(1) as f64
    );
    Ok(())
}

/// The mean size of an Observation line of the data set with `seed`, from a sample.
fn mean_observation_bytes(seed: u64) -> f64 {
    // Line sizes depend on the random draws, not on the number of patients (beyond the digits
    // of the ids), so a sample from a mid-sized data set stands for any size.
    let sample = Dataset::new(seed, 1000);
    let lines = 2000;
    let step = sample.count("Observation") / lines;
    let total: usize = (0..lines)
        .map(|i| sample.ndjson_line("Observation", i * step).len() + 1)
        .sum();
    total as f64 / lines as f64
}

/// Patients whose Observations fill about `bytes` of NDJSON at `observation_bytes` per line
/// (each patient has 12 Observations); at least one.
fn patients_for_bytes(bytes: u64, observation_bytes: f64) -> usize {
    let per_patient = 12.0 * observation_bytes.max(1.0);
    ((bytes as f64 / per_patient).round() as usize).max(1)
}

/// The comparison with the `psql` baselines: a full sync, then an incremental one.
async fn measure_full_and_incremental(
    options: &BenchOptions,
    pool: &PgPool,
    database_url: &str,
) -> anyhow::Result<()> {
    let psql = find_psql()?;
    sqlx::raw_sql(BASELINE_SCHEMA).execute(pool).await?;

    let dataset = Dataset::new(options.seed, options.patients);
    let changed = dataset.changed(options.changed_every);
    let dir = TempDir::new()?;
    println!(
        "generating {} resources ({} changed for the incremental run) ...",
        dataset.total(),
        changed.total()
    );
    let generating = Instant::now();
    let full_file = dir.path().join("full.ndjson");
    let changed_file = dir.path().join("changed.ndjson");
    let full_bytes = write_ndjson(&dataset, &full_file)?;
    let changed_bytes = write_ndjson(&changed, &changed_file)?;
    println!(
        "  full: {} resources, {:.1} MB ({:.0} bytes per resource on average); changed: {} resources, {:.1} MB; \
         generated in {:.1} s (the fake server's process spends that CPU time again while serving, on the same cores)",
        dataset.total(),
        full_bytes as f64 / 1e6,
        full_bytes as f64 / dataset.total().max(1) as f64,
        changed.total(),
        changed_bytes as f64 / 1e6,
        generating.elapsed().as_secs_f64()
    );

    let key_pem = smart::generate(SigningAlgorithm::RS384)?;
    let key = SigningKey::from_pem(&key_pem, SigningAlgorithm::RS384, None, "the bench key")?;

    let spec = FakeSpec {
        seed: options.seed,
        patients: options.patients,
        changed_every: None,
        resources_per_file: options.resources_per_file,
        gzip: options.gzip,
    };

    println!("\nfull sync of {} resources", dataset.total());
    let full_sync = sync_from_fake(options, pool, &spec, &RESOURCE_TYPES, &key, &key_pem).await?;
    check_rows(pool, dataset.total() as i64).await?;
    let full_a = psql_timed(
        &psql,
        database_url,
        &copy_bare(&full_file),
        dataset.total(),
        full_bytes,
    )?;
    let full_b = psql_timed(
        &psql,
        database_url,
        &copy_and_upsert(&full_file),
        dataset.total(),
        full_bytes,
    )?;
    report(&full_sync, &full_a, &full_b);
    let views = match &options.views {
        Some(v) => Some(crate::views::ViewSet::load(&v.dir, &v.schema)?),
        None => None,
    };
    if let Some(views) = &views {
        bench_views_full(pool, views).await?;
    }

    println!(
        "\nincremental sync: {} of {} resources changed",
        changed.total(),
        dataset.total()
    );
    sqlx::raw_sql("TRUNCATE bench.bare").execute(pool).await?;
    let changed_spec = FakeSpec {
        changed_every: Some(options.changed_every),
        ..spec
    };
    let inc_sync = sync_from_fake(
        options,
        pool,
        &changed_spec,
        &RESOURCE_TYPES,
        &key,
        &key_pem,
    )
    .await?;
    check_rows(pool, dataset.total() as i64).await?;
    let changed_now: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_sync.resource WHERE source = 'bench' AND last_updated >= '2026-01-01'",
    )
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        changed_now == changed.total() as i64,
        "after the incremental sync {changed_now} rows hold a changed version, expected {}",
        changed.total()
    );
    let inc_a = psql_timed(
        &psql,
        database_url,
        &copy_bare(&changed_file),
        changed.total(),
        changed_bytes,
    )?;
    let inc_b = psql_timed(
        &psql,
        database_url,
        &copy_and_upsert(&changed_file),
        changed.total(),
        changed_bytes,
    )?;
    report(&inc_sync, &inc_a, &inc_b);
    if let Some(views) = &views {
        bench_views_incremental(pool, views).await?;
    }
    Ok(())
}

/// The full build of every view over what the full sync loaded, in rows per second.
async fn bench_views_full(pool: &PgPool, views: &crate::views::ViewSet) -> anyhow::Result<()> {
    use crate::views::materialise::{self, Applied, ApplyOptions};
    println!(
        "\nanalytics views: full build of {} views",
        views.views.len()
    );
    let options = ApplyOptions {
        rebuild: true,
        prune: false,
    };
    for view in &views.views {
        let one = crate::views::ViewSet {
            schema: views.schema.clone(),
            views: vec![view.clone()],
        };
        let started = Instant::now();
        let applied = materialise::apply(pool, &one, options).await?;
        let seconds = started.elapsed().as_secs_f64();
        let rows = match &applied[0].1 {
            Applied::Created { rows } | Applied::Rebuilt { rows } => *rows,
            other => anyhow::bail!("view {}: {other:?}", view.name),
        };
        println!(
            "  {:<16} {rows:>9} rows in {seconds:>6.2} s  {:>9.0} rows/s",
            view.name,
            rows as f64 / seconds.max(1e-9)
        );
    }
    Ok(())
}

/// The incremental refresh of every view after the incremental run, against a full rebuild
/// of the same views over the same data.
async fn bench_views_incremental(
    pool: &PgPool,
    views: &crate::views::ViewSet,
) -> anyhow::Result<()> {
    use crate::views::materialise::{self, ApplyOptions};
    use crate::views::refresh::{self, Outcome};
    let run_id: i64 = sqlx::query_scalar("SELECT max(id) FROM fhir_sync.run")
        .fetch_one(pool)
        .await?;
    let started = Instant::now();
    let report = refresh::refresh_for_run(pool, views, run_id).await?;
    let incremental = started.elapsed().as_secs_f64();
    let mut replaced = 0;
    for v in &report.views {
        match &v.outcome {
            Outcome::Applied { inserted, .. } => replaced += inserted,
            other => anyhow::bail!("view {}: {other:?}", v.name),
        }
    }
    let started = Instant::now();
    materialise::apply(
        pool,
        views,
        ApplyOptions {
            rebuild: true,
            prune: false,
        },
    )
    .await?;
    let rebuild = started.elapsed().as_secs_f64();
    println!(
        "\nanalytics views after run {run_id}: incremental refresh {incremental:.2} s ({replaced} rows replaced), \
         full rebuild {rebuild:.2} s: the refresh takes {:.2}x the rebuild (target at most 0.2x)",
        incremental / rebuild.max(1e-9)
    );
    Ok(())
}

/// A directory for the NDJSON files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let path =
            std::env::temp_dir().join(format!("fhir-sync-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The baselines' tables, in schema `bench` of the bench database. `bench.resource` has the
/// warehouse's key and columns, unpartitioned.
const BASELINE_SCHEMA: &str = "CREATE SCHEMA bench;
CREATE TABLE bench.bare (resource jsonb);
CREATE TABLE bench.resource (
    source text NOT NULL, resource_type text NOT NULL, id text NOT NULL, version_id text,
    last_updated timestamptz, patient_id text, resource jsonb, first_run_id bigint NOT NULL,
    last_run_id bigint NOT NULL, deleted_at timestamptz, deleted_by_run_id bigint,
    PRIMARY KEY (source, resource_type, id)
);";

const CSV_OPTIONS: &str = "with (format csv, delimiter E'\\x02', quote E'\\x01')";

/// Baseline (a): the physical limit, COPY of the raw lines into a table without a key.
fn copy_bare(file: &Path) -> String {
    format!(
        "\\copy bench.bare (resource) from '{}' {CSV_OPTIONS}\n",
        file.display()
    )
}

/// Baseline (b): the naive keyed load, COPY into staging and one newer-wins upsert.
fn copy_and_upsert(file: &Path) -> String {
    format!(
        "CREATE TEMP TABLE staging (resource jsonb);
\\copy staging (resource) from '{}' {CSV_OPTIONS}
INSERT INTO bench.resource AS r (source, resource_type, id, version_id, last_updated, resource, first_run_id, last_run_id)
SELECT 'bench', resource->>'resourceType', resource->>'id', resource#>>'{{meta,versionId}}',
       (resource#>>'{{meta,lastUpdated}}')::timestamptz, resource, 1, 1
FROM staging
ON CONFLICT (source, resource_type, id) DO UPDATE SET version_id = EXCLUDED.version_id,
    last_updated = EXCLUDED.last_updated, resource = EXCLUDED.resource, last_run_id = EXCLUDED.last_run_id
WHERE EXCLUDED.last_updated >= r.last_updated;
",
        file.display()
    )
}

/// Writes every resource of the data set as NDJSON, type by type in the fake's order, and
/// returns the bytes written.
fn write_ndjson(dataset: &Dataset, path: &Path) -> anyhow::Result<u64> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut bytes = 0u64;
    for resource_type in RESOURCE_TYPES {
        for index in 0..dataset.count(resource_type) {
            let line = dataset.ndjson_line(resource_type, index);
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            bytes += line.len() as u64 + 1;
        }
    }
    out.flush()?;
    Ok(bytes)
}

/// Serves `spec` from a fake server in a child process and syncs `types` from it into the
/// warehouse as job `bench`, returning the end-to-end time and the peak RSS of this process (so
/// of fhir-sync alone) during the sync.
async fn sync_from_fake(
    options: &BenchOptions,
    pool: &PgPool,
    spec: &FakeSpec,
    types: &[&str],
    key: &SigningKey,
    key_pem: &SecretString,
) -> anyhow::Result<(Measurement, Rss)> {
    let server = FakeProcess::spawn(&options.exe, spec, &key.public_jwks()).await?;
    let mut job = demo::fake_job(server.base_url().clone(), key_pem.clone());
    job.name = "bench".into();
    job.export.types = types.iter().map(|t| t.to_string()).collect();
    job.export.poll_min_interval_seconds = 0.001;
    let ctx = SyncContext::new(
        pool.clone(),
        options.sync.clone(),
        options.queue.clone(),
        Vec::new(),
    );
    checkpoint(pool).await;
    reset_peak_rss();
    let at_start = rss_bytes("VmRSS");
    let started = Instant::now();
    // Both measured runs are full exports: the incremental one serves a data set in which every
    // n-th resource changed, and measures the merge of those changes.
    let run = sync::run_job(&ctx, &job, sync::RunOptions { full: true }).await;
    let elapsed = started.elapsed();
    let peak = rss_bytes("VmHWM");
    server.stop().await?;
    let run = run?;
    Ok((
        Measurement {
            resources: run.resources_loaded() as u64,
            bytes: run.bytes,
            elapsed,
        },
        Rss { at_start, peak },
    ))
}

/// What the fake server child serves: a data set (or its changed generation) in files of at
/// most `resources_per_file` resources, optionally gzip-encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSpec {
    pub seed: u64,
    pub patients: usize,
    /// `Some(n)`: the changed generation of the data set, every n-th resource in a newer version.
    pub changed_every: Option<usize>,
    pub resources_per_file: usize,
    pub gzip: bool,
}

impl FakeSpec {
    fn dataset(&self) -> Dataset {
        let dataset = Dataset::new(self.seed, self.patients);
        match self.changed_every {
            Some(every) => dataset.changed(every),
            None => dataset,
        }
    }

    /// The arguments of `fhir-sync bench-fake-server` that serve this.
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "bench-fake-server".to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--patients".into(),
            self.patients.to_string(),
            "--resources-per-file".into(),
            self.resources_per_file.to_string(),
        ];
        if let Some(every) = self.changed_every {
            args.extend(["--changed-every".into(), every.to_string()]);
        }
        if self.gzip {
            args.push("--gzip".into());
        }
        args
    }
}

/// `fhir-sync bench-fake-server`, the child side of [`FakeProcess`]: reads the client's public
/// JWKS as one line of JSON from stdin, serves `spec` from a fake FHIR server on loopback,
/// prints its FHIR base URL as one line on stdout, and stops when stdin closes (the bench is
/// done with it, or died).
pub async fn serve_fake(spec: &FakeSpec) -> anyhow::Result<()> {
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .await
        .context("cannot read the client's JWKS from stdin")?;
    let jwks: JwkSet =
        serde_json::from_str(&line).context("the first line of stdin is not a JWK set")?;
    let server = FakeFhirServer::start(
        spec.dataset(),
        FakeOptions {
            polls_before_ready: 1,
            retry_after_seconds: 0,
            resources_per_file: spec.resources_per_file,
            faults: Faults {
                gzip: spec.gzip,
                ..Faults::default()
            },
            ..FakeOptions::default()
        },
    )
    .await
    .context("cannot start the fake FHIR server")?;
    server.register_client(demo::CLIENT_ID, jwks);
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("{}\n", server.fhir_base_url()).as_bytes())
        .await?;
    stdout.flush().await?;
    // Whatever else arrives on stdin is ignored; its end is the signal to stop.
    let _ = tokio::io::copy(&mut stdin, &mut tokio::io::sink()).await;
    server.shutdown().await;
    Ok(())
}

/// How long the child may take to start serving.
const FAKE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the child may take to stop once told to; it is killed after that.
const FAKE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A fake FHIR server in a child process (`fhir-sync bench-fake-server`), killed if dropped.
pub struct FakeProcess {
    child: tokio::process::Child,
    /// Held open while the server should run; closing it stops the child.
    stdin: Option<tokio::process::ChildStdin>,
    base_url: Url,
}

impl FakeProcess {
    /// Starts `exe bench-fake-server` serving `spec`, registers `jwks` as the demo client's
    /// keys, and waits until it listens.
    pub async fn spawn(exe: &Path, spec: &FakeSpec, jwks: &JwkSet) -> anyhow::Result<FakeProcess> {
        let mut child = tokio::process::Command::new(exe)
            .args(spec.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} bench-fake-server", exe.display()))?;
        let mut stdin = child.stdin.take().context("the fake server has no stdin")?;
        let stdout = child
            .stdout
            .take()
            .context("the fake server has no stdout")?;
        let mut jwks = serde_json::to_string(jwks)?;
        jwks.push('\n');
        stdin.write_all(jwks.as_bytes()).await?;
        stdin.flush().await?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(FAKE_START_TIMEOUT, lines.next_line())
            .await
            .context("the fake server did not say where it listens in time")??
            .context("the fake server exited before saying where it listens")?;
        let base_url = Url::parse(line.trim())
            .with_context(|| format!("the fake server printed {line:?}, not its URL"))?;
        Ok(FakeProcess {
            child,
            stdin: Some(stdin),
            base_url,
        })
    }

    /// The fake server's FHIR base URL.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// Closes the child's stdin and waits for it to exit; kills it if it does not in time.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(FAKE_STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                anyhow::ensure!(status.success(), "the fake server exited with {status}");
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                anyhow::bail!("the fake server did not stop in time and was killed")
            }
        }
    }
}

async fn check_rows(pool: &PgPool, expected: i64) -> anyhow::Result<()> {
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource WHERE source = 'bench'")
            .fetch_one(pool)
            .await?;
    anyhow::ensure!(
        rows == expected,
        "the warehouse holds {rows} rows, expected {expected}"
    );
    Ok(())
}

/// Flushes dirty buffers before a measurement so that one load does not pay for the last one's
/// writes. Needs superuser rights; without them the measurements are only noisier.
async fn checkpoint(pool: &PgPool) {
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(pool).await {
        tracing::debug!(error = %e, "CHECKPOINT before a measurement failed");
    }
}

/// Runs a psql script against the bench database and times it.
fn psql_timed(
    psql: &Path,
    database_url: &str,
    script: &str,
    resources: usize,
    bytes: u64,
) -> anyhow::Result<Measurement> {
    // A CHECKPOINT first, as before the sync, outside the timed part.
    run_psql(psql, database_url, "CHECKPOINT;\n").ok();
    let started = Instant::now();
    run_psql(psql, database_url, script)?;
    Ok(Measurement {
        resources: resources as u64,
        bytes,
        elapsed: started.elapsed(),
    })
}

fn run_psql(psql: &Path, database_url: &str, script: &str) -> anyhow::Result<()> {
    let mut child = std::process::Command::new(psql)
        .arg("--no-psqlrc")
        .arg("--quiet")
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-d")
        .arg(database_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", psql.display()))?;
    child
        .stdin
        .take()
        .context("psql has no stdin")?
        .write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// `psql` from PATH, else from the highest version under /usr/lib/postgresql (Debian).
fn find_psql() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("psql");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let psql = entry.path().join("bin/psql");
            psql.is_file().then_some((version, psql))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, path)| path).context(
        "psql not found on PATH or under /usr/lib/postgresql; install the PostgreSQL client",
    )
}

/// Resets the kernel's peak-RSS counter of this process (Linux: `5` into clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's resident set size now (`VmRSS`) or at its peak since the last reset
/// (`VmHWM`), if the platform says.
fn rss_bytes(field: &str) -> Option<u64> {
    status_bytes(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_bytes(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The resident set of fhir-sync during one sync.
#[derive(Debug, Clone, Copy)]
struct Rss {
    /// When the sync started (the process, its runtime and its connections, no data).
    at_start: Option<u64>,
    peak: Option<u64>,
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |bytes: Option<u64>| {
            bytes.map_or("unknown".to_string(), |b| {
                format!("{:.1} MB", b as f64 / 1e6)
            })
        };
        write!(
            f,
            "{} ({} when the sync started)",
            mb(self.peak),
            mb(self.at_start)
        )
    }
}

fn print_line(name: &str, m: &Measurement) {
    println!(
        "  {:<48} {:>8.2} {:>12.0} {:>7.1}",
        name,
        m.elapsed.as_secs_f64(),
        m.per_second(),
        m.mb_per_second(),
    );
}

fn report(sync: &(Measurement, Rss), a: &Measurement, b: &Measurement) {
    let (sync, rss) = sync;
    println!(
        "  {:<48} {:>8} {:>12} {:>7}",
        "", "seconds", "resources/s", "MB/s"
    );
    print_line("fhir-sync, end to end (HTTP → warehouse)", sync);
    print_line("(a) psql COPY into a bare jsonb table", a);
    print_line("(b) psql COPY into staging + INSERT ON CONFLICT", b);
    println!(
        "  fhir-sync / (a): {:.2}x   fhir-sync / (b): {:.2}x   peak RSS of fhir-sync: {rss}",
        sync.per_second() / a.per_second(),
        sync.per_second() / b.per_second(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_fields_are_read_from_proc_status() {
        let status =
            "Name:\tfhir-sync\nVmPeak:\t  900000 kB\nVmHWM:\t   45312 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(status_bytes(status, "VmHWM"), Some(45312 * 1024));
        assert_eq!(status_bytes(status, "VmRSS"), Some(40000 * 1024));
        assert_eq!(status_bytes("VmRSS:\t 1 kB\n", "VmHWM"), None);
        assert_eq!(status_bytes("VmHWM:\t lots\n", "VmHWM"), None);
        assert_eq!(status_bytes("VmHWMX:\t 1 kB\n", "VmHWM"), None);
    }

    #[test]
    fn single_file_size_picks_the_patients() {
        // 12 Observations of 1000 bytes per patient: 1 GB is 83,333 patients.
        assert_eq!(patients_for_bytes(1_000_000_000, 1000.0), 83_333);
        assert_eq!(patients_for_bytes(1, 1000.0), 1);
        let mean = mean_observation_bytes(42);
        assert!((500.0..=2000.0).contains(&mean), "{mean}");
    }

    #[test]
    fn fake_spec_round_trips_through_the_child_arguments() {
        let spec = FakeSpec {
            seed: 7,
            patients: 3,
            changed_every: Some(10),
            resources_per_file: 50,
            gzip: true,
        };
        assert_eq!(
            spec.args().join(" "),
            "bench-fake-server --seed 7 --patients 3 --resources-per-file 50 --changed-every 10 --gzip"
        );
        let plain = FakeSpec {
            changed_every: None,
            gzip: false,
            ..spec.clone()
        };
        assert_eq!(
            plain.args().join(" "),
            "bench-fake-server --seed 7 --patients 3 --resources-per-file 50"
        );
        assert_eq!(
            spec.dataset().total(),
            Dataset::new(7, 3).changed(10).total()
        );
        assert_eq!(plain.dataset().total(), Dataset::new(7, 3).total());
    }
}
