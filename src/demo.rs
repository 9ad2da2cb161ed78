//! `fhir-sync demo`: a real sync, end to end, against the embedded fake FHIR server.
//!
//! Finds or starts PostgreSQL, generates a key pair and registers it with the fake server,
//! then runs the same code path as `fhir-sync run` and checks that what landed in the database
//! is exactly what the fake server generated.
//!
//! `demo --serve` then stays up until Ctrl-C: the fake server keeps answering, and `serve`
//! (scheduler, workers, ops server) runs a job written to `jobs/demo.toml` with its key in
//! `keys/demo.pem`, so every other command (`check`, `keys jwks`, `run`, `status`, `runs
//! show`) works on the demo from another terminal. It never overwrites a `jobs/demo.toml` it
//! did not write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use secrecy::SecretString;

use crate::config::{
    AuthConfig, ExportConfig, ExportLevel, FhirConfig, JobConfig, KeySource, Settings,
};
use crate::fake::{Dataset, FakeFhirServer, FakeOptions};
use crate::smart::{self, SigningAlgorithm, SigningKey};
use crate::sync::{self, SyncContext};
use crate::vendor::{self, Vendor};
use crate::{app, localpg};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Synthetic patients; each brings 3 encounters, 12 observations and 2 conditions.
    pub patients: usize,
    pub seed: u64,
    /// Where the demo keeps a PostgreSQL cluster if it has to start one.
    pub state_dir: PathBuf,
    /// The database the demo loads into (created if missing).
    pub database: String,
    /// Stay up after the first sync, with `serve` running the job file written to `serve`.
    pub serve: Option<ServeOptions>,
    /// Play this vendor: the fake refuses what it refuses, and the job is a file that names
    /// the vendor and leaves the rest to its profile. Default: the generic fake and job.
    pub vendor: Option<Vendor>,
}

/// Where `demo --serve` writes its job and key.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The jobs directory `serve` reads (`jobs/demo.toml` is written there).
    pub jobs_dir: PathBuf,
    /// The demo's private key; generated when missing, reused (same `kid`) when present.
    pub key_file: PathBuf,
}

/// The client id the demo (and the bench) registers with the fake server.
pub const CLIENT_ID: &str = "fhir-sync-demo";
/// The database `demo` loads into unless told otherwise.
pub const DATABASE: &str = "fhir_sync_demo";
/// How often the served demo job runs: often enough to watch, rarely enough to read the page.
pub const SERVE_SCHEDULE: &str = "*/5 * * * *";
/// The first line of a job file the demo wrote, so that it never replaces someone else's.
const WRITTEN_BY: &str = "# Written by `fhir-sync demo --serve`";

/// The built-in `demo` job pointed at `server`.
pub fn demo_job(server: &FakeFhirServer, key_pem: SecretString) -> JobConfig {
    fake_job(server.fhir_base_url(), key_pem)
}

/// The built-in `demo` job pointed at a fake server's FHIR base URL, which may be served by
/// another process (the bench's).
pub fn fake_job(base_url: url::Url, key_pem: SecretString) -> JobConfig {
    JobConfig {
        name: "demo".into(),
        file: PathBuf::from("(built-in demo job)"),
        description: Some("the embedded fake FHIR server".into()),
        enabled: true,
        fhir: FhirConfig {
            base_url,
            allow_insecure_http: false,
            token_url: None,
            file_origins: Vec::new(),
            vendor: Default::default(),
            headers: Default::default(),
        },
        auth: AuthConfig {
            client_id: CLIENT_ID.into(),
            key: KeySource::Inline(key_pem),
            algorithm: SigningAlgorithm::RS384,
            key_id: None,
            scopes: Vec::new(),
            method: Default::default(),
            jku: None,
            extra_keys: Vec::new(),
            scope_style: Default::default(),
            on_missing_scope: Default::default(),
        },
        export: ExportConfig {
            level: ExportLevel::System,
            group_id: None,
            types: crate::fake::RESOURCE_TYPES
                .iter()
                .map(|t| t.to_string())
                .collect(),
            poll_min_interval_seconds: 0.1,
            poll_max_interval_seconds: 5.0,
            poll_default_interval_seconds: 1.0,
            timeout_seconds: 600,
            ..ExportConfig::default()
        },
        schedule: None,
        alert: Default::default(),
    }
}

pub async fn run(settings: &Settings, options: &DemoOptions) -> anyhow::Result<()> {
    let local = localpg::find_or_start(&options.state_dir.join("pg")).await?;
    let database_url = localpg::ensure_database(&local.admin_url, &options.database).await?;
    let mut settings = settings.clone();
    settings.database.url = SecretString::from(database_url.clone());
    settings.database.password_file = None;
    let pool = app::connect(&settings).await?;
    app::prepare_database(&pool).await?;

    let dataset = Dataset::new(options.seed, options.patients);
    let server = FakeFhirServer::start(
        dataset.clone(),
        FakeOptions {
            polls_before_ready: 2,
            ..FakeOptions::vendor(options.vendor.unwrap_or_default())
        },
    )
    .await
    .context("cannot start the fake FHIR server")?;
    // Oracle's files come from a storage host on another origin.
    let storage = match options.vendor.map(|v| v.profile().files_redirect.value) {
        Some(true) => {
            let other = server.start_other_origin().await?;
            server.redirect_files_to(&other);
            Some(other)
        }
        _ => None,
    };
    let pem = match &options.serve {
        Some(serve) => demo_key(&serve.key_file)?,
        None => smart::generate(SigningAlgorithm::RS384)?,
    };
    let key = SigningKey::from_pem(&pem, SigningAlgorithm::RS384, None, "the demo key")?;
    server.register_client(CLIENT_ID, key.public_jwks());
    println!(
        "fake FHIR server at {} with {} synthetic resources; client {CLIENT_ID:?} registered with key {}",
        server.fhir_base_url(),
        dataset.total(),
        key.kid()
    );

    let job = match (&options.serve, options.vendor) {
        // The job `serve` will run, read back from the file: the first sync already proves
        // the file right.
        (Some(serve), _) => {
            let path = write_job_file(&serve.jobs_dir, &server.fhir_base_url(), &serve.key_file)?;
            crate::config::load_job(&path)?
        }
        (None, Some(vendor)) => {
            let dir = options.state_dir.join("vendors").join(vendor.name());
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let origins: Vec<url::Url> = storage.iter().map(|o| o.origin().clone()).collect();
            let path = write_vendor_job(&dir, vendor, &server, &pem, &origins)?;
            println!(
                "playing {vendor} ({}); job file {}",
                vendor.profile().docs[0],
                path.display()
            );
            crate::config::load_job(&path)?
        }
        (None, None) => demo_job(&server, pem),
    };
    // The run refreshes the analytics views once its files are loaded, like every run.
    let views = crate::views::ViewSet::load(&settings.views.dir, &settings.views.schema)?;
    let ctx = SyncContext::new(
        pool.clone(),
        settings.sync.clone(),
        settings.queue.clone(),
        Vec::new(),
    )
    .with_views(std::sync::Arc::new(views.clone()));
    let report = sync::run_job(&ctx, &job, sync::RunOptions { full: true }).await?;
    app::print_report(&job.name, &report);

    let landed: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT resource_type, count(*) FROM fhir_sync.resource WHERE source = 'demo' AND last_run_id = $1 GROUP BY 1",
    )
    .bind(report.run_id)
    .fetch_all(&pool)
    .await?
    .into_iter()
    .collect();
    let expected: BTreeMap<String, i64> = dataset
        .counts()
        .into_iter()
        .map(|(t, n)| (t, n as i64))
        .collect();
    if landed != expected {
        anyhow::bail!(
            "the database holds {landed:?} from this run but the fake server generated {expected:?}"
        );
    }
    println!(
        "\nverified: the rows in PostgreSQL match what the fake server generated, type by type"
    );
    show_views(&pool, &views, report.run_id).await?;
    let exe = this_program();
    println!("\nlook at the data:");
    println!(
        "  psql '{}' -c \"select resource_type, count(*) from fhir_sync.resource where source = 'demo' group by 1\"",
        database_url
    );
    if options.serve.is_none() {
        println!("  FHIR_SYNC_DATABASE__URL='{database_url}' {exe} status");
    }
    let stop_pg = local.started.as_ref().map(|started| {
        format!(
            "PostgreSQL was started by the demo in {} (port {}); stop it with: {}",
            started.data_dir.display(),
            started.port,
            started.stop_command
        )
    });
    if let Some(serve) = &options.serve {
        let jobs_dir = serve.jobs_dir.clone();
        let key_file = serve.key_file.clone();
        let result = app::serve_until_stopped(&settings, Some(&jobs_dir), |ops| {
            println!(
                "\nserving the demo until Ctrl-C (the job runs at \"{SERVE_SCHEDULE}\", UTC):"
            );
            if let Some(addr) = ops {
                println!("  status page: http://{addr}/");
            }
            println!("  fake EHR:    {}", server.fhir_base_url());
            println!(
                "  job file:    {} (key {})",
                jobs_dir.join("demo.toml").display(),
                key_file.display()
            );
            println!("in another terminal:");
            println!("  export FHIR_SYNC_DATABASE__URL='{database_url}'");
            for command in ["status", "check demo", "keys jwks demo", "run demo"] {
                println!("  {exe} {command}");
            }
            println!("  {exe} runs show {}", report.run_id);
        })
        .await;
        server.shutdown().await;
        result?;
        println!("stopped the demo");
    } else {
        server.shutdown().await;
    }
    if let Some(stop_pg) = stop_pg {
        println!("\n{stop_pg}");
    }
    Ok(())
}

/// The client secret `demo --vendor` registers for the vendors that use
/// `client_secret_basic` (BCDA, AB2D); a demo value, never a real credential.
pub const DEMO_SECRET: &str = "demo-client-secret";

/// Writes `demo.toml` (and the key or secret file it points to) into `dir`: a job that names
/// `vendor` and leaves everything else to the vendor's profile, except the poll bounds: the
/// fake sends the vendor's own `Retry-After` (Oracle's 600 seconds), which the job caps at one
/// second so the demo finishes in seconds. Registers the client with `server` the way the
/// vendor expects (a public key, or a secret for BCDA and AB2D). Used by `demo --vendor` and
/// the vendor sync tests.
pub fn write_vendor_job(
    dir: &Path,
    vendor: Vendor,
    server: &FakeFhirServer,
    key_pem: &SecretString,
    file_origins: &[url::Url],
) -> anyhow::Result<PathBuf> {
    use secrecy::ExposeSecret;
    use std::fmt::Write as _;

    let profile = vendor.profile();
    let mut text = String::from("# Written by `fhir-sync demo --vendor`\n[fhir]\n");
    let _ = writeln!(text, "base_url = \"{}\"", server.fhir_base_url());
    let _ = writeln!(text, "vendor = \"{vendor}\"");
    if !file_origins.is_empty() {
        let origins: Vec<String> = file_origins
            .iter()
            .map(|o| format!("\"{}\"", o.as_str().trim_end_matches('/')))
            .collect();
        let _ = writeln!(text, "file_origins = [{}]", origins.join(", "));
    }
    let _ = writeln!(text, "[auth]\nclient_id = \"{CLIENT_ID}\"");
    match profile.auth.value {
        vendor::Auth::PrivateKeyJwt => {
            let key_file = dir.join("demo.pem");
            write_private(&key_file, key_pem.expose_secret())?;
            let key = SigningKey::from_pem(key_pem, SigningAlgorithm::RS384, None, "the demo key")?;
            server.register_client(CLIENT_ID, key.public_jwks());
            text.push_str("private_key_file = \"demo.pem\"\n");
        }
        vendor::Auth::ClientSecretBasic => {
            write_private(&dir.join("demo.secret"), DEMO_SECRET)?;
            server.register_secret_client(CLIENT_ID, DEMO_SECRET);
            text.push_str("client_secret_file = \"demo.secret\"\n");
        }
    }
    let types: Vec<String> = crate::fake::RESOURCE_TYPES
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect();
    let _ = writeln!(text, "[export]\ntypes = [{}]", types.join(", "));
    if profile.levels.value[0] == vendor::Level::Group {
        let _ = writeln!(text, "group_id = \"{}\"", crate::fake::group_id(vendor));
    }
    text.push_str("poll_min_interval_seconds = 0.05\npoll_max_interval_seconds = 1\n");
    let path = dir.join("demo.toml");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Writes a key or secret readable by the owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `fhir-sync fake-ehr`: the demo's fake FHIR server on its own, until SIGTERM or Ctrl-C,
/// with the client whose private key is `client_key` registered: the EHR of the compose demo,
/// where `serve` runs in another container. `origin` is where the clients reach it.
pub async fn serve_fake_ehr(
    listen: std::net::SocketAddr,
    origin: Option<url::Url>,
    client_key: &Path,
    patients: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let pem = std::fs::read_to_string(client_key)
        .map(SecretString::from)
        .with_context(|| format!("cannot read the client key {}", client_key.display()))?;
    let key = SigningKey::from_pem(
        &pem,
        SigningAlgorithm::RS384,
        None,
        &client_key.display().to_string(),
    )?;
    let dataset = Dataset::new(seed, patients);
    let server = FakeFhirServer::start_at(listen, origin, dataset.clone(), FakeOptions::default())
        .await
        .context("cannot start the fake FHIR server")?;
    server.register_client(CLIENT_ID, key.public_jwks());
    tracing::info!(
        fhir.base_url = %server.fhir_base_url(),
        listen = %listen,
        resources = dataset.total(),
        client.id = CLIENT_ID,
        key.kid = %key.kid(),
        "fake EHR serving"
    );
    app::wait_for_stop_signal().await;
    server.shutdown().await;
    Ok(())
}

/// Checks that the run brought every analytics view of `views.dir` up to date and prints a
/// sample of one.
async fn show_views(
    pool: &sqlx::PgPool,
    views: &crate::views::ViewSet,
    run_id: i64,
) -> anyhow::Result<()> {
    if views.views.is_empty() {
        return Ok(());
    }
    let states = crate::views::materialise::states(pool).await?;
    for view in &views.views {
        let state = states.iter().find(|s| s.name == view.name);
        let current = state.is_some_and(|s| s.status == "fresh" && s.last_run_id == Some(run_id));
        if !current {
            anyhow::bail!(
                "the run did not bring view {:?} up to date: {:?}",
                view.name,
                state.map(|s| (&s.status, &s.error))
            );
        }
    }
    let names: Vec<&str> = views.views.iter().map(|v| v.name.as_str()).collect();
    println!(
        "\nanalytics views built in schema {}: {}",
        views.schema,
        names.join(", ")
    );
    if names.contains(&"blood_pressure") && names.contains(&"patient") {
        let sql = format!(
            "SELECT p.family, p.gender, bp.effective, bp.systolic, bp.diastolic
             FROM {s}.blood_pressure bp JOIN {s}.patient p ON p.id = bp.patient_id
             ORDER BY bp.effective DESC LIMIT 5",
            s = crate::views::compile::ident(&views.schema)
        );
        println!("  {}", sql.split_whitespace().collect::<Vec<_>>().join(" "));
        let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT format('  %-16s %-8s %s  %s/%s mmHg', family, gender, effective, systolic, diastolic) FROM ({sql}) AS q"
        )))
        .fetch_all(pool)
        .await?;
        for line in lines {
            println!("{line}");
        }
    }
    Ok(())
}

/// How to run this program again, for the hints: its path relative to the working directory
/// when it lies below it (`target/debug/fhir-sync` after `cargo run`), else as found.
fn this_program() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "fhir-sync".into();
    };
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(PathBuf::from));
    match relative {
        Some(relative) => relative.display().to_string(),
        None => exe.display().to_string(),
    }
}

/// The demo's private key: read from `path`, or generated and written there (mode 0600).
/// Reusing it keeps the `kid` that `keys jwks demo` printed before.
fn demo_key(path: &Path) -> anyhow::Result<SecretString> {
    match std::fs::read_to_string(path) {
        Ok(pem) => Ok(SecretString::from(pem)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let pem = smart::generate(SigningAlgorithm::RS384)?;
            smart::write_private_key(path, &pem, false)
                .with_context(|| format!("cannot write the demo key to {}", path.display()))?;
            Ok(pem)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the demo key {}", path.display())),
    }
}

/// Writes `<jobs_dir>/demo.toml` for a fake server at `base_url`, unless a file the demo did
/// not write is there. Returns its path.
fn write_job_file(
    jobs_dir: &Path,
    base_url: &url::Url,
    key_file: &Path,
) -> anyhow::Result<PathBuf> {
    let path = jobs_dir.join("demo.toml");
    match std::fs::read_to_string(&path) {
        Ok(existing) if !existing.starts_with(WRITTEN_BY) => anyhow::bail!(
            "{} exists and was not written by the demo; move it away, or pass --jobs-dir",
            path.display()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    std::fs::create_dir_all(jobs_dir)
        .with_context(|| format!("cannot create {}", jobs_dir.display()))?;
    // Absolute, so the file works whatever directory the other commands run from.
    let key_file = std::path::absolute(key_file)
        .with_context(|| format!("cannot resolve {}", key_file.display()))?;
    std::fs::write(&path, job_file_text(base_url, &key_file))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The served demo job, as TOML.
fn job_file_text(base_url: &url::Url, key_file: &Path) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let types: Vec<String> = crate::fake::RESOURCE_TYPES
        .iter()
        .map(|t| quote(t))
        .collect();
    format!(
        "{WRITTEN_BY}, which rewrites it at every start (the fake EHR
# listens on a new port each time). Copy it under another name to keep changes.
description = \"the demo's fake FHIR server\"

[fhir]
base_url = {base_url}

[auth]
client_id = {CLIENT_ID:?}
private_key_file = {key_file}
algorithm = \"RS384\"

[export]
types = [{types}]
poll_min_interval_seconds = 0.1
poll_max_interval_seconds = 5
poll_default_interval_seconds = 1
timeout_seconds = 600

[schedule]
cron = \"{SERVE_SCHEDULE}\"
timezone = \"UTC\"
overlap = \"skip\"
",
        base_url = quote(base_url.as_str()),
        key_file = quote(&key_file.display().to_string()),
        types = types.join(", "),
    )
}
