//! `fhir-sync demo`: a real sync, end to end, against the embedded fake FHIR server.
//!
//! Finds or starts PostgreSQL, generates a key pair and registers it with the fake server,
//! then runs the same code path as `fhir-sync run` and checks that what landed in the database
//! is exactly what the fake server generated.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use secrecy::SecretString;

use crate::config::{
    AuthConfig, ExportConfig, ExportLevel, FhirConfig, JobConfig, KeySource, Settings,
};
use crate::fake::{Dataset, FakeFhirServer, FakeOptions};
use crate::smart::{self, SigningAlgorithm, SigningKey};
use crate::sync::{self, SyncContext};
use crate::{app, localpg};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Synthetic patients; each brings 3 encounters, 12 observations and 2 conditions.
    pub patients: usize,
    pub seed: u64,
    /// Where the demo keeps a PostgreSQL cluster if it has to start one.
    pub state_dir: PathBuf,
}

/// The client id the demo (and the bench) registers with the fake server.
pub const CLIENT_ID: &str = "fhir-sync-demo";
const DATABASE: &str = "fhir_sync_demo";

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
    let database_url = localpg::ensure_database(&local.admin_url, DATABASE).await?;
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
            ..FakeOptions::default()
        },
    )
    .await
    .context("cannot start the fake FHIR server")?;
    let pem = smart::generate(SigningAlgorithm::RS384)?;
    let key = SigningKey::from_pem(&pem, SigningAlgorithm::RS384, None, "the demo key")?;
    server.register_client(CLIENT_ID, key.public_jwks());
    println!(
        "fake FHIR server at {} with {} synthetic resources; client {CLIENT_ID:?} registered with key {}",
        server.fhir_base_url(),
        dataset.total(),
        key.kid()
    );

    let job = demo_job(&server, pem);
    // The run refreshes the analytics views once its files are loaded, like every run.
    let views = crate::views::ViewSet::load(&settings.views.dir, &settings.views.schema)?;
    let ctx = SyncContext {
        pool: pool.clone(),
        settings: settings.sync.clone(),
        queue: settings.queue.clone(),
        views: std::sync::Arc::new(views.clone()),
    };
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
    println!("\nlook at the data:");
    println!(
        "  psql '{}' -c \"select resource_type, count(*) from fhir_sync.resource where source = 'demo' group by 1\"",
        database_url
    );
    println!("  FHIR_SYNC_DATABASE__URL='{database_url}' cargo run -- status");
    if let Some(started) = &local.started {
        println!(
            "\nPostgreSQL was started by the demo in {} (port {}); stop it with: {}",
            started.data_dir.display(),
            started.port,
            started.stop_command
        );
    }
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
