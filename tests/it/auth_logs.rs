//! No log line of a run carries a token, an assertion, a client secret or key material, even
//! at TRACE level and through renewals, 401s and redirects.

use fhir_sync::fake::FakeOptions;
use secrecy::ExposeSecret;

use crate::helpers::{Captured, TestEnv};

// The default current-thread runtime, so the subscriber set for this thread sees the client and
// the fake server alike.
#[tokio::test]
async fn no_log_line_carries_a_secret() {
    let (captured, _logs) = Captured::start(tracing::Level::TRACE);

    let mut env = TestEnv::new(
        10,
        FakeOptions {
            unauthorized_responses: 1,
            revoke_tokens_after_requests: Some(4),
            token_server_errors: 1,
            ..TestEnv::fast()
        },
    )
    .await;
    let other = env.fake.start_other_origin().await.unwrap();
    env.fake.redirect_files_to(&other);
    // Plain http on another loopback port: followed only because the job lists the origin.
    env.job.fhir.file_origins = vec![other.origin().clone()];
    env.run().await.expect("the run succeeds");

    let logs = captured.text();
    assert!(
        logs.contains("access token refused by the server, renewing"),
        "renewals are logged"
    );
    assert!(logs.contains("token request failed, retrying"));
    let tokens = env.fake.issued_tokens();
    assert!(tokens.len() >= 2);
    for secret in tokens.iter().chain(env.fake.received_assertions().iter()) {
        assert!(
            !logs.contains(secret.as_str()),
            "a token or assertion reached the logs"
        );
    }
    let key_body: String = env
        .key_pem
        .expose_secret()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(!logs.contains(&key_body), "key material reached the logs");
    assert!(
        !logs.contains("presigned="),
        "presigned query strings reached the logs"
    );
    assert!(
        !logs.to_lowercase().contains("bearer "),
        "an Authorization value reached the logs"
    );
}
