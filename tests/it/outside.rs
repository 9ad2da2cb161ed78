//! A FHIR server fhir-sync's authors did not write: sekmet-fhir 0.1.1 from PyPI, installed by
//! `scripts/install-sekmet.sh` (pinned with hashes, cached under target/) and started per test on
//! a free loopback port. A full and then an incremental sync against it, with exact counts.
//!
//! This is the check that the fake server's reading of the specs is not the only one the client
//! copes with. What sekmet does differently from the specs, and how the job below handles each
//! difference, is in docs/outside-servers.md; this file must stay in step with it.
//!
//! The install needs PyPI (or a pip cache holding the pinned files). Without it the test fails
//! with the install script's message; it never skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use fhir_sync::config::JobConfig;
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunOptions, SyncContext};
use serde_json::{Value, json};

use crate::helpers::{TestDb, queue_settings, sync_settings};

const CLIENT_ID: &str = "fhir-sync";
const TYPES: [&str; 3] = ["Patient", "Observation", "Condition"];

/// Where the install script puts sekmet's virtual environment (ignored by git with target/).
fn install_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/outside-servers/sekmet")
}

/// Installs sekmet once per test process (the script itself returns at once when the pinned
/// environment is already there) and returns its `sekmet` program. Fails the test, with the
/// script's own explanation, when it cannot be installed.
fn sekmet_program() -> PathBuf {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    let program = install_dir().join("venv/bin/sekmet");
    if !*installed {
        let output = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-sekmet.sh"))
            .arg(install_dir())
            .stdin(Stdio::null())
            .output()
            .expect("bash runs");
        assert!(
            output.status.success(),
            "the outside FHIR server (sekmet-fhir from PyPI) could not be installed, so this test cannot run; \
             scripts/install-sekmet.sh said:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        *installed = true;
    }
    program
}

/// One sekmet process with its own data directory, killed when dropped so a failing test leaves
/// nothing running.
struct Sekmet {
    child: Child,
    /// Holds settings.yaml, the SQLite store, the export files and the log.
    dir: tempfile::TempDir,
    base_url: url::Url,
    /// A static bearer token for loading data (sekmet checks no scopes for it); the client under
    /// test never uses it.
    seed_token: String,
    http: reqwest::Client,
}

impl Sekmet {
    /// Starts sekmet with one SMART Backend Services client registered: `client_id` with the
    /// public `jwks`, allowed `system/*.read` only (a read-only client, as an EHR would register
    /// fhir-sync). Retries on another port when the one picked was taken meanwhile.
    async fn start(client_id: &str, jwks: Value) -> Sekmet {
        let program = sekmet_program();
        let mut last_log = String::new();
        for _ in 0..5 {
            match Sekmet::try_start(&program, client_id, &jwks).await {
                Ok(server) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("sekmet did not start in five attempts; its last log:\n{last_log}");
    }

    async fn try_start(program: &Path, client_id: &str, jwks: &Value) -> Result<Sekmet, String> {
        let dir = tempfile::tempdir().unwrap();
        // A port free now; another process could take it before sekmet binds it, and then
        // sekmet exits and the caller tries another.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}/fhir");
        let seed_token = uuid::Uuid::new_v4().simple().to_string();
        // JSON is YAML, which is what sekmet reads. The simulator would answer orders and
        // claims by writing resources of its own; off, the store holds only what the test puts.
        // `delay_seconds` also sets how long a finished export pretends to still be running.
        let settings = json!({
            "base_url": base,
            "host": "127.0.0.1",
            "port": port,
            "data_dir": dir.path().join("data"),
            "log_inbound": false,
            "simulator": { "enabled": false, "delay_seconds": 0.2 },
            "server_auth": {
                "types": ["smart", "bearer"],
                "tokens": [seed_token],
                "smart_clients": [{
                    "client_id": client_id,
                    "jwks": jwks,
                    "scopes": "system/*.read",
                }],
            },
        });
        let config = dir.path().join("settings.yaml");
        std::fs::write(&config, serde_json::to_vec_pretty(&settings).unwrap()).unwrap();
        let log_path = dir.path().join("sekmet.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(program);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for name in [
            "SEKMET_CONFIG",
            "SEKMET_BASE_URL",
            "SEKMET_DB",
            "SEKMET_PUBLIC_URL",
            "SEKMET_PORT",
        ] {
            command.env_remove(name);
        }
        let child = command.spawn().expect("sekmet starts");
        let mut server = Sekmet {
            child,
            dir,
            base_url: url::Url::parse(&base).unwrap(),
            seed_token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        // Python's imports take a few seconds on a busy machine; the limit is generous.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                return Err(format!("(exited: {status})\n{}", server.log()));
            }
            let ready = server
                .http
                .get(format!("{base}/metadata"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(server);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("(not ready after 120 s)\n{}", server.log()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sekmet.log")).unwrap_or_default()
    }

    /// Creates or replaces a resource with the id it carries (FHIR update-as-create).
    async fn put(&self, resource: Value) {
        let path = format!(
            "{}/{}",
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        self.send(reqwest::Method::PUT, &path, Some(&resource))
            .await;
    }

    /// The stored resource, as sekmet serves it (with its `meta`).
    async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, path, None)
            .await
            .json()
            .await
            .unwrap()
    }

    async fn delete(&self, path: &str) {
        self.send(reqwest::Method::DELETE, path, None).await;
    }

    /// One request with the seeding token; anything but a success fails the test, quoting what
    /// sekmet said.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .request(method.clone(), format!("{}/{path}", self.base_url))
            .bearer_auth(&self.seed_token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/fhir+json")
                .json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        if !status.is_success() {
            panic!(
                "{method} {path}: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        response
    }
}

impl Drop for Sekmet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn patient(id: &str, family: &str) -> Value {
    json!({ "resourceType": "Patient", "id": id, "name": [{ "family": family }] })
}

fn observation(id: &str, patient: &str, value: f64) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "valueQuantity": { "value": value, "unit": "/min" },
    })
}

fn condition(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "id": id,
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "38341003" }] },
        "subject": { "reference": format!("Patient/{patient}") },
    })
}

/// The job a user would write for sekmet (docs/outside-servers.md has it as TOML).
fn sekmet_job(server: &Sekmet, key_pem: secrecy::SecretString) -> JobConfig {
    let mut job = fhir_sync::demo::fake_job(server.base_url.clone(), key_pem);
    job.name = "sekmet".into();
    job.file = PathBuf::from("(tests/it/outside.rs)");
    job.description = Some("sekmet-fhir 0.1.1".into());
    job.auth.client_id = CLIENT_ID.into();
    // sekmet checks a system-level `$export` (and its status and file URLs) against the type
    // `*`: only a wildcard scope passes, per-type scopes get 403 at kick-off.
    job.auth.scopes = vec!["system/*.read".into()];
    job.export.types = TYPES.iter().map(|t| t.to_string()).collect();
    // sekmet sends `Retry-After: 1`; a short maximum keeps the test quick.
    job.export.poll_min_interval_seconds = 0.001;
    job.export.poll_max_interval_seconds = 0.2;
    job
}

fn ctx(db: &TestDb) -> std::sync::Arc<SyncContext> {
    SyncContext::new(
        db.pool.clone(),
        sync_settings(),
        queue_settings(),
        Vec::new(),
    )
}

/// Live (not deleted) rows per type in the warehouse.
async fn live_counts(db: &TestDb) -> BTreeMap<String, i64> {
    sqlx::query_as(
        "SELECT resource_type, count(*) FROM fhir_sync.resource
         WHERE source = 'sekmet' AND deleted_at IS NULL GROUP BY resource_type",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn counts(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(t, n)| (t.to_string(), *n)).collect()
}

#[tokio::test]
async fn a_full_then_an_incremental_sync_from_sekmet_land_exactly_its_resources() {
    let db = TestDb::new().await;
    let key_pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    let key = SigningKey::from_pem(&key_pem, SigningAlgorithm::RS384, None, "test key").unwrap();
    let server = Sekmet::start(CLIENT_ID, serde_json::to_value(key.public_jwks()).unwrap()).await;

    // 5 patients, 2 heart rates each, 3 conditions.
    for p in 1..=5 {
        server
            .put(patient(&format!("p{p}"), &format!("Family{p}")))
            .await;
        for o in 0..2 {
            let id = format!("o{}", (p - 1) * 2 + o + 1);
            server
                .put(observation(&id, &format!("p{p}"), 60.0 + p as f64))
                .await;
        }
    }
    for c in 1..=3 {
        server
            .put(condition(&format!("c{c}"), &format!("p{c}")))
            .await;
    }

    let job = sekmet_job(&server, key_pem);
    let full = sync::run_job(&ctx(&db), &job, RunOptions { full: true })
        .await
        .unwrap_or_else(|e| panic!("full run against sekmet: {e:?}\n{}", server.log()));
    assert_eq!(full.since, None);
    assert_eq!(full.resources_loaded(), 18);
    assert_eq!(full.lines_rejected(), 0);
    assert_eq!(full.output_files, 3, "one file per type");
    assert_eq!(
        live_counts(&db).await,
        counts(&[("Condition", 3), ("Observation", 10), ("Patient", 5)])
    );
    let stored: Value = sqlx::query_scalar(
        "SELECT resource FROM fhir_sync.resource
         WHERE source = 'sekmet' AND resource_type = 'Patient' AND id = 'p2'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored["name"][0]["family"], "Family2");
    assert_eq!(stored["meta"]["versionId"], "1");

    // Between the runs: one patient changes, one observation is added, one condition deleted.
    server.put(patient("p2", "Renamed")).await;
    server.put(observation("o11", "p5", 99.0)).await;
    server.delete("Condition/c3").await;

    let incremental = sync::run_job(&ctx(&db), &job, RunOptions { full: false })
        .await
        .unwrap_or_else(|e| panic!("incremental run against sekmet: {e:?}\n{}", server.log()));
    // `_since` is the first run's transactionTime exactly as sekmet wrote it, which is also the
    // format of its `meta.lastUpdated`: its comparison of the two as text then agrees with time
    // order.
    assert_eq!(
        incremental.since.as_deref(),
        Some(full.transaction_time.as_str())
    );
    assert_eq!(incremental.resources_loaded(), 2, "exactly the changes");
    let per_type: BTreeMap<String, i64> = incremental
        .types
        .iter()
        .map(|t| (t.resource_type.clone(), t.resources_loaded))
        .collect();
    assert_eq!(per_type, counts(&[("Observation", 1), ("Patient", 1)]));
    let changed: Vec<(String, String)> = sqlx::query_as(
        "SELECT resource_type, id FROM fhir_sync.resource
         WHERE source = 'sekmet' AND last_run_id = $1 ORDER BY resource_type, id",
    )
    .bind(incremental.run_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        changed,
        [
            ("Observation".to_string(), "o11".to_string()),
            ("Patient".to_string(), "p2".to_string())
        ]
    );
    let stored: Value = sqlx::query_scalar(
        "SELECT resource FROM fhir_sync.resource
         WHERE source = 'sekmet' AND resource_type = 'Patient' AND id = 'p2'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored["name"][0]["family"], "Renamed");
    assert_eq!(stored["meta"]["versionId"], "2");
    // sekmet leaves a deleted resource out of the export and lists it nowhere (no `deleted[]`
    // in the manifest), so an incremental run cannot learn of the deletion: Condition/c3 stays
    // live. docs/outside-servers.md says so.
    assert_eq!(
        live_counts(&db).await,
        counts(&[("Condition", 3), ("Observation", 11), ("Patient", 5)])
    );

    let runs: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT status, resources_loaded, lines_rejected FROM fhir_sync.run
         WHERE job = 'sekmet' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        runs,
        [
            ("succeeded".to_string(), 18, 0),
            ("succeeded".to_string(), 2, 0)
        ]
    );
}

/// The first deviation in docs/outside-servers.md, checked: with the scopes fhir-sync asks for by
/// default (one `system/<Type>.read` per exported type, which sekmet grants), sekmet refuses the
/// system-level kick-off with 403, so the job must ask for `system/*.read`.
#[tokio::test]
async fn sekmet_refuses_a_system_export_to_per_type_scopes() {
    let db = TestDb::new().await;
    let key_pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    let key = SigningKey::from_pem(&key_pem, SigningAlgorithm::RS384, None, "test key").unwrap();
    let server = Sekmet::start(CLIENT_ID, serde_json::to_value(key.public_jwks()).unwrap()).await;
    server.put(patient("p1", "Family1")).await;

    let mut job = sekmet_job(&server, key_pem);
    job.auth.scopes = Vec::new();
    let failed = sync::run_job(&ctx(&db), &job, RunOptions { full: true })
        .await
        .expect_err("per-type scopes do not pass sekmet's check of a system-level export");
    let reason = fhir_sync::sync::error_chain(&failed.error);
    assert!(reason.contains("refused the export (HTTP 403)"), "{reason}");
    let (status, loaded): (String, i64) =
        sqlx::query_as("SELECT status, resources_loaded FROM fhir_sync.run WHERE job = 'sekmet'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), loaded), ("failed", 0));
}

/// The third deviation in docs/outside-servers.md, checked: sekmet compares `_since` with
/// `meta.lastUpdated` as text, so one instant written two ways selects different resources.
/// In UTC with milliseconds and `Z` (the form sekmet writes, and what the docs tell users to put
/// in `export.since`) it is right; with an offset it drops a change made after it.
#[tokio::test]
async fn sekmet_compares_since_as_text_so_only_its_own_format_is_right() {
    let db = TestDb::new().await;
    let key_pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    let key = SigningKey::from_pem(&key_pem, SigningAlgorithm::RS384, None, "test key").unwrap();
    let server = Sekmet::start(CLIENT_ID, serde_json::to_value(key.public_jwks()).unwrap()).await;
    server.put(patient("p1", "Family1")).await;
    let stored = server.get("Patient/p1").await;
    let last_updated = stored["meta"]["lastUpdated"].as_str().unwrap();
    // A second before the change, in two spellings of the same instant.
    let before = fhir_sync::fhir::parse_instant(last_updated).unwrap() - time::Duration::seconds(1);
    let spell = |t: time::OffsetDateTime, offset: &str| {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}{offset}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    };
    let in_utc = spell(before, "Z");
    let with_offset = spell(
        before.to_offset(time::UtcOffset::from_hms(1, 0, 0).unwrap()),
        "+01:00",
    );
    assert_eq!(
        fhir_sync::fhir::parse_instant(&in_utc),
        fhir_sync::fhir::parse_instant(&with_offset)
    );

    // Two jobs, so that each one's first incremental run exports from its own `export.since`
    // (incremental rather than full: for an incremental run an empty export is an ordinary one).
    let mut loaded = BTreeMap::new();
    for (name, since) in [("utc", &in_utc), ("offset", &with_offset)] {
        let mut job = sekmet_job(&server, key_pem.clone());
        job.name = format!("sekmet-{name}");
        job.export.since = Some(since.clone());
        let report = sync::run_job(&ctx(&db), &job, RunOptions { full: false })
            .await
            .unwrap_or_else(|e| panic!("run with since {since}: {e:?}\n{}", server.log()));
        assert_eq!(report.since.as_deref(), Some(since.as_str()));
        loaded.insert(name, report.resources_loaded());
    }
    assert_eq!(loaded, BTreeMap::from([("offset", 0), ("utc", 1)]));
}
