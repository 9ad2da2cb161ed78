//! The token manager in real runs: renewal when tokens expire or are revoked mid-poll and
//! mid-download, one renewal for many concurrent downloads, 401 handling, token endpoint
//! failures and the granted-scope check. The fake server counts every token request.

use std::collections::HashSet;

use fhir_sync::config::MissingScopePolicy;
use fhir_sync::fake::{ExpiresIn, FakeOptions};
use fhir_sync::sync::{self, error_chain};
use secrecy::ExposeSecret;

use crate::helpers::{TestEnv, sync_settings};

fn token_requests(env: &TestEnv) -> (usize, usize) {
    let attempts = env.fake.token_attempts();
    let ok = attempts.iter().filter(|a| a.outcome.is_ok()).count();
    (attempts.len(), ok)
}

fn unauthorized(env: &TestEnv, path_part: &str) -> usize {
    env.fake
        .requests()
        .iter()
        .filter(|r| r.status == 401 && r.path.contains(path_part))
        .count()
}

async fn loaded(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource")
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_while_polling() {
    // One-second tokens and one-second waits between polls: every poll needs a new token.
    let env = TestEnv::new(
        5,
        FakeOptions {
            token_lifetime_seconds: 1,
            retry_after_seconds: 1,
            polls_before_ready: 2,
            ..TestEnv::fast()
        },
    )
    .await;
    env.run().await.expect("the run survives expiring tokens");
    let (total, ok) = token_requests(&env);
    assert_eq!(total, ok, "no token request was refused");
    assert!(total >= 2, "expected renewals, saw {total} token requests");
    assert_eq!(loaded(&env).await as usize, env.fake.dataset().total());
}

#[tokio::test]
async fn a_token_revoked_mid_poll_is_renewed_once() {
    // Kick-off and the first poll use the first token; the second poll finds it revoked.
    let env = TestEnv::new(
        5,
        FakeOptions {
            polls_before_ready: 3,
            revoke_tokens_after_requests: Some(2),
            ..TestEnv::fast()
        },
    )
    .await;
    env.run().await.expect("the run survives the revocation");
    assert_eq!(token_requests(&env), (2, 2));
    assert_eq!(unauthorized(&env, "/bulkstatus/"), 1);
}

#[tokio::test]
async fn a_token_revoked_mid_download_is_renewed_once() {
    // Kick-off, two 202 polls and the manifest (4 requests), then the first file: the second
    // file finds the token revoked. One download at a time, so the order is fixed.
    let env = TestEnv::new(
        40,
        FakeOptions {
            revoke_tokens_after_requests: Some(5),
            ..TestEnv::fast()
        },
    )
    .await;
    let ctx = env.ctx_with(fhir_sync::config::SyncSettings {
        max_parallel_downloads: 1,
        ..sync_settings()
    });
    sync::run_job(&ctx, &env.job, sync::RunOptions { full: true })
        .await
        .expect("the run survives the revocation");
    assert_eq!(token_requests(&env), (2, 2));
    assert_eq!(unauthorized(&env, "/bulkfiles/"), 1);
    assert_eq!(loaded(&env).await as usize, env.fake.dataset().total());
}

#[tokio::test]
async fn many_concurrent_downloads_share_one_renewal() {
    // Small files, so that many downloads are in flight when the token is revoked on the first
    // file request; every one of them gets a 401, and all must share a single renewal.
    let env = TestEnv::new(
        40,
        FakeOptions {
            resources_per_file: 20,
            revoke_tokens_after_requests: Some(4),
            ..TestEnv::fast()
        },
    )
    .await;
    let ctx = env.ctx_with(fhir_sync::config::SyncSettings {
        max_parallel_downloads: 8,
        ..sync_settings()
    });
    let report = sync::run_job(&ctx, &env.job, sync::RunOptions { full: true })
        .await
        .expect("the run succeeds");
    assert!(report.output_files > 8, "{} files", report.output_files);
    assert!(unauthorized(&env, "/bulkfiles/") >= 1);
    assert_eq!(
        token_requests(&env),
        (2, 2),
        "exactly one renewal however many downloads were refused"
    );
    assert_eq!(loaded(&env).await as usize, env.fake.dataset().total());
}

#[tokio::test]
async fn a_401_once_is_retried_with_a_new_token() {
    let env = TestEnv::new(
        5,
        FakeOptions {
            unauthorized_responses: 1,
            ..TestEnv::fast()
        },
    )
    .await;
    env.run().await.expect("one 401 is absorbed");
    assert_eq!(token_requests(&env), (2, 2));
    let kick_offs: Vec<u16> = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/$export"))
        .map(|r| r.status)
        .collect();
    assert_eq!(kick_offs, [401, 202]);
}

#[tokio::test]
async fn a_401_after_renewal_fails_the_run_clearly() {
    let env = TestEnv::new(
        5,
        FakeOptions {
            unauthorized_responses: 2,
            ..TestEnv::fast()
        },
    )
    .await;
    let failed = env.run().await.expect_err("a second 401 is fatal");
    let message = error_chain(&failed);
    assert!(
        message.contains("export kick-off") && message.contains("refused again after renewing"),
        "{message}"
    );
    assert!(!failed.error.is_retryable());
    assert_eq!(token_requests(&env), (2, 2), "one renewal, no loop");
    assert_eq!(unauthorized(&env, "/$export"), 2);
}

#[tokio::test]
async fn expires_in_as_a_string_or_missing_is_understood() {
    for form in [ExpiresIn::String, ExpiresIn::Missing] {
        let env = TestEnv::new(
            3,
            FakeOptions {
                expires_in: form,
                ..TestEnv::fast()
            },
        )
        .await;
        env.run()
            .await
            .unwrap_or_else(|e| panic!("{form:?}: {}", error_chain(&e)));
        // 300 s tokens (sent as a string, or assumed when missing): one token for the run.
        assert_eq!(token_requests(&env), (1, 1), "{form:?}");
    }
}

#[tokio::test]
async fn token_endpoint_outages_are_retried_with_a_fresh_jti_each_time() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            token_server_errors: 2,
            ..TestEnv::fast()
        },
    )
    .await;
    env.run().await.expect("the third token request succeeds");
    assert_eq!(token_requests(&env), (3, 1));
    let jtis: HashSet<String> = env
        .fake
        .received_assertions()
        .iter()
        .map(|a| {
            jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(a)
                .unwrap()
                .claims["jti"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(jtis.len(), 3, "every attempt carries a new jti");
}

#[tokio::test]
async fn a_token_endpoint_that_stays_down_is_a_retryable_failure() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            token_server_errors: 100,
            ..TestEnv::fast()
        },
    )
    .await;
    let failed = env
        .run()
        .await
        .expect_err("the token endpoint never answers");
    assert!(failed.error.is_retryable(), "{}", error_chain(&failed));
    assert!(
        error_chain(&failed).contains("503"),
        "{}",
        error_chain(&failed)
    );
    // Three tries of the token request, in its own loop; the kick-off step does not retry
    // them again (retries never multiply across layers).
    assert_eq!(token_requests(&env), (3, 0));
}

#[tokio::test]
async fn a_refused_key_is_fatal_and_names_the_kid() {
    let mut env = TestEnv::new(3, TestEnv::fast()).await;
    let other = fhir_sync::smart::generate(fhir_sync::smart::SigningAlgorithm::RS384).unwrap();
    env.job.auth.key = fhir_sync::config::KeySource::Inline(other.clone());
    let kid = fhir_sync::smart::SigningKey::from_pem(
        &other,
        fhir_sync::smart::SigningAlgorithm::RS384,
        None,
        "t",
    )
    .unwrap()
    .kid()
    .to_string();
    let failed = env.run().await.expect_err("refused");
    let message = error_chain(&failed);
    assert!(!failed.error.is_retryable());
    assert!(
        message.contains("invalid_client") && message.contains(&kid),
        "{message}"
    );
    assert!(
        !message.contains(other.expose_secret().lines().nth(1).unwrap()),
        "no key material in errors"
    );
    assert_eq!(token_requests(&env), (1, 0), "fatal errors are not retried");
}

#[tokio::test]
async fn a_client_without_backend_access_is_fatal_with_a_hint() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            deny_backend_access: true,
            ..TestEnv::fast()
        },
    )
    .await;
    let failed = env.run().await.expect_err("unauthorized_client");
    let message = error_chain(&failed);
    assert!(!failed.error.is_retryable(), "{message}");
    assert!(message.contains("unauthorized_client"), "{message}");
    assert!(
        message.contains("ask the EHR to enable backend access"),
        "{message}"
    );
    assert!(
        message.contains("fhir-sync-demo"),
        "the hint names the client id: {message}"
    );
    assert_eq!(token_requests(&env), (1, 0), "fatal errors are not retried");
}

#[tokio::test]
async fn scopes_the_server_never_grants_are_fatal_with_a_hint() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            grantable_types: Some(vec!["Medication".into()]),
            ..TestEnv::fast()
        },
    )
    .await;
    let failed = env.run().await.expect_err("invalid_scope");
    let message = error_chain(&failed);
    assert!(!failed.error.is_retryable());
    assert!(
        message.contains("invalid_scope")
            && message.contains("system/Patient.read")
            && message.contains("auth.scopes"),
        "{message}"
    );
}

#[tokio::test]
async fn a_narrower_grant_fails_the_run_by_default() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            grantable_types: Some(vec!["Patient".into(), "Condition".into()]),
            ..TestEnv::fast()
        },
    )
    .await;
    let failed = env.run().await.expect_err("missing scopes fail the run");
    let message = error_chain(&failed);
    assert!(
        message.contains("Encounter")
            && message.contains("Observation")
            && message.contains("on_missing_scope"),
        "{message}"
    );
    assert!(
        !env.fake
            .requests()
            .iter()
            .any(|r| r.path.ends_with("$export")),
        "nothing is exported before the scopes are settled"
    );
}

#[tokio::test]
async fn a_narrower_grant_drops_types_when_the_job_says_so() {
    let mut env = TestEnv::new(
        3,
        FakeOptions {
            grantable_types: Some(vec!["Patient".into(), "Condition".into()]),
            ..TestEnv::fast()
        },
    )
    .await;
    env.job.auth.on_missing_scope = MissingScopePolicy::Drop;
    env.run().await.expect("the covered types are exported");
    let kick_off = env
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("$export"))
        .unwrap();
    assert_eq!(kick_off.query.as_deref(), Some("_type=Patient%2CCondition"));
    let types: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT resource_type FROM fhir_sync.resource ORDER BY 1")
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(types, ["Condition", "Patient"]);
}
