//! Client keys for SMART Backend Services: loading a private key, signing the one-time client
//! assertion, publishing the public JWKS, and generating new key pairs.
//!
//! Private key material stays inside [`SigningKey`] (whose `Debug` is redacted) and the PEM
//! strings handed out by [`generate`] are `SecretString`s. Nothing here logs.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyOperations, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::config::KeySource;

/// The two algorithms SMART requires a client to support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlgorithm {
    RS384,
    ES384,
}

impl SigningAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            SigningAlgorithm::RS384 => Algorithm::RS384,
            SigningAlgorithm::ES384 => Algorithm::ES384,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::RS384 => "RS384",
            SigningAlgorithm::ES384 => "ES384",
        }
    }
}

impl FromStr for SigningAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "RS384" => Ok(SigningAlgorithm::RS384),
            "ES384" => Ok(SigningAlgorithm::ES384),
            other => Err(format!(
                "{other:?} is not supported (use \"RS384\" or \"ES384\")"
            )),
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key could not be loaded. Messages name the file or variable, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read private key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "private key file {path} is accessible by group or others (mode {mode:o}); hint: chmod 600 {path}"
    )]
    Permissions { path: String, mode: u32 },
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("the job has no private key (auth.method is not private_key_jwt)")]
    NotConfigured,
    #[error("{origin} does not hold {expected}")]
    WrongKind {
        origin: String,
        expected: &'static str,
    },
    #[error("cannot sign with the key from {origin}: {message}")]
    Sign { origin: String, message: String },
}

/// A loaded private key with its `kid` and public JWK.
pub struct SigningKey {
    algorithm: SigningAlgorithm,
    kid: String,
    encoding: EncodingKey,
    public: Jwk,
    /// Sent as the `jku` header when set: the JWKS URL registered with the EHR.
    jku: Option<String>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    jti: String,
}

/// Lifetime of a client assertion. SMART caps `exp` at five minutes ahead; staying a minute
/// under leaves room for clock skew between us and the authorization server.
const ASSERTION_LIFETIME_SECONDS: i64 = 240;

impl SigningKey {
    /// Loads the key from its configured source. `kid` defaults to the RFC 7638 thumbprint.
    pub fn load(
        source: &KeySource,
        algorithm: SigningAlgorithm,
        kid: Option<String>,
    ) -> Result<Self, KeyError> {
        let (pem, origin) = match source {
            KeySource::File(path) => {
                check_private(path)?;
                let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                (SecretString::from(text), path.display().to_string())
            }
            KeySource::Env(var) => {
                let text = std::env::var(var).map_err(|_| KeyError::EnvMissing(var.clone()))?;
                (
                    SecretString::from(text),
                    format!("environment variable {var}"),
                )
            }
            KeySource::Inline(pem) => (pem.clone(), "the built-in key".to_string()),
            KeySource::NotNeeded => return Err(KeyError::NotConfigured),
        };
        Self::from_text(&pem, algorithm, kid, &origin)
    }

    /// Builds a key from PEM text or a private JWK (what some key tools and vaults hand out),
    /// recognised by its leading `{` and converted to PKCS#8 in memory. A JWK's own `kid` is
    /// used when `kid` is not given.
    pub fn from_text(
        text: &SecretString,
        algorithm: SigningAlgorithm,
        kid: Option<String>,
        origin: &str,
    ) -> Result<Self, KeyError> {
        if text.expose_secret().trim_start().starts_with('{') {
            let (pem, jwk_kid) = jwk_to_pem(text, algorithm, origin)?;
            return Self::from_pem(&pem, algorithm, kid.or(jwk_kid), origin);
        }
        Self::from_pem(text, algorithm, kid, origin)
    }

    /// Builds a key from PEM text; `origin` names where it came from in error messages.
    pub fn from_pem(
        pem: &SecretString,
        algorithm: SigningAlgorithm,
        kid: Option<String>,
        origin: &str,
    ) -> Result<Self, KeyError> {
        let bytes = pem.expose_secret().as_bytes();
        let (encoding, expected) = match algorithm {
            SigningAlgorithm::RS384 => (
                EncodingKey::from_rsa_pem(bytes),
                "an RSA private key in PEM (PKCS#1 or PKCS#8)",
            ),
            SigningAlgorithm::ES384 => (
                EncodingKey::from_ec_pem(bytes),
                "a P-384 EC private key in PKCS#8 PEM",
            ),
        };
        let wrong_kind = || KeyError::WrongKind {
            origin: origin.to_string(),
            expected,
        };
        let encoding = encoding.map_err(|_| wrong_kind())?;
        let mut public =
            Jwk::from_encoding_key(&encoding, algorithm.jwt()).map_err(|_| wrong_kind())?;
        let kid = match kid {
            Some(kid) => kid,
            None => public
                .thumbprint(ThumbprintHash::SHA256)
                .map_err(|_| wrong_kind())?,
        };
        public.common.key_id = Some(kid.clone());
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        public.common.key_operations = Some(vec![KeyOperations::Verify]);
        let key = SigningKey {
            algorithm,
            kid,
            encoding,
            public,
            jku: None,
        };
        // Sign once now: a key that parses but cannot sign (wrong curve, truncated) should fail
        // at load time, not at the first token request.
        key.sign_assertion("probe", "https://probe.invalid/token")
            .map_err(|e| KeyError::Sign {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        Ok(key)
    }

    /// Sends `jku` (the JWKS URL registered with the EHR) in every assertion header. SMART
    /// requires it to equal the registered URL exactly, so it is only sent when configured.
    pub fn with_jku(mut self, jku: Option<String>) -> Self {
        self.jku = jku;
        self
    }

    /// The public JWK (with `kid`, `use: sig`, `key_ops: [verify]`).
    pub fn public_jwk(&self) -> &Jwk {
        &self.public
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    /// The public key as a JWK Set, ready to register with an EHR.
    pub fn public_jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.public.clone()],
        }
    }

    /// Signs a fresh client assertion for one token request: `iss` = `sub` = client id,
    /// `aud` = the token URL, a new random `jti` every call, `exp` four minutes ahead.
    pub fn sign_assertion(
        &self,
        client_id: &str,
        token_url: &str,
    ) -> Result<SecretString, jsonwebtoken::errors::Error> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: token_url,
            exp: now + ASSERTION_LIFETIME_SECONDS,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(self.algorithm.jwt());
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid.clone());
        header.jku = self.jku.clone();
        jsonwebtoken::encode(&header, &claims, &self.encoding).map(SecretString::from)
    }
}

/// Converts a private JWK (RSA with `p`, `q`, `e`; or EC P-384 with `d`) to PKCS#8 PEM,
/// returning its `kid` if it has one. Errors name the origin, never key material.
fn jwk_to_pem(
    text: &SecretString,
    algorithm: SigningAlgorithm,
    origin: &str,
) -> Result<(SecretString, Option<String>), KeyError> {
    use pkcs8::EncodePrivateKey;
    let expected = match algorithm {
        SigningAlgorithm::RS384 => "a private RSA JWK (kty RSA with e, p and q)",
        SigningAlgorithm::ES384 => "a private EC JWK (kty EC, crv P-384, with d)",
    };
    let wrong_kind = || KeyError::WrongKind {
        origin: origin.to_string(),
        expected,
    };
    let jwk: serde_json::Value =
        serde_json::from_str(text.expose_secret()).map_err(|_| wrong_kind())?;
    let field = |name: &str| {
        jwk.get(name)
            .and_then(serde_json::Value::as_str)
            .and_then(decode_base64url)
            .ok_or_else(wrong_kind)
    };
    let kid = jwk
        .get("kid")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let pem = match (
        algorithm,
        jwk.get("kty").and_then(serde_json::Value::as_str),
    ) {
        (SigningAlgorithm::RS384, Some("RSA")) => {
            let uint = |bytes: Vec<u8>| rsa::BoxedUint::from_be_slice_vartime(&bytes);
            let key =
                rsa::PrivateKey::from_p_q(uint(field("p")?), uint(field("q")?), uint(field("e")?))
                    .map_err(|_| wrong_kind())?;
            key.to_pkcs8_pem(pkcs8::LineEnding::LF)
                .map_err(|_| wrong_kind())?
        }
        (SigningAlgorithm::ES384, Some("EC"))
            if jwk.get("crv").and_then(serde_json::Value::as_str) == Some("P-384") =>
        {
            let key = p384::SecretKey::from_slice(&field("d")?).map_err(|_| wrong_kind())?;
            key.to_pkcs8_pem(pkcs8::LineEnding::LF)
                .map_err(|_| wrong_kind())?
        }
        _ => return Err(wrong_kind()),
    };
    Ok((SecretString::from(pem.as_str()), kid))
}

/// Base64url, as JWK members are encoded (unpadded, though padding is tolerated); `None` for
/// anything else.
fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    URL_SAFE.decode(text).ok()
}

/// The public JWK set of several keys (the active one and those published for rotation),
/// refusing duplicate `kid`s: SMART servers fail verification when more than one key matches.
pub fn publish_jwks(keys: &[SigningKey]) -> Result<JwkSet, String> {
    let mut seen = std::collections::HashSet::new();
    for key in keys {
        if !seen.insert(key.kid()) {
            return Err(format!(
                "two keys share kid {:?}; every key needs its own kid",
                key.kid()
            ));
        }
    }
    Ok(JwkSet {
        keys: keys.iter().map(|k| k.public.clone()).collect(),
    })
}

/// Generates a new private key (RSA 3072 for RS384, P-384 for ES384) as PKCS#8 PEM.
pub fn generate(algorithm: SigningAlgorithm) -> anyhow::Result<SecretString> {
    use pkcs8::EncodePrivateKey;
    let pem = match algorithm {
        SigningAlgorithm::RS384 => {
            use rsa::Generate;
            rsa::PrivateKey::generate().to_pkcs8_pem(pkcs8::LineEnding::LF)?
        }
        SigningAlgorithm::ES384 => {
            use p384::elliptic_curve::Generate;
            p384::SecretKey::generate().to_pkcs8_pem(pkcs8::LineEnding::LF)?
        }
    };
    Ok(SecretString::from(pem.as_str()))
}

/// Refuses a key file that group or others may access, as ssh does: such a key may have been
/// read by someone else already, and using it silently hides that.
fn check_private(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

/// Writes `pem` to `path` readable by the owner only (mode 0600, also when it replaces an
/// existing file, whose mode `open` would keep), refusing to overwrite unless `overwrite` is
/// set.
pub fn write_private_key(path: &Path, pem: &SecretString, overwrite: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path)?;
    // Before any byte is written: an existing file keeps its old mode through `open`.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(pem.expose_secret().as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn round_trip(algorithm: SigningAlgorithm) {
        let pem = generate(algorithm).unwrap();
        let key = SigningKey::from_pem(&pem, algorithm, None, "test").unwrap();
        let jwks = key.public_jwks();
        let jwk = &jwks.keys[0];
        assert_eq!(jwk.common.key_id.as_deref(), Some(key.kid()));
        let assertion = key
            .sign_assertion("client-1", "https://auth.example.org/token")
            .unwrap();
        let header = jsonwebtoken::decode_header(assertion.expose_secret()).unwrap();
        assert_eq!(header.kid.as_deref(), Some(key.kid()));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let mut validation = Validation::new(algorithm.jwt());
        validation.set_audience(&["https://auth.example.org/token"]);
        validation.set_issuer(&["client-1"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            assertion.expose_secret(),
            &DecodingKey::from_jwk(jwk).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "client-1");
        let exp = data.claims["exp"].as_i64().unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(exp > now && exp - now <= 300);
        let second = key
            .sign_assertion("client-1", "https://auth.example.org/token")
            .unwrap();
        let jti = |a: &SecretString| {
            jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(a.expose_secret())
                .unwrap()
                .claims["jti"]
                .clone()
        };
        assert_ne!(
            jti(&assertion),
            jti(&second),
            "every assertion needs a fresh jti"
        );
    }

    #[test]
    fn rs384_round_trip() {
        round_trip(SigningAlgorithm::RS384);
    }

    #[test]
    fn es384_round_trip() {
        round_trip(SigningAlgorithm::ES384);
    }

    fn base64url(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn private_jwks_load_like_pem() {
        use pkcs8::DecodePrivateKey;
        use rsa::traits::{PrivateKeyParts, PublicKeyParts};
        // EC: the JWK's kid is used when the job sets none.
        let pem = generate(SigningAlgorithm::ES384).unwrap();
        let secret = p384::SecretKey::from_pkcs8_pem(pem.expose_secret()).unwrap();
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "ec-from-jwk", "d": base64url(&secret.to_bytes())});
        let from_jwk = SigningKey::from_text(
            &SecretString::from(jwk.to_string()),
            SigningAlgorithm::ES384,
            None,
            "k.json",
        )
        .unwrap();
        let from_pem = SigningKey::from_pem(
            &pem,
            SigningAlgorithm::ES384,
            Some("ec-from-jwk".into()),
            "k.pem",
        )
        .unwrap();
        assert_eq!(from_jwk.kid(), "ec-from-jwk");
        assert_eq!(from_jwk.public_jwks(), from_pem.public_jwks());

        // RSA from p, q and e.
        let pem = generate(SigningAlgorithm::RS384).unwrap();
        let key = rsa::PrivateKey::from_pkcs8_pem(pem.expose_secret()).unwrap();
        let primes = key.primes();
        let jwk = serde_json::json!({
            "kty": "RSA",
            "e": base64url(&key.e().to_be_bytes_trimmed_vartime()),
            "p": base64url(&primes[0].as_ref().to_be_bytes_trimmed_vartime()),
            "q": base64url(&primes[1].as_ref().to_be_bytes_trimmed_vartime()),
        });
        let from_jwk = SigningKey::from_text(
            &SecretString::from(jwk.to_string()),
            SigningAlgorithm::RS384,
            None,
            "k.json",
        )
        .unwrap();
        let from_pem = SigningKey::from_pem(&pem, SigningAlgorithm::RS384, None, "k.pem").unwrap();
        assert_eq!(from_jwk.public_jwks(), from_pem.public_jwks());

        // A public JWK, or one of the other algorithm, is named without key material.
        let public = serde_json::json!({"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"});
        let err = SigningKey::from_text(
            &SecretString::from(public.to_string()),
            SigningAlgorithm::ES384,
            None,
            "pub.json",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("pub.json") && err.to_string().contains("private EC JWK"),
            "{err}"
        );
        let err = SigningKey::from_text(
            &SecretString::from(jwk.to_string()),
            SigningAlgorithm::ES384,
            None,
            "rsa.json",
        )
        .unwrap_err();
        assert!(
            !err.to_string().contains(jwk["p"].as_str().unwrap()),
            "{err}"
        );
    }

    #[test]
    fn wrong_kind_of_key_is_named_without_key_material() {
        let ec = generate(SigningAlgorithm::ES384).unwrap();
        let err =
            SigningKey::from_pem(&ec, SigningAlgorithm::RS384, None, "keys/x.pem").unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("keys/x.pem") && message.contains("RSA"),
            "{message}"
        );
        assert!(!message.contains("PRIVATE KEY"));
        let debug = format!(
            "{:?}",
            SigningKey::from_pem(&ec, SigningAlgorithm::ES384, None, "t").unwrap()
        );
        assert!(
            !debug.contains("PRIVATE") && !debug.contains("encoding"),
            "{debug}"
        );
    }
}
