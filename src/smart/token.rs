//! Access tokens: one [`TokenManager`] per job, shared by every request of a run.
//!
//! The manager caches the token, renews it ahead of `expires_in`, and lets only one renewal be
//! in flight: callers queue on one async mutex, and whoever holds it renews for everyone. After
//! a 401 a caller hands back the token that was refused; if nobody renewed it since, it is
//! renewed once. The token endpoint only ever receives the signed assertion (or, for
//! `client_secret_basic`, the client's own credentials), never a token. A job with
//! `auth.method = "none"` gets a manager that hands out an empty token and never renews.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::{AuthError, SigningKey};
use crate::metrics::{self, Endpoint, TokenReason};
use crate::{transport, untrusted};

/// A bearer token. `generation` tells tokens apart without comparing secrets. The secret is
/// absent for jobs that authenticate with `none`.
#[derive(Clone)]
pub struct AccessToken {
    secret: Option<SecretString>,
    generation: u64,
}

impl AccessToken {
    /// The header value `Bearer <token>`, or nothing when the job sends no token. Only for
    /// building a request; never log it.
    pub(crate) fn authorization(&self) -> Option<String> {
        self.secret
            .as_ref()
            .map(|s| format!("Bearer {}", s.expose_secret()))
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessToken(generation {}, [REDACTED])", self.generation)
    }
}

struct Cached {
    token: AccessToken,
    renew_at: Instant,
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    generation: u64,
    granted_scope: Option<String>,
}

/// How the client proves who it is at the token endpoint.
enum Credentials {
    /// SMART `private_key_jwt`: a fresh signed assertion per request.
    Assertion(Box<SigningKey>),
    /// `client_secret_basic`: HTTP Basic with the client id and secret.
    Secret(SecretString),
    /// A static bearer token issued out of band: handed out as is, never renewed.
    Static(SecretString),
    /// No token at all.
    None,
}

pub struct TokenManager {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    credentials: Credentials,
    scopes: Vec<String>,
    state: tokio::sync::Mutex<State>,
    /// The job this manager works for: the `job` label of its metrics.
    job: String,
}

/// Used when the server omits `expires_in`: SMART suggests five minutes for backend tokens.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Attempts per renewal for retryable failures (5xx, 429, timeouts); each uses a new assertion.
const ATTEMPTS: u32 = 3;
/// The pace of those tries: the one backoff, from half a second.
const RENEWAL_BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff {
    base: Duration::from_millis(500),
};

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

impl TokenManager {
    pub fn new(
        http: reqwest::Client,
        token_url: Url,
        client_id: String,
        key: SigningKey,
        scopes: Vec<String>,
    ) -> Self {
        TokenManager {
            http,
            token_url,
            client_id,
            credentials: Credentials::Assertion(Box::new(key)),
            scopes,
            state: tokio::sync::Mutex::new(State::default()),
            job: String::new(),
        }
    }

    /// A manager for `client_secret_basic` client credentials (CMS BCDA, AB2D).
    pub fn with_client_secret(
        http: reqwest::Client,
        token_url: Url,
        client_id: String,
        secret: SecretString,
        scopes: Vec<String>,
    ) -> Self {
        TokenManager {
            http,
            token_url,
            client_id,
            credentials: Credentials::Secret(secret),
            scopes,
            state: tokio::sync::Mutex::new(State::default()),
            job: String::new(),
        }
    }

    /// A manager that hands out one static bearer token issued out of band (`auth.method =
    /// "bearer_token"`). It never contacts a token endpoint; a refusal of the token is
    /// [`AuthError::StaticTokenRefused`], fatal.
    pub fn with_static_token(base: Url, token: SecretString) -> Self {
        TokenManager {
            http: reqwest::Client::new(),
            token_url: base,
            client_id: String::new(),
            credentials: Credentials::Static(token),
            scopes: Vec::new(),
            state: tokio::sync::Mutex::new(State::default()),
            job: String::new(),
        }
    }

    /// A manager for servers that need no authorisation: every request goes without a token.
    pub fn without_authorization(http: reqwest::Client, base: Url) -> Self {
        TokenManager {
            http,
            token_url: base,
            client_id: String::new(),
            credentials: Credentials::None,
            scopes: Vec::new(),
            state: tokio::sync::Mutex::new(State::default()),
            job: String::new(),
        }
    }

    /// Names the job this manager works for, in its metrics and in those of the clients that
    /// use it.
    pub fn for_job(mut self, job: &str) -> Self {
        self.job = job.to_string();
        self
    }

    /// The job this manager works for (empty when not named).
    pub fn job(&self) -> &str {
        &self.job
    }

    /// The scopes this manager asks for.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// A token valid for a while yet, renewing first if the cached one is near expiry.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        match &self.credentials {
            Credentials::None => {
                return Ok(AccessToken {
                    secret: None,
                    generation: 0,
                });
            }
            Credentials::Static(token) => {
                return Ok(AccessToken {
                    secret: Some(token.clone()),
                    generation: 1,
                });
            }
            Credentials::Assertion(_) | Credentials::Secret(_) => {}
        }
        let mut state = self.state.lock().await;
        if let Some(cached) = &state.cached
            && Instant::now() < cached.renew_at
        {
            return Ok(cached.token.clone());
        }
        let reason = if state.generation == 0 {
            TokenReason::Initial
        } else {
            TokenReason::Refresh
        };
        self.renew(&mut state, reason).await
    }

    /// After a 401: renews unless another task already replaced the refused token.
    pub async fn token_after_rejection(
        &self,
        refused: &AccessToken,
    ) -> Result<AccessToken, AuthError> {
        match self.credentials {
            Credentials::None => return Err(AuthError::Unauthenticated),
            // Nothing can renew a token issued out of band: asking again gets the same refusal.
            Credentials::Static(_) => return Err(AuthError::StaticTokenRefused),
            Credentials::Assertion(_) | Credentials::Secret(_) => {}
        }
        let mut state = self.state.lock().await;
        if let Some(cached) = &state.cached
            && cached.token.generation != refused.generation
            && Instant::now() < cached.renew_at
        {
            return Ok(cached.token.clone());
        }
        tracing::info!(
            token.generation = refused.generation,
            "access token refused by the server, renewing"
        );
        self.renew(&mut state, TokenReason::RenewAfter401).await
    }

    /// The `scope` the server granted with the current token, if it said.
    pub async fn granted_scope(&self) -> Option<String> {
        self.state.lock().await.granted_scope.clone()
    }

    async fn renew(
        &self,
        state: &mut State,
        reason: TokenReason,
    ) -> Result<AccessToken, AuthError> {
        let renewed = self.renew_with_retries(state).await;
        metrics::token_request(&self.job, reason, renewed.is_ok());
        renewed
    }

    async fn renew_with_retries(&self, state: &mut State) -> Result<AccessToken, AuthError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.request().await {
                Ok((secret, lifetime, scope)) => {
                    state.generation += 1;
                    let token = AccessToken {
                        secret: Some(secret),
                        generation: state.generation,
                    };
                    // Renew when a fifth of the lifetime (at most a minute) is left, so a token
                    // never expires between being handed out and being used.
                    let margin = (lifetime / 5).min(Duration::from_secs(60));
                    state.cached = Some(Cached {
                        token: token.clone(),
                        renew_at: Instant::now() + lifetime - margin,
                    });
                    state.granted_scope = scope;
                    tracing::debug!(
                        token.generation = state.generation,
                        token.lifetime_s = lifetime.as_secs(),
                        "access token obtained"
                    );
                    return Ok(token);
                }
                Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                    let delay = RENEWAL_BACKOFF.delay(attempt, None);
                    tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "token request failed, retrying");
                    metrics::http_retry(&self.job, Endpoint::Token);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn request(&self) -> Result<(SecretString, Duration, Option<String>), AuthError> {
        let scope = self.scopes.join(" ");
        let request = self
            .http
            .post(self.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        let request = match &self.credentials {
            Credentials::Assertion(key) => {
                // A new assertion (and so a new jti) for every attempt: servers reject a
                // reused jti.
                let assertion = key
                    .sign_assertion(&self.client_id, self.token_url.as_str())
                    .map_err(|e| AuthError::Sign(e.to_string()))?;
                request.form(&[
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.expose_secret()),
                    ("scope", scope.as_str()),
                ])
            }
            Credentials::Secret(secret) => {
                // RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
                let encode = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                request
                    .basic_auth(
                        encode(&self.client_id),
                        Some(encode(secret.expose_secret())),
                    )
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("scope", scope.as_str()),
                    ])
            }
            Credentials::None | Credentials::Static(_) => {
                unreachable!("token() returns before requesting for these credentials")
            }
        };
        let started = Instant::now();
        let response = request.send().await;
        metrics::http_request(
            &self.job,
            Endpoint::Token,
            response.as_ref().ok().map(|r| r.status().as_u16()),
            started.elapsed(),
        );
        let at = transport::endpoint(&self.token_url);
        let transport_failure = |e: reqwest::Error| AuthError::Transport {
            at: at.clone(),
            cause: transport::failure(&e),
        };
        let response = response.map_err(transport_failure)?;
        let status = response.status();
        if !status.is_success() {
            let body = transport::error_body(response).await;
            if status.is_client_error()
                && status.as_u16() != 429
                && let Ok(e) = serde_json::from_slice::<OAuthError>(&body.bytes)
            {
                let hint = self.hint(&e.error);
                return Err(AuthError::Refused {
                    error: untrusted::one_line(&e.error, 64),
                    description: untrusted::one_line(
                        e.error_description.as_deref().unwrap_or_default(),
                        transport::SERVER_TEXT_CHARS,
                    ),
                    hint,
                });
            }
            return Err(AuthError::Status {
                status: status.as_u16(),
                at,
                said: body.server_said(),
            });
        }
        let body = transport::read_capped(response, transport::DOCUMENT_BYTES)
            .await
            .map_err(transport_failure)?;
        if !body.complete {
            return Err(AuthError::BadResponse(format!(
                "the token response is larger than {} bytes",
                transport::DOCUMENT_BYTES
            )));
        }
        // serde_json's message may quote the body, which holds the token: position only.
        let parsed: TokenResponse = serde_json::from_slice(&body.bytes).map_err(|e| {
            AuthError::BadResponse(format!(
                "not a token response (at line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        if let Some(kind) = &parsed.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(AuthError::BadResponse(format!(
                "token_type {kind:?} is not bearer"
            )));
        }
        let lifetime = match &parsed.expires_in {
            None => {
                let fallback = jwt_lifetime(&parsed.access_token).unwrap_or(DEFAULT_LIFETIME);
                tracing::warn!(
                    token.lifetime_s = fallback.as_secs(),
                    "the token response has no expires_in; assuming the token's own exp or five minutes"
                );
                fallback
            }
            Some(value) => parse_expires_in(value).ok_or_else(|| {
                AuthError::BadResponse(format!(
                    "expires_in {} is not a number of seconds",
                    untrusted::one_line(&value.to_string(), 40)
                ))
            })?,
        };
        Ok((
            SecretString::from(parsed.access_token),
            lifetime,
            parsed.scope,
        ))
    }

    fn hint(&self, error: &str) -> String {
        let scopes = self.scopes.join(" ");
        // A client id is configuration, but a long one would drown the rest of the hint.
        let client_id = untrusted::one_line(&self.client_id, 80);
        match (&self.credentials, error) {
            (Credentials::Assertion(key), "invalid_client") => format!(
                "check that client id {:?} is registered with the public key kid {:?} ({}; publish it with `fhir-sync keys jwks <job>`), that auth.jku (if set) is the registered JWKS URL, and that this host's clock is right",
                client_id,
                key.kid(),
                key.algorithm()
            ),
            (_, "invalid_client") => format!(
                "check client id {:?} and its secret (auth.client_secret_file or auth.client_secret_env)",
                client_id
            ),
            (_, "invalid_scope") => format!(
                "the server would not grant {scopes:?}; change auth.scopes or auth.scope_style, or ask the EHR to allow them"
            ),
            (_, "unauthorized_client") => format!(
                "client id {:?} is not allowed the client_credentials grant for {scopes:?}; ask the EHR to enable backend access",
                client_id
            ),
            _ => "see the server's error description".into(),
        }
    }
}

/// The remaining lifetime of an access token that is itself a JWT with `exp`, read without
/// verifying it (it is only used to schedule renewal).
fn jwt_lifetime(token: &str) -> Option<Duration> {
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token)
        .ok()?
        .claims;
    let exp = claims.get("exp")?.as_i64()?;
    let left = exp.saturating_sub(time::OffsetDateTime::now_utc().unix_timestamp());
    (left > 0).then(|| Duration::from_secs(left as u64).min(MAX_LIFETIME))
}

/// The longest lifetime believed: a server saying `expires_in: 1e300` gets its token renewed
/// within a day, and no deadline computed from it can overflow.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// `expires_in` as a number, or as a string of digits (as some servers send it).
fn parse_expires_in(value: &serde_json::Value) -> Option<Duration> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (seconds.is_finite() && seconds > 0.0)
        .then(|| Duration::from_secs_f64(seconds.min(MAX_LIFETIME.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expires_in_forms() {
        assert_eq!(
            parse_expires_in(&json!(300)),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            parse_expires_in(&json!("3600")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_expires_in(&json!(0)), None);
        assert_eq!(parse_expires_in(&json!(1e300)), Some(MAX_LIFETIME));
        assert_eq!(parse_expires_in(&json!("1e300")), Some(MAX_LIFETIME));
        assert_eq!(parse_expires_in(&json!("soon")), None);
        assert_eq!(parse_expires_in(&json!(null)), None);
    }
}
