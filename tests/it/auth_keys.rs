//! Client keys in real runs: ES384 end to end, keys from a PEM file or an environment variable,
//! the optional `jku` header, and rotation between several published keys.

use fhir_sync::config::{KeyConfig, KeySource};
use fhir_sync::fake::{Dataset, FakeFhirServer};
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, SyncContext, error_chain};
use secrecy::{ExposeSecret, SecretString};

use crate::auth_support::JobDir;
use crate::helpers::{TestDb, TestEnv, sync_settings};

fn kid(pem: &SecretString, alg: SigningAlgorithm) -> String {
    SigningKey::from_pem(pem, alg, None, "t")
        .unwrap()
        .kid()
        .to_string()
}

fn header_of(assertion: &str) -> jsonwebtoken::Header {
    jsonwebtoken::decode_header(assertion).unwrap()
}

#[tokio::test]
async fn es384_works_end_to_end() {
    let mut env = TestEnv::new(5, TestEnv::fast()).await;
    let pem = smart::generate(SigningAlgorithm::ES384).unwrap();
    let key = SigningKey::from_pem(&pem, SigningAlgorithm::ES384, None, "t").unwrap();
    env.fake
        .register_client("fhir-sync-demo", key.public_jwks());
    env.job.auth.key = KeySource::Inline(pem);
    env.job.auth.algorithm = SigningAlgorithm::ES384;
    let report = env
        .run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(
        report.resources_loaded() as usize,
        env.fake.dataset().total()
    );
    let assertions = env.fake.received_assertions();
    let header = header_of(&assertions[0]);
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES384);
    assert_eq!(header.kid.as_deref(), Some(key.kid()));
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert!(header.jku.is_none(), "jku is only sent when configured");
}

/// Loads a job file written for `fake` and runs it into `db`.
async fn run_job_file(
    fake: &FakeFhirServer,
    db: &TestDb,
    jobs: &JobDir,
    auth: &str,
) -> Result<sync::RunReport, String> {
    let path = jobs.write_job("filejob", fake, auth);
    let job = fhir_sync::config::load_job(&path).map_err(|e| e.to_string())?;
    let ctx = SyncContext::new(
        db.pool.clone(),
        sync_settings(),
        crate::helpers::queue_settings(),
        Vec::new(),
    );
    sync::run_job(&ctx, &job, sync::RunOptions { full: true })
        .await
        .map_err(|e| error_chain(&e))
}

#[tokio::test]
async fn keys_load_from_a_pem_file_or_an_environment_variable() {
    let db = TestDb::new().await;
    let fake = FakeFhirServer::start(Dataset::new(1, 3), TestEnv::fast())
        .await
        .unwrap();
    let jobs = JobDir::new();
    let file_pem = smart::generate(SigningAlgorithm::ES384).unwrap();
    smart::write_private_key(&jobs.path("key.pem"), &file_pem, true).unwrap();
    let env_pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    // Not FHIR_SYNC_-prefixed: the settings loader reads those, and binaries other tests spawn
    // inherit this process's environment.
    let var = format!("AUTH_TEST_KEY_{}", uuid::Uuid::new_v4().simple());
    // SAFETY: the variable name is unique to this test, so no other thread reads or writes it.
    unsafe { std::env::set_var(&var, env_pem.expose_secret()) };
    let file_key = SigningKey::from_pem(&file_pem, SigningAlgorithm::ES384, None, "t").unwrap();
    let env_key = SigningKey::from_pem(&env_pem, SigningAlgorithm::RS384, None, "t").unwrap();
    fake.register_client("c", smart::publish_jwks(&[file_key, env_key]).unwrap());

    run_job_file(
        &fake,
        &db,
        &jobs,
        "client_id = \"c\"\nprivate_key_file = \"../key.pem\"\nalgorithm = \"ES384\"",
    )
    .await
    .unwrap();
    run_job_file(
        &fake,
        &db,
        &jobs,
        &format!("client_id = \"c\"\nprivate_key_env = \"{var}\""),
    )
    .await
    .unwrap();
    // SAFETY: as above; the key should not outlive the test in this process's environment.
    unsafe { std::env::remove_var(&var) };
    let kids: Vec<Option<String>> = fake.token_attempts().into_iter().map(|a| a.kid).collect();
    assert_eq!(
        kids,
        [
            Some(kid(&file_pem, SigningAlgorithm::ES384)),
            Some(kid(&env_pem, SigningAlgorithm::RS384))
        ]
    );
}

#[tokio::test]
async fn the_jku_header_is_sent_when_configured_and_must_match() {
    let mut env = TestEnv::new(3, TestEnv::fast()).await;
    let jwks_url = "https://keys.example.org/fhir-sync/jwks.json";
    env.fake.register_jku("fhir-sync-demo", jwks_url);
    env.job.auth.jku = Some(url::Url::parse(jwks_url).unwrap());
    env.run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let header = header_of(&env.fake.received_assertions()[0]);
    assert_eq!(header.jku.as_deref(), Some(jwks_url));

    env.job.auth.jku = Some(url::Url::parse("https://keys.example.org/other.json").unwrap());
    let failed = env
        .run()
        .await
        .expect_err("a jku other than the registered one");
    assert!(
        error_chain(&failed).contains("jku does not match"),
        "{}",
        error_chain(&failed)
    );
}

#[tokio::test]
async fn rotation_signs_with_the_active_key_while_all_are_published() {
    let mut env = TestEnv::new(3, TestEnv::fast()).await;
    let old_pem = env.key_pem.clone();
    let new_pem = smart::generate(SigningAlgorithm::ES384).unwrap();
    // Step 1: the new key is published next to the active old one (what `keys jwks` prints).
    env.job.auth.extra_keys = vec![KeyConfig {
        key: KeySource::Inline(new_pem.clone()),
        algorithm: SigningAlgorithm::ES384,
        key_id: None,
    }];
    let published = smart::publish_jwks(&smart::job_keys(&env.job).unwrap()).unwrap();
    assert_eq!(published.keys.len(), 2);
    env.fake.register_client("fhir-sync-demo", published);
    env.run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));

    // Step 2: the new key becomes active; the old one stays published until caches expire.
    env.job.auth.key = KeySource::Inline(new_pem.clone());
    env.job.auth.algorithm = SigningAlgorithm::ES384;
    env.job.auth.extra_keys = vec![KeyConfig {
        key: KeySource::Inline(old_pem.clone()),
        algorithm: SigningAlgorithm::RS384,
        key_id: None,
    }];
    let published = smart::publish_jwks(&smart::job_keys(&env.job).unwrap()).unwrap();
    env.fake.register_client("fhir-sync-demo", published);
    env.run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));

    let kids: Vec<Option<String>> = env
        .fake
        .token_attempts()
        .into_iter()
        .map(|a| a.kid)
        .collect();
    assert_eq!(
        kids,
        [
            Some(kid(&old_pem, SigningAlgorithm::RS384)),
            Some(kid(&new_pem, SigningAlgorithm::ES384))
        ]
    );
}

#[tokio::test]
async fn duplicate_kids_are_refused_when_publishing() {
    let pem = smart::generate(SigningAlgorithm::ES384).unwrap();
    let a = SigningKey::from_pem(&pem, SigningAlgorithm::ES384, Some("k".into()), "t").unwrap();
    let b = SigningKey::from_pem(
        &smart::generate(SigningAlgorithm::ES384).unwrap(),
        SigningAlgorithm::ES384,
        Some("k".into()),
        "t",
    )
    .unwrap();
    let error = smart::publish_jwks(&[a, b]).unwrap_err();
    assert!(error.contains("\"k\""), "{error}");
}
