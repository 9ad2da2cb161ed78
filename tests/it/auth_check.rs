//! `fhir-sync check <job>` and `fhir-sync keys jwks <job>` as an operator runs them, against a
//! fake server started in the test.

use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions};
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};

use crate::auth_support::JobDir;

const CLIENT: &str = "check-client";

/// A fake server and a job directory whose `demo` job holds a fresh RS384 key (registered
/// with the fake when `register` is set).
async fn rig(options: FakeOptions, register: bool) -> (FakeFhirServer, JobDir, SigningKey) {
    let fake = FakeFhirServer::start(Dataset::new(1, 3), options)
        .await
        .unwrap();
    let jobs = JobDir::new();
    let pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    smart::write_private_key(&jobs.path("key.pem"), &pem, true).unwrap();
    let key = SigningKey::from_pem(&pem, SigningAlgorithm::RS384, None, "t").unwrap();
    if register {
        fake.register_client(CLIENT, key.public_jwks());
    }
    jobs.write_job(
        "demo",
        &fake,
        &format!("client_id = \"{CLIENT}\"\nprivate_key_file = \"../key.pem\""),
    );
    (fake, jobs, key)
}

fn line<'a>(text: &'a str, check: &str) -> &'a str {
    text.lines()
        .find(|l| l.len() > 5 && l[5..].starts_with(check))
        .unwrap_or_else(|| panic!("no {check:?} line in:\n{text}"))
}

#[tokio::test]
async fn every_check_passes_against_the_demo_fake() {
    let (fake, jobs, key) = rig(FakeOptions::default(), true).await;
    let (ok, text) = jobs.run(&["check", "demo"]).await;
    assert!(ok, "{text}");
    for check in [
        "discovery",
        "algorithms",
        "token request",
        "granted scopes",
        "export operation",
        "authorised request",
    ] {
        assert!(line(&text, check).starts_with("PASS"), "{check}:\n{text}");
    }
    assert!(line(&text, "algorithms").contains(key.kid()), "{text}");
    assert!(text.contains("all checks passed"), "{text}");
    // The doctor made one authorised read and never started an export.
    let requests = fake.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/fhir/Patient" && r.status == 200 && r.had_authorization)
    );
    assert!(!requests.iter().any(|r| r.path.ends_with("$export")));
    for token in fake.issued_tokens() {
        assert!(!text.contains(&token), "a token was printed");
    }
}

#[tokio::test]
async fn a_rejected_key_fails_the_token_check_with_a_hint() {
    let (_fake, jobs, key) = rig(FakeOptions::default(), false).await;
    let (ok, text) = jobs.run(&["check", "demo"]).await;
    assert!(!ok, "{text}");
    assert!(line(&text, "discovery").starts_with("PASS"), "{text}");
    let token = line(&text, "token request");
    assert!(
        token.starts_with("FAIL") && token.contains("invalid_client"),
        "{text}"
    );
    let fix = text
        .lines()
        .skip_while(|l| !l.contains("token request"))
        .nth(1)
        .unwrap();
    assert!(
        fix.contains("fix:") && fix.contains(key.kid()) && fix.contains(CLIENT),
        "{text}"
    );
    assert!(line(&text, "granted scopes").starts_with("SKIP"), "{text}");
    assert!(text.contains("some checks failed"), "{text}");
}

#[tokio::test]
async fn missing_export_support_and_narrow_grants_are_reported() {
    let options = FakeOptions {
        declare_export: false,
        grantable_types: Some(vec!["Patient".into()]),
        ..FakeOptions::default()
    };
    let (_fake, jobs, _key) = rig(options, true).await;
    let (ok, text) = jobs.run(&["check", "demo"]).await;
    assert!(!ok, "{text}");
    let scopes = line(&text, "granted scopes");
    assert!(
        scopes.starts_with("FAIL") && scopes.contains("Condition"),
        "{text}"
    );
    let export = line(&text, "export operation");
    assert!(
        export.starts_with("WARN") && export.contains("$export"),
        "{text}"
    );
}

#[tokio::test]
async fn keys_jwks_publishes_every_key_of_the_job() {
    let fake = FakeFhirServer::start(Dataset::new(1, 1), FakeOptions::default())
        .await
        .unwrap();
    let jobs = JobDir::new();
    let mut kids = Vec::new();
    for (file, alg) in [
        ("old.pem", SigningAlgorithm::RS384),
        ("new.pem", SigningAlgorithm::ES384),
    ] {
        let pem = smart::generate(alg).unwrap();
        smart::write_private_key(&jobs.path(file), &pem, true).unwrap();
        kids.push(
            SigningKey::from_pem(&pem, alg, None, "t")
                .unwrap()
                .kid()
                .to_string(),
        );
    }
    jobs.write_job(
        "rotating",
        &fake,
        "client_id = \"c\"\nprivate_key_file = \"../old.pem\"\n[[auth.keys]]\nprivate_key_file = \"../new.pem\"\nalgorithm = \"ES384\"",
    );
    let (ok, text) = jobs.run(&["keys", "jwks", "rotating"]).await;
    assert!(ok, "{text}");
    let jwks: serde_json::Value = serde_json::from_str(&text).unwrap();
    let published: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(published, kids);
    assert!(
        !text.contains("PRIVATE") && !text.contains("\"d\""),
        "{text}"
    );
}
