//! Vendor profiles against the fake's vendor personalities: for each vendor a full and an
//! incremental sync with a job file that names only the vendor (the profile supplies the
//! rest), and for each documented refusal a job without the profile's default that the
//! personality refuses, so the tests prove the profile is what makes the sync work.
//!
//! The personalities send their vendors' long `Retry-After` values as is (Oracle 600 s, Epic
//! an hour); the test jobs bound polling at 50 ms with `export.poll_max_interval_seconds`, the
//! same explicit override an operator has.

use std::sync::Arc;

use fhir_sync::config::{JobConfig, load_job};
use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions, OtherOrigin, RESOURCE_TYPES};
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunFailed, RunOptions, RunReport, SyncContext};
use fhir_sync::vendor::{self, Vendor};
use secrecy::SecretString;

use crate::helpers::{TestDb, queue_settings, sync_settings};

struct VendorEnv {
    db: TestDb,
    fake: FakeFhirServer,
    job: JobConfig,
    key_pem: SecretString,
    _dir: tempfile::TempDir,
    storage: Option<OtherOrigin>,
}

impl VendorEnv {
    async fn new(vendor: Vendor) -> VendorEnv {
        let db = TestDb::new().await;
        let options = FakeOptions {
            polls_before_ready: 2,
            resources_per_file: 250,
            ..FakeOptions::vendor(vendor)
        };
        let fake = FakeFhirServer::start(Dataset::new(11, 12), options)
            .await
            .unwrap();
        let storage = if vendor.profile().files_redirect.value {
            let other = fake.start_other_origin().await.unwrap();
            fake.redirect_files_to(&other);
            Some(other)
        } else {
            None
        };
        let origins: Vec<url::Url> = storage.iter().map(|o| o.origin().clone()).collect();
        let key_pem = smart::generate(SigningAlgorithm::RS384).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = fhir_sync::demo::write_vendor_job(dir.path(), vendor, &fake, &key_pem, &origins)
            .unwrap();
        let mut job = load_job(&path).unwrap();
        job.export.poll_min_interval_seconds = 0.001;
        job.export.poll_max_interval_seconds = 0.05;
        VendorEnv {
            db,
            fake,
            job,
            key_pem,
            _dir: dir,
            storage,
        }
    }

    fn ctx(&self) -> std::sync::Arc<SyncContext> {
        SyncContext::new(
            self.db.pool.clone(),
            sync_settings(),
            queue_settings(),
            Vec::new(),
        )
    }

    async fn run(&self, job: &JobConfig, full: bool) -> Result<RunReport, RunFailed> {
        sync::run_job(&self.ctx(), job, RunOptions { full }).await
    }

    async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource WHERE source = 'demo'")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// The decoded parameter `name` of kick-off number `n`.
    fn param(&self, n: usize, name: &str) -> Vec<String> {
        self.fake.kick_offs()[n]
            .params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A full sync, then an incremental one from its transactionTime; checks both landed what
    /// they should and returns them.
    async fn full_then_incremental(&self) -> (RunReport, RunReport) {
        let full = self
            .run(&self.job, true)
            .await
            .expect("the full sync succeeds");
        let total = self.fake.dataset().total();
        assert_eq!(full.resources_loaded() as usize, total);
        assert_eq!(self.rows().await as usize, total);
        let incremental = self
            .run(&self.job, false)
            .await
            .expect("the incremental sync succeeds");
        // The data set did not change after the full export's transactionTime.
        assert_eq!(incremental.resources_loaded(), 0);
        assert_eq!(self.rows().await as usize, total);
        let since = self.param(1, "_since");
        assert_eq!(since.len(), 1, "the incremental run sends one _since");
        let expected = if self.job.export.since_with_offset {
            vendor::with_numeric_offset(&full.transaction_time)
        } else {
            full.transaction_time.clone()
        };
        assert_eq!(since[0], expected);
        (full, incremental)
    }
}

fn failure(result: Result<RunReport, RunFailed>) -> String {
    format!(
        "{:#}",
        anyhow::Error::from(result.expect_err("the run fails"))
    )
}

#[tokio::test]
async fn epic_group_export_with_client_id_header_and_no_last_updated() {
    let env = VendorEnv::new(Vendor::Epic).await;
    assert_eq!(env.job.export.timeout_seconds, 30 * 86_400);
    env.full_then_incremental().await;
    let kick_off = &env.fake.kick_offs()[0];
    assert_eq!(kick_off.path, "/fhir/Group/all-patients/$export");
    // Epic sends resources without meta.lastUpdated; they load all the same.
    let dated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_sync.resource WHERE source = 'demo' AND last_updated IS NOT NULL",
    )
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(dated, 0);
    // The export of each run was deleted, so the next kick-off found the slot free.
    assert_eq!(env.fake.export_count(), 0);

    // Without the profile's Epic-Client-ID header, Epic refuses the kick-off.
    let mut bare = env.job.clone();
    bare.fhir.headers.clear();
    let message = failure(env.run(&bare, true).await);
    assert!(message.contains("Epic-Client-ID"), "{message}");
    // And it offers no system-level export.
    let mut system = env.job.clone();
    system.export.level = fhir_sync::config::ExportLevel::System;
    system.export.group_id = None;
    let message = failure(env.run(&system, true).await);
    assert!(
        message.contains("system level export is not supported"),
        "{message}"
    );
}

#[tokio::test]
async fn epic_runs_one_export_per_client_and_group_until_delete() {
    let env = VendorEnv::new(Vendor::Epic).await;
    let settings = sync_settings();
    let bulk = sync::connect_bulk(&settings, &env.job).await.unwrap();
    let request = fhir_sync::bulk::ExportRequest::from_config(&env.job.export);
    refused_until_deleted(&bulk, &request, &request).await;
}

/// Kicks `first` off, checks that `second` is then refused with a 429 (one export at a time),
/// deletes the first export and checks that `second` is taken now.
async fn refused_until_deleted(
    bulk: &fhir_sync::bulk::BulkClient,
    first: &fhir_sync::bulk::ExportRequest,
    second: &fhir_sync::bulk::ExportRequest,
) {
    let started = bulk.kick_off(first).await.unwrap();
    let refused = bulk.kick_off(second).await;
    assert!(
        matches!(
            refused,
            Err(fhir_sync::bulk::ExportError::Busy { status: 429, .. })
        ),
        "{refused:?}"
    );
    bulk.delete(&started.status_url).await.unwrap();
    let taken = bulk.kick_off(second).await.unwrap();
    bulk.delete(&taken.status_url).await.unwrap();
}

#[tokio::test]
async fn epic_fetches_the_jwks_from_its_url_so_a_rotated_key_is_accepted() {
    let env = VendorEnv::new(Vendor::Epic).await;
    // The client is registered by JWKS URL only: what `serve` publishes there is what counts.
    let fake = &env.fake;
    fake.register_client(
        "fhir-sync-demo",
        jsonwebtoken::jwk::JwkSet { keys: Vec::new() },
    );
    let next_pem = smart::generate(SigningAlgorithm::ES384).unwrap();
    let mut job = env.job.clone();
    job.auth.extra_keys.push(fhir_sync::config::KeyConfig {
        key: fhir_sync::config::KeySource::Inline(next_pem.clone()),
        algorithm: SigningAlgorithm::ES384,
        key_id: None,
    });
    // The next key is published before it signs, as the rotation procedure says.
    let jwks = fhir_sync::ops::http::jwks_of(&[Arc::new(job.clone())]).unwrap();
    let ops = crate::helpers::JwksServer::start(&env.db.pool, jwks).await;
    let url = ops.url();
    fake.register_jwks_url("fhir-sync-demo", &url);

    let first = env.run(&job, true).await.expect("the active key signs");
    // Rotation: the next key becomes the active one, the old one stays published.
    let mut rotated = job.clone();
    rotated.auth.key = fhir_sync::config::KeySource::Inline(next_pem.clone());
    rotated.auth.algorithm = SigningAlgorithm::ES384;
    rotated.auth.extra_keys = vec![fhir_sync::config::KeyConfig {
        key: fhir_sync::config::KeySource::Inline(env.key_pem.clone()),
        algorithm: SigningAlgorithm::RS384,
        key_id: None,
    }];
    let second = env
        .run(&rotated, false)
        .await
        .expect("the rotated key signs");
    assert!(second.run_id > first.run_id);
    let next = SigningKey::from_pem(&next_pem, SigningAlgorithm::ES384, None, "next").unwrap();
    let kids: Vec<Option<String>> = fake
        .token_attempts()
        .into_iter()
        .filter(|a| a.outcome.is_ok())
        .map(|a| a.kid)
        .collect();
    assert_eq!(kids.last().unwrap().as_deref(), Some(next.kid()));
    ops.stop().await;
}

#[tokio::test]
async fn oracle_tenant_base_comma_type_long_retry_after_and_files_on_storage() {
    let env = VendorEnv::new(Vendor::Oracle).await;
    assert_eq!(
        env.fake.options().retry_after_seconds,
        fhir_sync::fake::ORACLE_RETRY_AFTER_SECONDS
    );
    assert_eq!(env.job.auth.scope_style, fhir_sync::config::ScopeStyle::V1);
    env.full_then_incremental().await;
    let kick_off = &env.fake.kick_offs()[0];
    assert_eq!(
        kick_off.path,
        format!(
            "/r4/{}/Group/all-patients/$export",
            fhir_sync::fake::ORACLE_TENANT
        )
    );
    assert_eq!(env.param(0, "_type"), [RESOURCE_TYPES.join(",")]);
    // Files came from the storage origin, without the bearer token.
    let storage_port = env.storage.as_ref().unwrap().origin().port().unwrap();
    let from_storage: Vec<_> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| {
            r.host
                .as_deref()
                .is_some_and(|h| h.ends_with(&format!(":{storage_port}")))
        })
        .collect();
    assert!(!from_storage.is_empty());
    assert!(
        from_storage
            .iter()
            .all(|r| !r.had_authorization && r.status == 200)
    );

    // Oracle refuses what the profile avoids: system level, and repeated _type.
    let mut system = env.job.clone();
    system.export.level = fhir_sync::config::ExportLevel::System;
    system.export.group_id = None;
    let message = failure(env.run(&system, true).await);
    assert!(
        message.contains("system level export is not supported"),
        "{message}"
    );
    let mut repeated = env.job.clone();
    repeated.export.type_encoding = fhir_sync::config::TypeEncoding::Repeated;
    let message = failure(env.run(&repeated, true).await);
    assert!(message.contains("repeated _type"), "{message}");
}

#[tokio::test]
async fn oracle_runs_one_export_per_client_and_tenant_whatever_the_level() {
    let env = VendorEnv::new(Vendor::Oracle).await;
    let bulk = sync::connect_bulk(&sync_settings(), &env.job)
        .await
        .unwrap();
    let group = fhir_sync::bulk::ExportRequest::from_config(&env.job.export);
    let mut patient = group.clone();
    patient.level = fhir_sync::config::ExportLevel::Patient;
    patient.group_id = None;
    // Another level (so another group) on the same tenant is refused too, unlike Epic.
    refused_until_deleted(&bulk, &group, &patient).await;
}

#[tokio::test]
async fn oracle_patient_level_export_works_too() {
    let env = VendorEnv::new(Vendor::Oracle).await;
    let mut job = env.job.clone();
    job.export.level = fhir_sync::config::ExportLevel::Patient;
    job.export.group_id = None;
    let report = env.run(&job, true).await.unwrap();
    assert_eq!(
        report.resources_loaded() as usize,
        env.fake.dataset().total()
    );
}

#[tokio::test]
async fn veradigm_and_athenahealth_offer_group_exports_with_v1_scopes() {
    for vendor in [Vendor::Veradigm, Vendor::Athenahealth] {
        let env = VendorEnv::new(vendor).await;
        env.full_then_incremental().await;
        let group = fhir_sync::fake::group_id(vendor);
        assert_eq!(
            env.fake.kick_offs()[0].path,
            format!("/fhir/Group/{group}/$export")
        );
        if vendor == Vendor::Athenahealth {
            assert_eq!(group, fhir_sync::fake::ATHENAHEALTH_GROUP_ID);
            assert!(group.starts_with("a-1.c-"));
        }
        let granted: Vec<_> = env
            .fake
            .token_attempts()
            .into_iter()
            .filter(|a| a.outcome.is_ok())
            .collect();
        assert!(!granted.is_empty());
        // v2 scopes get nothing from a v1-only server.
        let mut v2 = env.job.clone();
        v2.auth.scope_style = fhir_sync::config::ScopeStyle::V2;
        let message = failure(env.run(&v2, true).await);
        assert!(
            message.contains("scope") || message.contains("grant"),
            "{vendor}: {message}"
        );
        let mut system = env.job.clone();
        system.export.level = fhir_sync::config::ExportLevel::System;
        system.export.group_id = None;
        let message = failure(env.run(&system, true).await);
        assert!(message.contains("not supported"), "{vendor}: {message}");
    }
}

#[tokio::test]
async fn bcda_client_secret_string_expires_in_and_since_with_an_offset() {
    let env = VendorEnv::new(Vendor::Bcda).await;
    assert!(matches!(
        env.job.auth.method,
        fhir_sync::config::AuthMethod::ClientSecretBasic(_)
    ));
    assert_eq!(
        env.fake.options().expires_in,
        fhir_sync::fake::ExpiresIn::String
    );
    let (full, _) = env.full_then_incremental().await;
    assert!(
        full.transaction_time.ends_with('Z'),
        "BCDA's own transactionTime"
    );
    assert!(env.param(1, "_since")[0].ends_with("+00:00"));

    // The same incremental without the profile's offset rewrite is refused.
    let mut zulu = env.job.clone();
    zulu.export.since_with_offset = false;
    let message = failure(env.run(&zulu, false).await);
    assert!(message.contains("timezone offset"), "{message}");

    // The year-end runout group.
    let mut runout = env.job.clone();
    runout.export.level = fhir_sync::config::ExportLevel::Group;
    runout.export.group_id = Some("runout".into());
    let report = env.run(&runout, true).await.unwrap();
    assert_eq!(
        report.resources_loaded() as usize,
        env.fake.dataset().total()
    );
    assert_eq!(
        env.fake.kick_offs().last().unwrap().path,
        "/fhir/Group/runout/$export"
    );
}

#[tokio::test]
async fn ab2d_full_runs_send_an_explicit_early_since() {
    let env = VendorEnv::new(Vendor::Ab2d).await;
    env.full_then_incremental().await;
    assert_eq!(env.param(0, "_since"), [vendor::AB2D_EARLIEST]);
    // A second full run after exports exist still gets everything.
    let again = env.run(&env.job, true).await.unwrap();
    assert_eq!(
        again.resources_loaded() as usize,
        env.fake.dataset().total()
    );
    // Without the profile's early since, AB2D reads the missing _since as "since your last
    // export": the "full" run silently exports nothing.
    let mut bare = env.job.clone();
    bare.export.since = None;
    let silent = env.run(&bare, true).await.unwrap();
    assert!(
        env.fake
            .kick_offs()
            .last()
            .unwrap()
            .params
            .iter()
            .all(|(k, _)| k != "_since")
    );
    assert_eq!(silent.resources_loaded(), 0);
}

// The default current-thread runtime, so the subscriber set for this thread sees the client and
// the fake server alike.
#[tokio::test]
async fn a_static_bearer_token_is_sent_as_is_and_a_refused_one_is_a_clear_fatal_error() {
    let (captured, _logs) = crate::helpers::Captured::start(tracing::Level::TRACE);

    let env = VendorEnv::new(Vendor::Generic).await;
    let token = env
        .fake
        .issue_static_token("fhir-sync-demo", &["system/*.read"]);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut job = env.job.clone();
    job.auth.method = fhir_sync::config::AuthMethod::BearerToken(
        fhir_sync::config::SecretSource::File(token_file.clone()),
    );
    let attempts_before = env.fake.token_attempts().len();
    let report = env.run(&job, true).await.expect("the static token works");
    assert_eq!(
        report.resources_loaded() as usize,
        env.fake.dataset().total()
    );
    assert_eq!(
        env.fake.token_attempts().len(),
        attempts_before,
        "no token endpoint is used"
    );

    std::fs::write(&token_file, "a-token-the-server-never-issued\n").unwrap();
    let kick_offs = env.fake.kick_offs().len();
    let message = failure(env.run(&job, true).await);
    assert!(
        message.contains("the static token was refused; replace it"),
        "{message}"
    );
    // Fatal, not retried: the kick-off was refused once (the 401 gets no retry either).
    let refused = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/$export") && r.status == 401)
        .count();
    assert_eq!(refused, 1);
    assert_eq!(env.fake.kick_offs().len(), kick_offs);
    assert!(!message.contains(&token));
    let logs = captured.text();
    assert!(
        logs.contains("export started"),
        "the run's logs are captured"
    );
    assert!(!logs.contains(&token), "the static token reached the logs");
    assert!(!logs.contains("a-token-the-server-never-issued"));
}

#[test]
fn every_sample_job_file_passes_config_check() {
    let jobs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&jobs).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".toml.sample") else {
            continue;
        };
        // Samples point at keys and secrets by relative path; give them stand-ins.
        let copy = dir.path().join("jobs").join(format!("{stem}.toml"));
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&path, &copy).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            for key in ["private_key_file", "client_secret_file", "token_file"] {
                if let Some(value) = line.trim().strip_prefix(key) {
                    let relative = value.trim_start_matches([' ', '=']).trim_matches('"');
                    let target = copy.parent().unwrap().join(relative);
                    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                    let content = if key == "private_key_file" {
                        use secrecy::ExposeSecret;
                        smart::generate(SigningAlgorithm::RS384)
                            .unwrap()
                            .expose_secret()
                            .to_string()
                    } else {
                        "stand-in".to_string()
                    };
                    std::fs::write(&target, content).unwrap();
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                            .unwrap();
                    }
                }
            }
        }
        let job = load_job(&copy).unwrap_or_else(|e| panic!("{name}: {e}"));
        let warnings = fhir_sync::config::vendor_warnings(&job);
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} samples found");
}
