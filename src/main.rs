//! The `fhir-sync` command line: parses arguments and dispatches to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhir_sync::config::Settings;
use fhir_sync::smart::SigningAlgorithm;
use fhir_sync::{app, bench, demo, ops};

#[derive(Parser)]
#[command(
    name = "fhir-sync",
    version,
    about = "Keep a PostgreSQL warehouse in sync with EHR FHIR servers (Bulk Data $export)"
)]
struct Cli {
    /// Directory with default.toml and {FHIR_SYNC_ENV}.toml.
    #[arg(
        long,
        global = true,
        default_value = "config",
        env = "FHIR_SYNC_CONFIG_DIR"
    )]
    config_dir: PathBuf,
    /// Directory of job files (overrides sync.jobs_dir).
    #[arg(long, global = true)]
    jobs_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a real sync against the embedded fake FHIR server into a local PostgreSQL.
    Demo {
        /// Synthetic patients (each brings 17 more resources).
        #[arg(long, default_value_t = 200)]
        patients: usize,
        /// Seed of the synthetic data set.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to keep a PostgreSQL cluster if the demo has to start one.
        #[arg(long, default_value = ".demo")]
        state_dir: PathBuf,
        /// The database to load into (created if missing).
        #[arg(long, default_value = demo::DATABASE)]
        database: String,
        /// Stay up until Ctrl-C: the fake EHR and `serve` (scheduler, workers, status page),
        /// with the job in jobs/demo.toml and its key in --key.
        #[arg(long)]
        serve: bool,
        /// The demo's private key for --serve (generated when missing).
        #[arg(long, default_value = "keys/demo.pem", requires = "serve")]
        key: PathBuf,
        /// Sync from a fake playing this vendor (epic, oracle, veradigm, athenahealth, bcda,
        /// ab2d), with a job file that names the vendor and leaves the rest to its profile.
        #[arg(long, conflicts_with = "serve")]
        vendor: Option<fhir_sync::vendor::Vendor>,
    },
    /// Serve the demo's fake FHIR server on its own until SIGTERM, for a client with this key
    /// (the EHR of compose.yaml).
    FakeEhr {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// Scheme, host and port clients reach it at, when not the listen address (e.g.
        /// http://fake-ehr:8090 in a compose network).
        #[arg(long)]
        origin: Option<url::Url>,
        /// The client's private key (the public half is registered as client fhir-sync-demo).
        #[arg(long)]
        client_key: PathBuf,
        /// Synthetic patients (each brings 17 more resources).
        #[arg(long, default_value_t = 200)]
        patients: usize,
        /// Seed of the synthetic data set.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Measure a full and an incremental sync against the psql COPY baselines (see docs/benchmark.md).
    Bench {
        /// Synthetic patients (each brings 17 more resources, 12 of them Observations).
        #[arg(long, default_value_t = 20_000)]
        patients: usize,
        /// Seed of the synthetic data set.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Most resources per NDJSON file the fake server serves.
        #[arg(long, default_value_t = 50_000)]
        resources_per_file: usize,
        /// One resource in this many changes for the incremental run.
        #[arg(long, default_value_t = 10)]
        changed_every: usize,
        /// Where to keep a PostgreSQL cluster if the bench has to start one.
        #[arg(long, default_value = ".bench")]
        state_dir: PathBuf,
        /// Serve the files gzip-encoded (Content-Encoding: gzip).
        #[arg(long)]
        gzip: bool,
        /// Instead of the comparison, load one Observation file of about this many MB and report
        /// the peak RSS (the memory target's case).
        #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u64).range(1..))]
        single_file_mb: Option<u64>,
        /// Instead of the comparison, sync N one-line files and report the cost per file.
        #[arg(long, value_name = "N", conflicts_with = "single_file_mb")]
        files: Option<usize>,
        /// Also measure the analytics views (views.dir): full build, and incremental refresh
        /// after the incremental run against a full rebuild.
        #[arg(long)]
        views: bool,
    },
    /// The bench's fake FHIR server, run as a child process of `bench` (internal).
    #[command(hide = true)]
    BenchFakeServer {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        patients: usize,
        #[arg(long)]
        resources_per_file: usize,
        /// Serve the changed generation of the data set (every n-th resource, newer).
        #[arg(long)]
        changed_every: Option<usize>,
        #[arg(long)]
        gzip: bool,
    },
    /// Run one sync of a job now, in the foreground (incremental from the last successful run).
    Run {
        /// Job name: the file stem of jobs/<name>.toml.
        job: String,
        /// Ignore the watermark and export everything.
        #[arg(long)]
        full: bool,
    },
    /// Run the scheduler and queue workers until SIGTERM (several processes may share a database).
    Serve,
    /// Create or update the database schema.
    Migrate,
    /// Manage client keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Validate configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Check a job's connection: discovery, algorithms, token, scopes, export support and one
    /// authorised request, with a fix for each failure.
    Check {
        /// Job name: the file stem of jobs/<name>.toml.
        job: String,
    },
    /// Show every job (schedule, next run, last run and success, watermark) and recent runs.
    Status {
        /// Only this job and its runs.
        #[arg(long)]
        job: Option<String>,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON ({"jobs": [...], "runs": [...]}) instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Look at runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Cancel a run's export on the FHIR server (DELETE its status URL).
    Cancel {
        /// The run id, as `fhir-sync status` shows it.
        run: i64,
    },
    /// Analytics views: SQL-on-FHIR v2 ViewDefinitions (views.dir) as tables (views.schema).
    Views {
        #[command(subcommand)]
        command: ViewsCommand,
    },
}

#[derive(Subcommand)]
enum ViewsCommand {
    /// Every view file, its table and its state (status, rows, last run applied).
    List,
    /// Print a view's table definition and compiled query.
    Sql {
        /// The view's name (its `name` element).
        name: String,
    },
    /// Create missing view tables and rebuild those whose definition changed.
    Apply {
        /// Rebuild every view, changed or not.
        #[arg(long)]
        rebuild: bool,
        /// Drop the tables of views whose file is gone.
        #[arg(long)]
        prune: bool,
    },
    /// Run the official SQL-on-FHIR v2 test files in DIR through PostgreSQL (a scratch
    /// database on the configured server, dropped afterwards).
    Test {
        dir: PathBuf,
        /// Write the results as the official test_report.json here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new private key and print the public JWKS to register with the EHR.
    Generate {
        /// RS384 or ES384.
        #[arg(long, default_value = "RS384", value_parser = parse_algorithm)]
        alg: SigningAlgorithm,
        /// Where to write the private key (PEM, mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Key id to publish (default: the key's RFC 7638 thumbprint).
        #[arg(long)]
        kid: Option<String>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public JWKS of every key of a job (the active one and auth.keys).
    Jwks {
        /// Job name: the file stem of jobs/<name>.toml.
        job: String,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// One run in detail: state, timings, files, the server's export issues, rejected lines.
    Show {
        /// The run id, as `fhir-sync status` shows it.
        id: i64,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Recent runs, newest first (the runs part of `status`).
    List {
        /// Only this job's runs.
        #[arg(long)]
        job: Option<String>,
        /// Only runs in this status (queued, loading, succeeded, failed, ...).
        #[arg(long)]
        status: Option<String>,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check config/ and every job file; report every problem with its file and field.
    Check,
}

fn parse_algorithm(s: &str) -> Result<SigningAlgorithm, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            return match app::config_check(&cli.config_dir, cli.jobs_dir.as_deref()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => report(e),
            };
        }
        Command::Keys {
            command:
                KeysCommand::Generate {
                    alg,
                    out,
                    kid,
                    force,
                },
        } => {
            return match app::keys_generate(*alg, out, kid.clone(), *force) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(e),
            };
        }
        Command::Keys {
            command: KeysCommand::Jwks { job },
        } => {
            let dir = match cli.jobs_dir.clone() {
                Some(dir) => dir,
                None => match Settings::load(&cli.config_dir) {
                    Ok(settings) => settings.sync.jobs_dir,
                    Err(e) => return report(e.into()),
                },
            };
            return match app::keys_jwks(&dir, job) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(e),
            };
        }
        _ => {}
    }
    let settings = match Settings::load(&cli.config_dir) {
        Ok(settings) => settings,
        Err(e) => return report(e.into()),
    };
    ops::init_logging(&settings.logging);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return report(e.into()),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo {
                patients,
                seed,
                state_dir,
                database,
                serve,
                key,
                vendor,
            } => {
                let serve = serve.then(|| demo::ServeOptions {
                    jobs_dir: cli
                        .jobs_dir
                        .clone()
                        .unwrap_or_else(|| settings.sync.jobs_dir.clone()),
                    key_file: key,
                });
                demo::run(
                    &settings,
                    &demo::DemoOptions {
                        patients,
                        seed,
                        state_dir,
                        database,
                        serve,
                        vendor,
                    },
                )
                .await
            }
            Command::FakeEhr {
                listen,
                origin,
                client_key,
                patients,
                seed,
            } => demo::serve_fake_ehr(listen, origin, &client_key, patients, seed).await,
            Command::Bench {
                patients,
                seed,
                resources_per_file,
                changed_every,
                state_dir,
                gzip,
                single_file_mb,
                files,
                views,
            } => {
                bench::run(&bench::BenchOptions {
                    patients,
                    seed,
                    resources_per_file,
                    changed_every,
                    state_dir,
                    sync: settings.sync.clone(),
                    queue: settings.queue.clone(),
                    gzip,
                    single_file_mb,
                    files,
                    exe: std::env::current_exe()?,
                    views: views.then(|| settings.views.clone()),
                })
                .await
            }
            Command::BenchFakeServer {
                seed,
                patients,
                resources_per_file,
                changed_every,
                gzip,
            } => {
                bench::serve_fake(&bench::FakeSpec {
                    seed,
                    patients,
                    changed_every,
                    resources_per_file,
                    gzip,
                })
                .await
            }
            Command::Run { job, full } => {
                app::run(&settings, cli.jobs_dir.as_deref(), &job, full).await
            }
            Command::Migrate => app::migrate(&settings).await,
            Command::Serve => app::serve(&settings, cli.jobs_dir.as_deref()).await,
            Command::Check { job } => {
                match app::check(&settings, cli.jobs_dir.as_deref(), &job).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(anyhow::anyhow!("job {job}: some checks failed")),
                    Err(e) => Err(e),
                }
            }
            Command::Status { job, limit, json } => {
                app::status(
                    &settings,
                    cli.jobs_dir.as_deref(),
                    job.as_deref(),
                    limit,
                    json,
                )
                .await
            }
            Command::Runs {
                command: RunsCommand::Show { id, json },
            } => app::runs_show(&settings, id, json).await,
            Command::Runs {
                command:
                    RunsCommand::List {
                        job,
                        status,
                        limit,
                        json,
                    },
            } => app::runs_list(&settings, job, status.as_deref(), limit, json).await,
            Command::Cancel { run } => app::cancel(&settings, cli.jobs_dir.as_deref(), run).await,
            Command::Views { command } => match command {
                ViewsCommand::List => app::views_list(&settings).await,
                ViewsCommand::Sql { name } => app::views_sql(&settings, &name),
                ViewsCommand::Apply { rebuild, prune } => {
                    app::views_apply(&settings, rebuild, prune).await
                }
                ViewsCommand::Test { dir, report } => {
                    app::views_test(&settings, &dir, report.as_deref()).await
                }
            },
            Command::Keys { .. } | Command::Config { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e),
    }
}

/// Prints the error and its causes, one per line, and returns the failure exit code.
fn report(error: anyhow::Error) -> ExitCode {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::FAILURE
}
