//! No private key, client assertion or access token ever reaches a log line, at any level.

use secrecy::ExposeSecret;

use crate::helpers::{Captured, TestEnv};

// A current-thread runtime: the fake server, the client and the connection tasks all run on
// this thread, so the thread-local subscriber sees every event of every crate.
#[tokio::test(flavor = "current_thread")]
async fn a_full_sync_logs_no_secret_at_trace_level() {
    let (capture, _logs) = Captured::start(tracing::Level::TRACE);

    let env = TestEnv::new(10, TestEnv::fast()).await;
    env.run().await.expect("sync succeeds");

    let logs = capture.text();
    assert!(
        logs.contains("run succeeded"),
        "the capture works and saw the run"
    );
    assert!(
        logs.lines().count() > 20,
        "trace level produces plenty of lines"
    );

    let mut secrets: Vec<String> = Vec::new();
    // Every base64 line of the PEM body (the header lines are not secret).
    secrets.extend(
        env.key_pem
            .expose_secret()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_owned),
    );
    let assertions = env.fake.received_assertions();
    assert!(!assertions.is_empty());
    for assertion in &assertions {
        secrets.push(assertion.clone());
        // The signature part alone must not leak either.
        secrets.push(assertion.rsplit('.').next().unwrap().to_string());
    }
    let tokens = env.fake.issued_tokens();
    assert!(!tokens.is_empty());
    secrets.extend(tokens);
    for secret in secrets {
        assert!(
            !logs.contains(&secret),
            "a secret leaked into the logs: {}…",
            &secret[..8.min(secret.len())]
        );
    }
    assert!(
        !logs.contains("Bearer "),
        "no Authorization header value in logs"
    );
}
