//! Discovery as real servers offer it: `.well-known` first, the CapabilityStatement for SMART
//! 1.0 servers, the signing algorithm and scope style chosen from what is advertised, the
//! `fhir.token_url` override, and the advisory export-operation check.

use fhir_sync::config::{ExportLevel, KeyConfig, KeySource, ScopeStyle};
use fhir_sync::fake::FakeOptions;
use fhir_sync::smart::{self, ExportSupport, SigningAlgorithm, SigningKey};
use fhir_sync::sync::error_chain;
use fhir_sync::transport::{self, HttpOptions};

use crate::helpers::TestEnv;

fn http() -> reqwest::Client {
    transport::client(HttpOptions {
        connect_timeout: std::time::Duration::from_secs(5),
        read_timeout: std::time::Duration::from_secs(30),
        allow_insecure_http: false,
    })
    .unwrap()
}

fn statuses(env: &TestEnv, path_end: &str) -> Vec<u16> {
    env.fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(path_end))
        .map(|r| r.status)
        .collect()
}

#[tokio::test]
async fn well_known_is_used_first() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    let prepared = smart::prepare(&http(), &env.job).await.unwrap();
    assert_eq!(prepared.token_url.as_ref(), Some(&env.fake.token_url()));
    assert_eq!(statuses(&env, "/.well-known/smart-configuration"), [200]);
    assert!(statuses(&env, "/metadata").is_empty(), "no fallback needed");
}

#[tokio::test]
async fn the_capability_statement_serves_servers_without_well_known() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            serve_smart_configuration: false,
            ..TestEnv::fast()
        },
    )
    .await;
    env.run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(statuses(&env, "/.well-known/smart-configuration"), [404]);
    assert_eq!(statuses(&env, "/metadata")[0], 200);
    assert!(env.fake.token_attempts()[0].outcome.is_ok());
}

#[tokio::test]
async fn the_algorithm_comes_from_the_advertised_list() {
    // The active key is RS384, the server accepts only ES384, and the job also publishes an
    // ES384 key: that one signs.
    let mut env = TestEnv::new(
        3,
        FakeOptions {
            signing_algorithms: vec!["ES384".into()],
            ..TestEnv::fast()
        },
    )
    .await;
    let rsa = SigningKey::from_pem(&env.key_pem, SigningAlgorithm::RS384, None, "t").unwrap();
    let ec_pem = smart::generate(SigningAlgorithm::ES384).unwrap();
    let ec = SigningKey::from_pem(&ec_pem, SigningAlgorithm::ES384, None, "t").unwrap();
    env.fake
        .register_client("fhir-sync-demo", smart::publish_jwks(&[rsa, ec]).unwrap());
    env.job.auth.extra_keys.push(KeyConfig {
        key: KeySource::Inline(ec_pem.clone()),
        algorithm: SigningAlgorithm::ES384,
        key_id: None,
    });
    let ec_kid = SigningKey::from_pem(&ec_pem, SigningAlgorithm::ES384, None, "t")
        .unwrap()
        .kid()
        .to_string();
    env.run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let attempts = env.fake.token_attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].kid.as_deref(), Some(ec_kid.as_str()));
    assert!(attempts[0].outcome.is_ok());
}

#[tokio::test]
async fn an_unadvertised_algorithm_is_still_tried_and_its_refusal_explained() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            signing_algorithms: vec!["ES384".into()],
            ..TestEnv::fast()
        },
    )
    .await;
    let prepared = smart::prepare(&http(), &env.job).await.unwrap();
    assert!(
        prepared
            .notes
            .iter()
            .any(|n| n.contains("ES384") && n.contains("RS384")),
        "{:?}",
        prepared.notes
    );
    let failed = env.run().await.expect_err("the server refuses RS384");
    assert!(
        error_chain(&failed).contains("alg RS384 is not accepted"),
        "{}",
        error_chain(&failed)
    );
}

#[tokio::test]
async fn v2_scopes_for_a_server_that_only_speaks_v2() {
    let mut env = TestEnv::new(
        3,
        FakeOptions {
            capabilities: vec![
                "client-confidential-asymmetric".into(),
                "permission-v2".into(),
            ],
            ..TestEnv::fast()
        },
    )
    .await;
    let prepared = smart::prepare(&http(), &env.job).await.unwrap();
    assert_eq!(prepared.scope_style, ScopeStyle::V2);
    assert!(prepared.tokens.scopes().iter().all(|s| s.ends_with(".rs")));
    env.run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));

    // Forcing v1 against it is the job's choice, and the server refuses it.
    env.job.auth.scope_style = ScopeStyle::V1;
    let failed = env.run().await.expect_err("v1 scopes are not granted");
    assert!(
        error_chain(&failed).contains("invalid_scope"),
        "{}",
        error_chain(&failed)
    );
}

#[tokio::test]
async fn v1_scopes_when_the_server_offers_both_or_says_nothing() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    let prepared = smart::prepare(&http(), &env.job).await.unwrap();
    assert_eq!(prepared.scope_style, ScopeStyle::V1);
    assert_eq!(
        prepared.tokens.scopes(),
        [
            "system/Patient.read",
            "system/Encounter.read",
            "system/Observation.read",
            "system/Condition.read"
        ]
    );
}

#[tokio::test]
async fn the_token_url_override_wins_over_discovery() {
    let mut env = TestEnv::new(3, TestEnv::fast()).await;
    let elsewhere = url::Url::parse("http://127.0.0.1:9/elsewhere/token").unwrap();
    env.job.fhir.token_url = Some(elsewhere.clone());
    let prepared = smart::prepare(&http(), &env.job).await.unwrap();
    assert_eq!(prepared.token_url, Some(elsewhere));
    // Discovery still informed the choices.
    assert!(prepared.discovered.is_some());
}

#[tokio::test]
async fn a_missing_export_operation_is_reported_but_not_fatal() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            declare_export: false,
            ..TestEnv::fast()
        },
    )
    .await;
    for (level, what) in [
        (ExportLevel::System, "[base]/$export"),
        (ExportLevel::Patient, "Patient/$export"),
        (ExportLevel::Group, "Group/[id]/$export"),
    ] {
        match smart::export_support(&http(), &env.fake.fhir_base_url(), level, "test").await {
            ExportSupport::NotDeclared(message) => assert!(message.contains(what), "{message}"),
            other => panic!("{level:?}: {other:?}"),
        }
    }
    env.run()
        .await
        .expect("the advisory check does not stop the run");

    let declared = TestEnv::new(1, TestEnv::fast()).await;
    assert_eq!(
        smart::export_support(
            &http(),
            &declared.fake.fhir_base_url(),
            ExportLevel::Group,
            "test"
        )
        .await,
        ExportSupport::Offered
    );
}
