//! The commands the `fhir-sync` binary dispatches to, one function each.
//!
//! Each takes already-parsed arguments, does its work through the library, and returns an
//! error for `main` to report; none of them parses the command line or exits the process.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::config::{self, Settings};
use crate::ops::{console, report};
use crate::smart::{self, SigningAlgorithm, SigningKey};
use crate::sync::{self, SyncContext};
use crate::views::{ViewError, ViewSet};
use crate::warehouse;
use crate::warehouse::runs::RunStatus;

/// Opens the pool described by `settings`. A database that does not exist is one line that
/// says `fhir-sync migrate` creates it.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    connect_pool(settings).await.map_err(|e| {
        if is_missing_database(&e) {
            anyhow::anyhow!("{e}: the database does not exist; `fhir-sync migrate` creates it")
        } else {
            e
        }
    })
}

async fn connect_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let url = settings.database_url()?;
    let options = warehouse::quiet_slow_statements(
        PgConnectOptions::from_str(url.expose_secret())
            .context("database.url is not a valid PostgreSQL URL")?,
    );
    let host = options.get_host().to_string();
    let database = options.get_database().unwrap_or("postgres").to_string();
    warehouse::pool_options()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(
            settings.database.connect_timeout_seconds,
        ))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL database {database:?} on {host}"))
}

/// Applies fhir-sync's migrations and the job queue's schema. Idempotent.
pub async fn prepare_database(pool: &PgPool) -> anyhow::Result<()> {
    warehouse::migrate(pool)
        .await
        .context("applying migrations failed")?;
    crate::queue::setup(pool)
        .await
        .context("setting up the job queue schema failed")?;
    Ok(())
}

/// `fhir-sync migrate`: creates the database when it does not exist and the role may create
/// databases, then applies the schema.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = match connect_pool(settings).await {
        Err(e) if is_missing_database(&e) => {
            create_database(settings).await?;
            connect(settings).await?
        }
        result => result?,
    };
    prepare_database(&pool).await?;
    println!("database schema is up to date");
    Ok(())
}

/// Whether a failed connection failed because the database does not exist (SQLSTATE 3D000,
/// invalid_catalog_name).
fn is_missing_database(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000")
        )
    })
}

/// Creates the database `database.url` names, connected to the server's `postgres`
/// maintenance database as the same role. When the role may not (no CREATEDB, or the
/// maintenance database is closed to it), the error is one line that names the URL and the
/// `createdb` command an administrator runs instead; sqlx's text would only repeat itself.
async fn create_database(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database_url()?;
    let options = PgConnectOptions::from_str(url.expose_secret())
        .context("database.url is not a valid PostgreSQL URL")?;
    let name = options.get_database().unwrap_or("postgres").to_string();
    let (host, port, user) = (
        options.get_host().to_string(),
        options.get_port(),
        options.get_username().to_string(),
    );
    // The URL without its password, to name in the message.
    let shown = format!("postgres://{user}@{host}:{port}/{name}");
    let cannot = |why: &str| {
        anyhow::anyhow!(
            "database {name:?} does not exist at {shown} and {why}; ask an administrator to run \
             `createdb -h {host} -p {port} -O {user} {name}`, then `fhir-sync migrate` again"
        )
    };
    let mut conn = match <sqlx::PgConnection as sqlx::Connection>::connect_with(
        &options.clone().database("postgres"),
    )
    .await
    {
        Ok(conn) => conn,
        Err(_) => {
            return Err(cannot(&format!(
                "role {user:?} cannot reach the server's postgres database to create it"
            )));
        }
    };
    // The name comes from the operator's own URL; quoted as an identifier it cannot end the
    // statement.
    let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(create))
        .execute(&mut conn)
        .await;
    let _ = sqlx::Connection::close(conn).await;
    match result {
        Ok(_) => {
            println!("created database {name:?} at {shown}");
            Ok(())
        }
        // Another process created it meanwhile: what was asked for is there.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {
            Ok(())
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            Err(cannot(&format!("role {user:?} may not create databases")))
        }
        Err(e) => Err(cannot(&format!("creating it failed: {e}"))),
    }
}

fn jobs_dir(settings: &Settings, override_dir: Option<&Path>) -> PathBuf {
    override_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| settings.sync.jobs_dir.clone())
}

/// `fhir-sync run <job>`: queues a run now and works on it in the foreground until it ends.
/// Incremental from the job's watermark unless `full`.
pub async fn run(
    settings: &Settings,
    jobs_dir_override: Option<&Path>,
    job_name: &str,
    full: bool,
) -> anyhow::Result<()> {
    let job = find_job(&jobs_dir(settings, jobs_dir_override), job_name)?
        .with_alert_defaults(&settings.alerts);
    let pool = connect(settings).await?;
    prepare_database(&pool).await?;
    let ctx = SyncContext::new(
        pool,
        settings.sync.clone(),
        settings.queue.clone(),
        vec![job.clone()],
    )
    .with_views(std::sync::Arc::new(load_views(settings)?));
    // Bars only for a person watching; a log file or a pipe gets the plain log lines.
    let show_progress = std::io::stderr().is_terminal();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut progress = None;
    let result = sync::run_job_with(&ctx, &job, sync::RunOptions { full }, |run_id| {
        if show_progress {
            progress = Some(tokio::spawn(crate::ops::progress::watch(
                ctx.pool.clone(),
                run_id,
                indicatif::ProgressDrawTarget::stderr(),
                stop.clone(),
            )));
        }
    })
    .await;
    stop.cancel();
    if let Some(progress) = progress {
        // The bars are gone before the report is printed.
        let _ = progress.await;
    }
    // The failure alert of this run, from this process (a serving process's sweep would send
    // it too, once: whichever claims it first). A partial run alerts like a failed one.
    let alert_for = match &result {
        Err(sync::RunFailed {
            run_id: Some(run_id),
            ..
        }) => Some(*run_id),
        Ok(report) if report.status == crate::warehouse::runs::RunStatus::Partial => {
            Some(report.run_id)
        }
        _ => None,
    };
    if let Some(run_id) = alert_for
        && let Err(e) = crate::ops::alert::notify_run_failed(&ctx, run_id).await
    {
        tracing::warn!(error = %e, "cannot send the run failure alert");
    }
    crate::ops::alert::flush(crate::ops::alert::FLUSH_LIMIT).await;
    let report = result?;
    print_report(&job.name, &report);
    // A partial run printed what it loaded; the exit status still tells a script it is not
    // complete.
    match report.warning {
        Some(warning) => anyhow::bail!(
            "run {} of job {} ended partial: {warning}",
            report.run_id,
            job.name
        ),
        None => Ok(()),
    }
}

/// `fhir-sync serve`: the scheduler and the queue workers, until SIGTERM or Ctrl-C. Several
/// processes may serve one database; each tick still starts exactly one run.
pub async fn serve(settings: &Settings, jobs_dir_override: Option<&Path>) -> anyhow::Result<()> {
    serve_until_stopped(settings, jobs_dir_override, |_| {}).await
}

/// `serve`, calling `ready` with the ops server's bound address (when it runs) once the
/// scheduler and the ops server are up: what `demo --serve` prints its URLs from.
pub async fn serve_until_stopped(
    settings: &Settings,
    jobs_dir_override: Option<&Path>,
    ready: impl FnOnce(Option<std::net::SocketAddr>),
) -> anyhow::Result<()> {
    crate::ops::metrics::install();
    let dir = jobs_dir(settings, jobs_dir_override);
    let jobs = config::load_jobs(&dir)?;
    let jobs = jobs
        .into_iter()
        .map(|j| j.with_alert_defaults(&settings.alerts))
        .collect();
    let pool = connect(settings).await?;
    prepare_database(&pool).await?;
    // Bad view files stop start-up here, naming file and element, before any run starts.
    let views = load_views(settings)?;
    let ctx = SyncContext::new(pool, settings.sync.clone(), settings.queue.clone(), jobs)
        .with_views(std::sync::Arc::new(views));
    tracing::info!(worker = %ctx.owner, jobs = ctx.jobs().len(), views = ctx.views().views.len(), "serving");

    // Work a previous process left half-done goes back on the queue before anything new.
    let lease = Duration::from_secs(settings.queue.file_lease_seconds);
    let resumed = crate::sync::steps::resume_stranded(&ctx, lease * 2).await?;
    if resumed > 0 {
        tracing::info!(steps = resumed, "resumed stranded runs");
    }
    sync::delete_abandoned_exports_at_start_up(&settings.sync, &ctx.pool, &ctx.jobs()).await;
    let now = time::OffsetDateTime::now_utc();
    for job in ctx.jobs() {
        if let Err(e) = crate::schedule::catch_up(&ctx, &job, now).await {
            tracing::error!(job.name = %job.name, error = %sync::error_chain(&e), "catch-up failed");
        }
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ops = if settings.ops.enabled {
        let jwks = crate::ops::http::jwks_of(&ctx.jobs())
            .map_err(|e| anyhow::anyhow!("cannot publish the JWKS: {e}"))?;
        let state = crate::ops::http::OpsState {
            steps: ctx.clone(),
            settings: Arc::new(settings.clone()),
            jwks: Arc::new(jwks),
        };
        Some(
            crate::ops::http::serve(
                settings.ops.listen,
                crate::ops::http::router(state),
                shutdown.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let mut scheduler = crate::schedule::start(ctx.clone()).await?;
    ready(ops.as_ref().map(|(addr, _)| *addr));
    let ops = ops.map(|(_, task)| task);

    let retention = {
        let queue = ctx.queue.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = hourly.tick() => match queue.purge().await {
                        Ok(0) => {}
                        Ok(purged) => tracing::info!(tasks = purged, "purged finished queue tasks"),
                        Err(e) => tracing::warn!(error = %e, "queue retention failed"),
                    },
                }
            }
        })
    };
    let alerts = crate::ops::alert::spawn_alerting(ctx.clone(), shutdown.clone());
    let grace = Duration::from_secs(settings.queue.shutdown_grace_seconds);
    let workers = tokio::spawn(crate::sync::steps::run_workers(
        ctx.clone(),
        shutdown.clone(),
        grace,
    ));

    wait_for_stop_signal().await;
    tracing::info!(
        grace_s = grace.as_secs(),
        "stopping: no new work is taken; running steps may finish"
    );
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "scheduler did not stop cleanly");
    }
    shutdown.cancel();
    let _ = retention.await;
    let _ = alerts.await;
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    match tokio::time::timeout(grace + Duration::from_secs(5), workers).await {
        Ok(Ok(Ok(()))) => tracing::info!("stopped"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "workers stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "workers panicked"),
        Err(_) => tracing::warn!(
            "workers did not stop within the grace period; their work resumes elsewhere"
        ),
    }
    Ok(())
}

/// Returns on SIGTERM or Ctrl-C (SIGINT).
pub async fn wait_for_stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Prints a run's result for a person.
pub fn print_report(job: &str, report: &sync::RunReport) {
    println!(
        "job {job}: run {} loaded {} resources from {} files ({:.1} MB) in {:.1} s",
        report.run_id,
        report.resources_loaded(),
        report.output_files,
        report.bytes as f64 / 1_000_000.0,
        report.elapsed.as_secs_f64()
    );
    println!(
        "  {:<22} {:>6} {:>10} {:>9}",
        "resource type", "files", "loaded", "rejected"
    );
    for t in &report.types {
        println!(
            "  {:<22} {:>6} {:>10} {:>9}",
            t.resource_type, t.files, t.resources_loaded, t.lines_rejected
        );
    }
    println!(
        "  {:<22} {:>6} {:>10} {:>9}",
        "total",
        report.output_files,
        report.resources_loaded(),
        report.lines_rejected()
    );
    if report.error_files > 0 {
        println!(
            "  the server reported {} export errors in {} error files (fhir_sync.export_error)",
            report.export_errors, report.error_files
        );
    }
    println!(
        "  export transactionTime: {} (exported since: {})",
        report.transaction_time,
        report.since.as_deref().unwrap_or("the beginning")
    );
    if let Some(warning) = &report.warning {
        println!("  the run ended {}: {warning}", report.status);
    }
}

/// Writes a command's output to stdout and flushes it. A reader that has gone away (`| head`)
/// is not an error: it read what it wanted, and the command has nothing left to say.
fn write_stdout(
    write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}

/// `fhir-sync keys generate`: writes a new private key (mode 0600) and prints its public JWKS.
pub fn keys_generate(
    algorithm: SigningAlgorithm,
    out: &Path,
    kid: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    let pem = smart::generate(algorithm)?;
    let key = SigningKey::from_pem(&pem, algorithm, kid, &out.display().to_string())?;
    smart::write_private_key(out, &pem, force).with_context(|| {
        format!(
            "cannot write {} (use --force to overwrite an existing file)",
            out.display()
        )
    })?;
    eprintln!(
        "wrote the {algorithm} private key to {} (mode 0600); keep it secret",
        out.display()
    );
    eprintln!(
        "register this public JWKS with the EHR (kid {}):",
        key.kid()
    );
    let jwks = serde_json::to_string_pretty(&key.public_jwks())?;
    write_stdout(|out| writeln!(out, "{jwks}"))
}

/// `fhir-sync config check`: validates settings and every job file, reporting all problems.
pub fn config_check(config_dir: &Path, jobs_dir_override: Option<&Path>) -> anyhow::Result<bool> {
    let mut problems = Vec::new();
    let settings = match Settings::load(config_dir) {
        Ok(settings) => Some(settings),
        Err(e) => {
            problems.extend(e.problems);
            None
        }
    };
    let dir = jobs_dir(
        settings.as_ref().unwrap_or(&Settings::default()),
        jobs_dir_override,
    );
    let jobs = match config::load_jobs(&dir) {
        Ok(jobs) => jobs,
        Err(e) => {
            problems.extend(e.problems);
            Vec::new()
        }
    };
    let defaults = Settings::default();
    let views_settings = &settings.as_ref().unwrap_or(&defaults).views;
    let (views, view_problems) = match ViewSet::load(&views_settings.dir, &views_settings.schema) {
        Ok(views) => (views.views, Vec::new()),
        Err(ViewError::Invalid(p)) => (Vec::new(), p),
        Err(e) => (Vec::new(), vec![format!("{e:#}")]),
    };
    // Warnings do not make the configuration invalid: a job may override its vendor's profile.
    let warnings: Vec<config::Problem> = jobs
        .iter()
        .flat_map(config::vendor_warnings)
        .chain(config::concurrency_warnings(&jobs))
        .collect();
    for warning in &warnings {
        println!("warning: {warning}");
    }
    if problems.is_empty() && view_problems.is_empty() {
        println!("configuration in {} is valid", config_dir.display());
        for job in &jobs {
            let schedule = job
                .schedule
                .as_ref()
                .map_or("no schedule".to_string(), |s| {
                    format!("{} ({})", s.cron, s.timezone)
                });
            println!(
                "  job {}: {} types from {} ({}, {} level), {schedule}",
                job.name,
                job.export.types.len(),
                job.fhir.base_url,
                job.fhir.vendor,
                match job.export.level {
                    config::ExportLevel::System => "system",
                    config::ExportLevel::Patient => "patient",
                    config::ExportLevel::Group => "group",
                }
            );
        }
        for view in &views {
            println!(
                "  view {}: {} columns over {} ({})",
                view.name,
                view.compiled.columns.len(),
                view.compiled.resource,
                view.file.display()
            );
        }
        Ok(true)
    } else {
        if !problems.is_empty() {
            println!("{}", config::ConfigError { problems });
        }
        for problem in view_problems {
            println!("{problem}");
        }
        Ok(false)
    }
}

/// `fhir-sync status`: every configured job (schedule, next run, last run and success,
/// watermark, active run), then the most recent runs; `--job` narrows both to one job.
pub async fn status(
    settings: &Settings,
    jobs_dir_override: Option<&Path>,
    job: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    // A broken job file must not hide the run history from whoever is on call: say so and
    // show the runs.
    let dir = jobs_dir(settings, jobs_dir_override);
    let (configured, jobs_readable) = match config::load_jobs(&dir) {
        Ok(jobs) => (jobs, true),
        Err(e) => {
            eprintln!("warning: jobs are not shown: {e}");
            (Vec::new(), false)
        }
    };
    let configured: Vec<Arc<config::JobConfig>> = configured
        .into_iter()
        .filter(|j| job.is_none_or(|name| j.name == name))
        .map(Arc::new)
        .collect();
    let pool = connect(settings).await?;
    let now = time::OffsetDateTime::now_utc();
    let jobs = report::jobs(&pool, &configured, now)
        .await
        .context(HISTORY_UNREADABLE)?;
    let runs = report::runs(
        &pool,
        &report::RunFilter {
            job: job.map(str::to_string),
            status: None,
            limit,
        },
    )
    .await
    .context(HISTORY_UNREADABLE)?;
    // `--job` naming no configured job: a typo, or a job whose file was removed but whose
    // runs are still recorded. Either way "no jobs configured" would be wrong.
    let unknown_job = job.filter(|_| jobs_readable && jobs.is_empty());
    if let Some(name) = unknown_job
        && runs.is_empty()
    {
        anyhow::bail!(
            "no job named {name:?}: {} does not exist and no run of it is recorded",
            dir.join(format!("{name}.toml")).display()
        );
    }
    let views = crate::views::materialise::states(&pool)
        .await
        .context(HISTORY_UNREADABLE)?;
    let status = console::StatusReport { jobs, runs, views };
    if json {
        let text = serde_json::to_string_pretty(&status)?;
        return write_stdout(|out| writeln!(out, "{text}"));
    }
    write_stdout(|out| match unknown_job {
        Some(name) => {
            writeln!(
                out,
                "job {name:?} is not configured ({} does not exist); its recorded runs:\n",
                dir.join(format!("{name}.toml")).display()
            )?;
            console::write_runs_table(out, &status.runs, now)
        }
        None => console::write_status(out, &status, now),
    })
}

const HISTORY_UNREADABLE: &str = "cannot read the run history (has `fhir-sync migrate` run?)";

/// `fhir-sync runs list`: the runs part of `status`, with a status filter.
pub async fn runs_list(
    settings: &Settings,
    job: Option<String>,
    status: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let status = status
        .map(|text| {
            text.parse::<RunStatus>().map_err(|_| {
                anyhow::anyhow!(
                    "--status {text:?} is not a run status; use one of {}",
                    RunStatus::spellings()
                )
            })
        })
        .transpose()?;
    let filter = report::RunFilter { job, status, limit };
    let pool = connect(settings).await?;
    let runs = report::runs(&pool, &filter)
        .await
        .context(HISTORY_UNREADABLE)?;
    if json {
        let text = serde_json::to_string_pretty(&runs)?;
        return write_stdout(|out| writeln!(out, "{text}"));
    }
    let now = time::OffsetDateTime::now_utc();
    write_stdout(|out| console::write_runs_table(out, &runs, now))
}

/// `fhir-sync runs show <id>`: one run with its files, export issues and rejected lines.
pub async fn runs_show(settings: &Settings, run_id: i64, json: bool) -> anyhow::Result<()> {
    let pool = connect(settings).await?;
    let Some(detail) = report::run_detail(&pool, run_id)
        .await
        .context(HISTORY_UNREADABLE)?
    else {
        anyhow::bail!("there is no run {run_id} (`fhir-sync status` lists the recent ones)");
    };
    if json {
        let text = serde_json::to_string_pretty(&detail)?;
        return write_stdout(|out| writeln!(out, "{text}"));
    }
    let now = time::OffsetDateTime::now_utc();
    write_stdout(|out| console::write_run_detail(out, &detail, now))
}

/// Loads `jobs/<name>.toml` from the jobs directory.
fn find_job(dir: &Path, job_name: &str) -> anyhow::Result<config::JobConfig> {
    let path = dir.join(format!("{job_name}.toml"));
    if !path.exists() {
        anyhow::bail!(
            "no job named {job_name:?}: {} does not exist",
            path.display()
        );
    }
    Ok(config::load_job(&path)?)
}

/// `fhir-sync keys jwks <job>`: prints the public JWK set of every key of the job (the active
/// one and those listed in `auth.keys`), to register with the EHR or host at the JWKS URL.
pub fn keys_jwks(jobs_dir: &Path, job_name: &str) -> anyhow::Result<()> {
    let job = find_job(jobs_dir, job_name)?;
    let keys = smart::job_keys(&job)?;
    let jwks = smart::publish_jwks(&keys).map_err(|e| anyhow::anyhow!("job {job_name}: {e}"))?;
    let jwks = serde_json::to_string_pretty(&jwks)?;
    write_stdout(|out| writeln!(out, "{jwks}"))
}

/// `fhir-sync check <job>`: runs the doctor and prints one line per check. Returns whether
/// nothing failed.
pub async fn check(
    settings: &Settings,
    jobs_dir_override: Option<&Path>,
    job_name: &str,
) -> anyhow::Result<bool> {
    let job = find_job(&jobs_dir(settings, jobs_dir_override), job_name)?;
    let http = crate::transport::client(crate::transport::HttpOptions {
        connect_timeout: Duration::from_secs(settings.sync.connect_timeout_seconds),
        read_timeout: Duration::from_secs(settings.sync.read_timeout_seconds),
        allow_insecure_http: job.fhir.allow_insecure_http,
    })?;
    println!("checking job {} against {}", job.name, job.fhir.base_url);
    let report = smart::doctor::run(&http, &job).await;
    let mut ok = true;
    for line in &report {
        ok &= line.verdict != smart::doctor::Verdict::Fail;
        println!("{} {:<20} {}", line.verdict.label(), line.name, line.detail);
        if let Some(fix) = &line.fix {
            println!("     {:<20} fix: {fix}", "");
        }
    }
    if ok {
        println!("all checks passed");
    }
    Ok(ok)
}

/// `fhir-sync cancel <run>`: stops the run and deletes its export on the FHIR server.
pub async fn cancel(
    settings: &Settings,
    jobs_dir_override: Option<&Path>,
    run_id: i64,
) -> anyhow::Result<()> {
    let jobs = config::load_jobs(&jobs_dir(settings, jobs_dir_override))?;
    let pool = connect(settings).await?;
    prepare_database(&pool).await?;
    let ctx = SyncContext::new(
        pool,
        settings.sync.clone(),
        settings.queue.clone(),
        Vec::new(),
    );
    // A run that had ended cannot be cancelled; its export is still deleted if it is left.
    let before = crate::warehouse::runs::status(&ctx.pool, run_id).await?;
    let outcome = sync::cancel_run(&ctx, &jobs, run_id)
        .await
        .map_err(|e| anyhow::anyhow!("cannot cancel run {run_id}: {}", sync::error_chain(&e)))?;
    match outcome {
        sync::CancelOutcome::Deleted => {
            println!("run {run_id}: the export was deleted on the server")
        }
        sync::CancelOutcome::AlreadyDeleted => {
            println!("run {run_id}: the export had already been deleted")
        }
        sync::CancelOutcome::NeverStarted => {
            println!("run {run_id}: no export was started, nothing to cancel")
        }
    }
    if let Some(status) = before.filter(|s| s.is_terminal()) {
        anyhow::bail!("run {run_id} had already ended ({status}); there was no run to cancel");
    }
    Ok(())
}

fn load_views(settings: &Settings) -> anyhow::Result<ViewSet> {
    ViewSet::load(&settings.views.dir, &settings.views.schema).with_context(|| {
        format!(
            "the views in {} are not valid",
            settings.views.dir.display()
        )
    })
}

/// `fhir-sync views list`: every view file, its table and its state in the database (when
/// the database is reachable).
pub async fn views_list(settings: &Settings) -> anyhow::Result<()> {
    let views = load_views(settings)?;
    let pool = connect(settings).await?;
    let states = crate::views::materialise::states(&pool).await?;
    println!(
        "{:<24} {:<20} {:>7} {:<9} {:>10} {:>9}  FILE",
        "VIEW", "RESOURCE", "COLUMNS", "STATUS", "ROWS", "LAST RUN"
    );
    for view in &views.views {
        let state = states.iter().find(|s| s.name == view.name);
        println!(
            "{:<24} {:<20} {:>7} {:<9} {:>10} {:>9}  {}",
            view.name,
            view.compiled.resource,
            view.compiled.columns.len(),
            state.map_or("absent", |s| s.status.as_str()),
            state.map_or("-".into(), |s| s.row_count.to_string()),
            state
                .and_then(|s| s.last_run_id)
                .map_or("-".into(), |r| r.to_string()),
            view.file.display()
        );
    }
    Ok(())
}

/// `fhir-sync views sql NAME`: the table's DDL and the compiled query.
pub fn views_sql(settings: &Settings, name: &str) -> anyhow::Result<()> {
    let views = load_views(settings)?;
    let view = views.get(name)?;
    println!(
        "{};\n\n{};",
        crate::views::materialise::create_table_sql(&views.schema, &view.name, view),
        view.compiled.query()
    );
    Ok(())
}

/// `fhir-sync views apply [--rebuild] [--prune]`.
pub async fn views_apply(settings: &Settings, rebuild: bool, prune: bool) -> anyhow::Result<()> {
    use crate::views::materialise::{self, Applied, ApplyOptions};
    let views = load_views(settings)?;
    let pool = connect(settings).await?;
    prepare_database(&pool).await?;
    let applied = materialise::apply(&pool, &views, ApplyOptions { rebuild, prune }).await?;
    let mut failed = 0;
    for (name, outcome) in &applied {
        let table = format!("{}.{name}", views.schema);
        match outcome {
            Applied::Created { rows } => println!("created {table} ({rows} rows)"),
            Applied::Rebuilt { rows } => println!("rebuilt {table} ({rows} rows)"),
            Applied::Unchanged => println!("unchanged {table}"),
            Applied::Pruned => println!("dropped {name} (its file is gone)"),
            Applied::Failed(reason) => {
                failed += 1;
                println!("failed {table}: {reason}");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} views could not be built");
    }
    Ok(())
}

/// `fhir-sync views test DIR [--report FILE]`: the official test files through PostgreSQL,
/// in a scratch database on the configured server.
pub async fn views_test(
    settings: &Settings,
    dir: &Path,
    report: Option<&Path>,
) -> anyhow::Result<()> {
    let url = settings.database_url()?;
    let result = crate::views::conformance::run_in_scratch_database(url.expose_secret(), dir)
        .await
        .context("running the view tests failed")?;
    for (file, cases) in &result.files {
        for case in cases.iter().filter(|c| !c.passed) {
            println!(
                "FAIL {file}: {}: {}",
                case.name,
                case.reason.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(path) = report {
        let text = serde_json::to_string_pretty(&result.to_json())?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {} failed", path.display()))?;
    }
    println!("{} passed, {} failed", result.passed(), result.failed());
    if result.failed() > 0 {
        anyhow::bail!("{} view tests failed", result.failed());
    }
    Ok(())
}
