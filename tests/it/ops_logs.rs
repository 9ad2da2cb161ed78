//! The production log format (JSON, as `logging.format = "json"` writes it) at TRACE for every
//! target, through a sync that renews its token after a 401, retries 429s and downloads from
//! presigned URLs: no token, assertion, key, presigned query or resource body in any line, and
//! every line about a file carries the job, the run and the file.

use fhir_sync::config::LogFormat;
use fhir_sync::fake::{FakeOptions, Faults, RESOURCE_TYPES};
use secrecy::ExposeSecret;
use serde_json::Value;
use tracing_subscriber::EnvFilter;

use crate::helpers::{Captured, TestEnv};

/// Strings that occur only inside resource bodies of the fake's data set: names, record
/// numbers, phone numbers, clinical notes and timestamps of when things happened.
fn body_strings(env: &TestEnv) -> Vec<String> {
    let dataset = env.fake.dataset();
    let mut strings = Vec::new();
    for resource_type in RESOURCE_TYPES {
        for index in 0..dataset.count(resource_type) {
            let resource = dataset.resource(resource_type, index);
            let texts = [
                &resource["name"][0]["text"],
                &resource["identifier"][0]["value"],
                &resource["telecom"][0]["value"],
                &resource["note"][0]["text"],
                &resource["effectiveDateTime"],
                &resource["referenceRange"][0]["text"],
            ];
            strings.extend(
                texts
                    .into_iter()
                    .filter_map(Value::as_str)
                    // Quotes would be escaped in a JSON line; the rest of such a name is
                    // checked through its record number and phone.
                    .filter(|s| !s.contains('"'))
                    .map(str::to_owned),
            );
        }
    }
    strings
}

// The default current-thread runtime: the client, its connection tasks and the fake server all
// run on this thread, so the thread's subscriber sees every event of every crate.
#[tokio::test]
async fn json_logs_of_a_faulty_sync_carry_ids_and_no_secret_or_body() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = fhir_sync::ops::logging::subscriber(
        LogFormat::Json,
        EnvFilter::new("trace"),
        move || writer.clone(),
        false,
    );
    let _logs = crate::helpers::capture_with(subscriber);

    let mut env = TestEnv::new(
        10,
        FakeOptions {
            unauthorized_responses: 1,
            revoke_tokens_after_requests: Some(6),
            faults: Faults::default().kick_off_429(1).status_429(1).file_429(2),
            ..TestEnv::fast()
        },
    )
    .await;
    let other = env.fake.start_other_origin().await.unwrap();
    env.fake.redirect_files_to(&other);
    // Plain http on another loopback port: followed only because the job lists the origin.
    env.job.fhir.file_origins = vec![other.origin().clone()];
    let report = env
        .run()
        .await
        .expect("the run succeeds through its faults");

    let logs = captured.text();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 50, "TRACE gives plenty of lines");
    let said = |message: &str| lines.iter().any(|l| l["message"] == message);
    // The faults happened, so the lines about them are in what is checked below.
    assert!(said("access token refused by the server, renewing"));
    assert!(said("export kick-off refused for now, retrying"));
    assert!(said("file failed, retrying"));
    assert!(
        lines.iter().any(|l| l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("hyper") || t.starts_with("reqwest"))),
        "the HTTP stack's own TRACE lines are captured"
    );
    let tokens = env.fake.issued_tokens();
    assert!(tokens.len() >= 2, "the token was renewed: {}", tokens.len());
    let presigned: Vec<String> = env
        .fake
        .requests()
        .iter()
        .filter_map(|r| r.query.as_deref())
        .filter_map(|q| q.strip_prefix("presigned="))
        .map(str::to_owned)
        .collect();
    assert!(!presigned.is_empty(), "files came through presigned URLs");

    let mut secrets: Vec<(&str, String)> = Vec::new();
    secrets.extend(tokens.into_iter().map(|t| ("an access token", t)));
    for assertion in env.fake.received_assertions() {
        let signature = assertion.rsplit('.').next().unwrap().to_string();
        secrets.push(("a client assertion", assertion));
        secrets.push(("an assertion's signature", signature));
    }
    secrets.extend(
        env.key_pem
            .expose_secret()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(|l| ("private key material", l.to_string())),
    );
    secrets.extend(presigned.into_iter().map(|p| ("a presigned query", p)));
    let bodies = body_strings(&env);
    assert!(bodies.len() > 100, "{} body strings", bodies.len());
    secrets.extend(bodies.into_iter().map(|b| ("a resource body", b)));
    for (what, secret) in &secrets {
        // The message names the line's target, never the secret itself.
        if let Some(line) = logs.lines().find(|l| l.contains(secret.as_str())) {
            let line: Value = serde_json::from_str(line).unwrap();
            panic!(
                "{what} reached the logs: {} {}",
                line["target"], line["message"]
            );
        }
    }
    assert!(
        !logs.to_lowercase().contains("bearer "),
        "an Authorization value reached the logs"
    );

    // Every line about a file says which job, run and file it is about.
    let loaded: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "file loaded")
        .collect();
    assert_eq!(
        loaded.len(),
        report.output_files + report.error_files,
        "one line per file"
    );
    for line in &loaded {
        assert_eq!(line["run.id"], report.run_id, "{line}");
        assert_eq!(line["job.name"], "demo", "{line}");
        assert!(line["file.id"].is_i64(), "{line}");
        assert!(line["resource.type"].is_string(), "{line}");
    }
    let about_files: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("file.id").is_some())
        .collect();
    assert!(about_files.len() > loaded.len());
    for line in about_files {
        assert_eq!(line["run.id"], report.run_id, "{line}");
        assert_eq!(line["job.name"], "demo", "{line}");
    }
}
