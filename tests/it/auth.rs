//! The fake server's token endpoint is as strict as a real EHR's: these tests prove it refuses
//! what a real one refuses, so passing sync tests mean something.

use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions, TokenAttempt};
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::ExposeSecret;
use serde_json::json;

struct Rig {
    fake: FakeFhirServer,
    pem: secrecy::SecretString,
    kid: String,
}

async fn rig() -> Rig {
    let fake = FakeFhirServer::start(Dataset::new(1, 1), FakeOptions::default())
        .await
        .unwrap();
    let pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    let key = SigningKey::from_pem(&pem, SigningAlgorithm::RS384, None, "test").unwrap();
    fake.register_client("client-1", key.public_jwks());
    Rig {
        fake,
        pem,
        kid: key.kid().to_string(),
    }
}

fn assertion(pem: &secrecy::SecretString, kid: &str, claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS384);
    header.kid = Some(kid.to_string());
    header.typ = Some("JWT".into());
    let key = EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn claims(rig: &Rig, exp_offset: i64, jti: &str) -> serde_json::Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    json!({"iss": "client-1", "sub": "client-1", "aud": rig.fake.token_url().as_str(), "exp": now + exp_offset, "jti": jti})
}

/// POSTs a token request and returns (HTTP status, OAuth error code if any).
async fn request_token(rig: &Rig, assertion: &str) -> (u16, Option<String>) {
    let response = reqwest::Client::new()
        .post(rig.fake.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", "system/Patient.read"),
        ])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (status, body["error"].as_str().map(str::to_owned))
}

fn last_refusal(attempts: &[TokenAttempt]) -> String {
    attempts
        .last()
        .unwrap()
        .outcome
        .clone()
        .expect_err("the last attempt was refused")
        .description
}

#[tokio::test]
async fn a_valid_assertion_gets_a_token() {
    let rig = rig().await;
    let (status, error) =
        request_token(&rig, &assertion(&rig.pem, &rig.kid, claims(&rig, 240, "a"))).await;
    assert_eq!((status, error), (200, None));
}

#[tokio::test]
async fn an_assertion_signed_by_another_key_is_refused() {
    let rig = rig().await;
    let other = smart::generate(SigningAlgorithm::RS384).unwrap();
    // Same kid as the registered key, different key material.
    let (status, error) =
        request_token(&rig, &assertion(&other, &rig.kid, claims(&rig, 240, "b"))).await;
    assert_eq!(status, 401);
    assert_eq!(error.as_deref(), Some("invalid_client"));
    assert!(last_refusal(&rig.fake.token_attempts()).contains("signature"));
}

#[tokio::test]
async fn an_expired_assertion_is_refused() {
    let rig = rig().await;
    let (status, error) = request_token(
        &rig,
        &assertion(&rig.pem, &rig.kid, claims(&rig, -120, "c")),
    )
    .await;
    assert_eq!((status, error.as_deref()), (401, Some("invalid_client")));
    assert!(last_refusal(&rig.fake.token_attempts()).contains("exp"));
}

#[tokio::test]
async fn an_assertion_living_longer_than_five_minutes_is_refused() {
    let rig = rig().await;
    let (status, error) =
        request_token(&rig, &assertion(&rig.pem, &rig.kid, claims(&rig, 600, "d"))).await;
    assert_eq!((status, error.as_deref()), (401, Some("invalid_client")));
    assert!(last_refusal(&rig.fake.token_attempts()).contains("300"));
}

#[tokio::test]
async fn a_reused_jti_is_refused() {
    let rig = rig().await;
    let once = assertion(&rig.pem, &rig.kid, claims(&rig, 240, "same-jti"));
    assert_eq!(request_token(&rig, &once).await.0, 200);
    let (status, error) = request_token(&rig, &once).await;
    assert_eq!((status, error.as_deref()), (401, Some("invalid_client")));
    assert!(last_refusal(&rig.fake.token_attempts()).contains("jti"));
}

#[tokio::test]
async fn a_wrong_audience_is_refused() {
    let rig = rig().await;
    let mut wrong = claims(&rig, 240, "e");
    wrong["aud"] = json!(format!("{}/", rig.fake.token_url()));
    let (status, error) = request_token(&rig, &assertion(&rig.pem, &rig.kid, wrong)).await;
    assert_eq!((status, error.as_deref()), (401, Some("invalid_client")));
    assert!(last_refusal(&rig.fake.token_attempts()).contains("aud"));
}

#[tokio::test]
async fn fhir_endpoints_require_a_token() {
    let rig = rig().await;
    let url = format!("{}/$export", rig.fake.fhir_base_url());
    let response = reqwest::Client::new()
        .get(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
}
