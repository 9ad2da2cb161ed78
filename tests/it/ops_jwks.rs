//! The JWKS the ops HTTP server publishes for key rotation.

use std::sync::Arc;

use fhir_sync::config::{KeyConfig, KeySource};
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};

use crate::helpers::TestEnv;

#[tokio::test]
async fn every_key_of_every_signing_job_is_published_anonymously_with_a_cache_lifetime() {
    let env = TestEnv::new(1, TestEnv::fast()).await;
    let mut job = env.job.clone();
    // The next key of a rotation, published before it signs anything.
    let next_pem = smart::generate(SigningAlgorithm::ES384).unwrap();
    let next = SigningKey::from_pem(&next_pem, SigningAlgorithm::ES384, None, "next").unwrap();
    job.auth.extra_keys.push(KeyConfig {
        key: KeySource::Inline(next_pem),
        algorithm: SigningAlgorithm::ES384,
        key_id: None,
    });
    // A second job sharing the active key: its key appears once.
    let mut twin = env.job.clone();
    twin.name = "twin".into();
    let jwks = fhir_sync::ops::http::jwks_of(&[Arc::new(job), Arc::new(twin)]).unwrap();

    let ops = crate::helpers::JwksServer::start(&env.db.pool, jwks).await;
    let addr = ops.addr;
    let response = reqwest::get(format!("http://{addr}/.well-known/jwks.json"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["cache-control"], "public, max-age=300");
    let body: serde_json::Value = response.json().await.unwrap();
    let keys = body["keys"].as_array().unwrap();
    let active =
        SigningKey::from_pem(&env.key_pem, SigningAlgorithm::RS384, None, "active").unwrap();
    let kids: Vec<&str> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, [active.kid(), next.kid()]);
    for key in keys {
        assert!(
            key.get("d").is_none(),
            "no private part is published: {key}"
        );
    }
    assert_eq!(
        reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
    ops.stop().await;
}

#[tokio::test]
async fn two_different_keys_under_one_kid_are_refused() {
    let env = TestEnv::new(1, TestEnv::fast()).await;
    let mut other = env.job.clone();
    other.name = "other".into();
    let active =
        SigningKey::from_pem(&env.key_pem, SigningAlgorithm::RS384, None, "active").unwrap();
    other.auth.key = KeySource::Inline(smart::generate(SigningAlgorithm::RS384).unwrap());
    other.auth.key_id = Some(active.kid().to_string());
    let error =
        fhir_sync::ops::http::jwks_of(&[Arc::new(env.job.clone()), Arc::new(other)]).unwrap_err();
    assert!(error.contains("share kid"), "{error}");
}
