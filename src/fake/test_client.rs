//! The client side of SMART Backend Services, reduced to what the fake server's own tests need:
//! throwaway signing keys, hand-built client assertions (including deliberately wrong ones),
//! and token and export requests over reqwest.
//!
//! It exists only under `cfg(test)` and must not grow into a second client: the real one lives in
//! `smart` and `bulk`. Keys are generated per test process, never stored in the repository.

use std::sync::LazyLock;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pkcs8::EncodePrivateKey;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::{Dataset, FakeFhirServer, FakeOptions};

pub(crate) const CLIENT_ID: &str = "fhir-sync-test";
pub(crate) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Two RSA keys (one to register, one playing an attacker's), generated once per test process
/// because 3072-bit generation takes a noticeable fraction of a second each.
static RSA_PEMS: LazyLock<[String; 2]> = LazyLock::new(|| {
    std::array::from_fn(|_| {
        use rsa::Generate;
        let key = rsa::PrivateKey::generate();
        key.to_pkcs8_pem(pkcs8::LineEnding::LF)
            .expect("a fresh rsa key encodes as pkcs8")
            .to_string()
    })
});

/// A private key with its kid and algorithm, and the public JWK a client would register.
pub(crate) struct TestKey {
    pub(crate) alg: Algorithm,
    pub(crate) kid: String,
    encoding: EncodingKey,
    pub(crate) jwk: Jwk,
}

impl TestKey {
    /// The first (`which == 0`) or second test RSA key, under `kid`.
    pub(crate) fn rsa(which: usize, kid: &str) -> TestKey {
        let encoding = EncodingKey::from_rsa_pem(RSA_PEMS[which].as_bytes()).expect("rsa pem");
        TestKey::new(Algorithm::RS384, kid, encoding)
    }

    /// A fresh P-384 key under `kid`.
    pub(crate) fn ec(kid: &str) -> TestKey {
        use p384::elliptic_curve::Generate;
        let secret = p384::SecretKey::generate();
        let pem = secret
            .to_pkcs8_pem(pkcs8::LineEnding::LF)
            .expect("a fresh p-384 key encodes as pkcs8");
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).expect("ec pem");
        TestKey::new(Algorithm::ES384, kid, encoding)
    }

    fn new(alg: Algorithm, kid: &str, encoding: EncodingKey) -> TestKey {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("public jwk");
        jwk.common.key_id = Some(kid.to_string());
        TestKey {
            alg,
            kid: kid.to_string(),
            encoding,
            jwk,
        }
    }

    pub(crate) fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.jwk.clone()],
        }
    }

    /// Signs `claims` with the usual header (`alg`, `kid`, `typ: JWT`).
    pub(crate) fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        self.sign_with_header(&header, claims)
    }

    pub(crate) fn sign_with_header(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding).expect("signing an assertion")
    }
}

/// Claims a well-behaved client would send: `exp` two minutes ahead and a fresh `jti`.
pub(crate) fn good_claims(server: &FakeFhirServer) -> Value {
    claims(CLIENT_ID, server.token_url().as_str(), 120)
}

pub(crate) fn claims(client_id: &str, aud: &str, exp_in_seconds: i64) -> Value {
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": OffsetDateTime::now_utc().unix_timestamp() + exp_in_seconds,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

/// POSTs a token request with the four required parameters.
pub(crate) async fn post_token(
    http: &reqwest::Client,
    server: &FakeFhirServer,
    assertion: &str,
    scope: &str,
) -> reqwest::Response {
    http.post(server.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("scope", scope),
        ])
        .send()
        .await
        .expect("token request")
}

/// A started server with `CLIENT_ID` registered under a fresh ES384 key (cheap to make), and
/// a way to get tokens for it.
pub(crate) struct Harness {
    pub(crate) server: FakeFhirServer,
    pub(crate) key: TestKey,
    pub(crate) http: reqwest::Client,
}

impl Harness {
    pub(crate) async fn start(dataset: Dataset, options: FakeOptions) -> Harness {
        let server = FakeFhirServer::start(dataset, options)
            .await
            .expect("fake server starts");
        let key = TestKey::ec("harness-es384");
        server.register_client(CLIENT_ID, key.jwks());
        Harness {
            server,
            key,
            http: reqwest::Client::new(),
        }
    }

    /// A fresh access token with `scope`.
    pub(crate) async fn token_with_scope(&self, scope: &str) -> String {
        let assertion = self.key.sign(&good_claims(&self.server));
        let response = post_token(&self.http, &self.server, &assertion, scope).await;
        assert_eq!(response.status(), 200, "token request should succeed");
        let body: Value = response.json().await.expect("token json");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    pub(crate) async fn token(&self) -> String {
        self.token_with_scope("system/*.read").await
    }

    /// `GET {base}/{path_and_query}` with the kick-off headers and `token`.
    pub(crate) async fn kick_off(&self, path_and_query: &str, token: &str) -> reqwest::Response {
        self.kick_off_with(
            path_and_query,
            Some("application/fhir+json"),
            Some("respond-async"),
            Some(token),
        )
        .await
    }

    /// A kick-off with the given headers, any of which may be left out.
    pub(crate) async fn kick_off_with(
        &self,
        path_and_query: &str,
        accept: Option<&str>,
        prefer: Option<&str>,
        token: Option<&str>,
    ) -> reqwest::Response {
        let url = format!("{}/{path_and_query}", self.server.fhir_base_url());
        let mut request = self.http.get(url);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        if let Some(prefer) = prefer {
            request = request.header("prefer", prefer);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("kick-off request")
    }

    /// `DELETE url` with `token`.
    pub(crate) async fn delete(&self, url: &str, token: &str) -> reqwest::Response {
        self.http
            .delete(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("delete request")
    }

    pub(crate) async fn get(&self, url: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("get request")
    }
}
