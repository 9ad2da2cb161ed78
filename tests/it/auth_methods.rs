//! The other ways of authenticating behind the same interface: `client_secret_basic` (CMS BCDA,
//! AB2D) and `none` (open test servers), loaded from job files as an operator writes them.

use fhir_sync::config::{AuthMethod, KeySource};
use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions};
use fhir_sync::sync::{self, SyncContext, error_chain};

use crate::auth_support::JobDir;
use crate::helpers::{TestDb, TestEnv, sync_settings};

/// What a job written by `JobDir::write_job` (Patient and Condition) should load.
fn exported(fake: &FakeFhirServer) -> usize {
    fake.dataset().count("Patient") + fake.dataset().count("Condition")
}

async fn run_file(
    db: &TestDb,
    jobs: &JobDir,
    fake: &FakeFhirServer,
    auth: &str,
) -> Result<sync::RunReport, (String, bool)> {
    let path = jobs.write_job("job", fake, auth);
    let job = fhir_sync::config::load_job(&path).map_err(|e| (e.to_string(), false))?;
    let ctx = SyncContext::new(
        db.pool.clone(),
        sync_settings(),
        crate::helpers::queue_settings(),
        Vec::new(),
    );
    sync::run_job(&ctx, &job, sync::RunOptions { full: true })
        .await
        .map_err(|e| (error_chain(&e), e.error.is_retryable()))
}

#[tokio::test]
async fn client_secret_basic_gets_a_token_and_a_wrong_secret_is_explained() {
    let db = TestDb::new().await;
    let fake = FakeFhirServer::start(Dataset::new(1, 3), TestEnv::fast())
        .await
        .unwrap();
    // Characters that must be form-encoded inside the Basic credentials.
    let secret = "s3cr3t:with/odd+chars";
    fake.register_secret_client("bcda-client", secret);
    let jobs = JobDir::new();
    std::fs::write(jobs.path("secret"), format!("{secret}\n")).unwrap();
    let auth = "client_id = \"bcda-client\"\nmethod = \"client_secret_basic\"\nclient_secret_file = \"../secret\"";
    let report = run_file(&db, &jobs, &fake, auth).await.unwrap();
    assert_eq!(report.resources_loaded() as usize, exported(&fake));
    let attempts = fake.token_attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].client_id.as_deref(), Some("bcda-client"));
    assert!(attempts[0].outcome.is_ok());
    assert!(
        fake.received_assertions().is_empty(),
        "no assertion with a client secret"
    );

    std::fs::write(jobs.path("secret"), "wrong").unwrap();
    let (message, retryable) = run_file(&db, &jobs, &fake, auth).await.unwrap_err();
    assert!(!retryable);
    assert!(
        message.contains("invalid_client") && message.contains("client_secret_file"),
        "{message}"
    );
    assert!(
        !message.contains(secret),
        "the secret reached an error message"
    );
}

#[tokio::test]
async fn none_sends_no_token_to_an_open_server() {
    let db = TestDb::new().await;
    let fake = FakeFhirServer::start(
        Dataset::new(1, 3),
        FakeOptions {
            open_access: true,
            ..TestEnv::fast()
        },
    )
    .await
    .unwrap();
    let jobs = JobDir::new();
    let report = run_file(
        &db,
        &jobs,
        &fake,
        "client_id = \"anyone\"\nmethod = \"none\"",
    )
    .await
    .unwrap();
    assert_eq!(report.resources_loaded() as usize, exported(&fake));
    assert!(fake.token_attempts().is_empty());
    assert!(fake.requests().iter().all(|r| !r.had_authorization));
}

#[tokio::test]
async fn none_against_a_protected_server_says_what_to_change() {
    let mut env = TestEnv::new(3, TestEnv::fast()).await;
    env.job.auth.method = AuthMethod::None;
    env.job.auth.key = KeySource::NotNeeded;
    let failed = env.run().await.expect_err("the server wants a token");
    let message = error_chain(&failed);
    assert!(
        message.contains("auth.method = \"none\"") && message.contains("hint"),
        "{message}"
    );
    assert!(!failed.error.is_retryable());
}

#[test]
fn job_files_say_which_method_and_need_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let write = |auth: &str| {
        let path = dir.path().join("j.toml");
        std::fs::write(
            &path,
            format!("[fhir]\nbase_url = \"https://ehr.example.org/fhir\"\n[auth]\n{auth}\n[export]\ntypes = [\"Patient\"]\n"),
        )
        .unwrap();
        fhir_sync::config::load_job(&path)
    };
    let job = write("client_id = \"a\"\nmethod = \"none\"").unwrap();
    assert!(matches!(job.auth.method, AuthMethod::None));
    let job =
        write("client_id = \"a\"\nmethod = \"client_secret_basic\"\nclient_secret_env = \"X\"")
            .unwrap();
    assert!(matches!(job.auth.method, AuthMethod::ClientSecretBasic(_)));
    for (auth, field) in [
        (
            "client_id = \"a\"\nmethod = \"client_secret_basic\"",
            "auth.client_secret_file",
        ),
        ("client_id = \"a\"\nmethod = \"mtls\"", "auth.method"),
        (
            "client_id = \"a\"\nmethod = \"none\"\nscope_style = \"v3\"",
            "auth.scope_style",
        ),
        (
            "client_id = \"a\"\nmethod = \"none\"\non_missing_scope = \"ignore\"",
            "auth.on_missing_scope",
        ),
        (
            "client_id = \"a\"\nmethod = \"none\"\njku = \"http://keys.example.org/jwks\"",
            "auth.jku",
        ),
        ("client_id = \"a\"", "auth.private_key_file"),
    ] {
        let error = write(auth).unwrap_err();
        assert!(
            error.problems.iter().any(|p| p.field == field),
            "{auth}: {error}"
        );
    }
}
