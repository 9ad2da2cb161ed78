//! Access tokens: one [`TokenManager`] per job, shared by every request of a run.
//!
//! The manager caches the token, renews it ahead of `expires_in`, and lets only one renewal be
//! in flight: callers queue on one async mutex, and whoever holds it renews for everyone. After
//! a 401 a caller hands back the token that was refused; if nobody renewed it since, it is
//! renewed once. The token endpoint only ever receives the signed assertion, never a token.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::{AuthError, SigningKey};

/// A bearer token. `generation` tells tokens apart without comparing secrets.
#[derive(Clone)]
pub struct AccessToken {
    secret: SecretString,
    generation: u64,
}

impl AccessToken {
    /// The header value `Bearer <token>`. Only for building a request; never log it.
    pub(crate) fn authorization(&self) -> String {
        format!("Bearer {}", self.secret.expose_secret())
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

pub struct TokenManager {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    key: SigningKey,
    scopes: Vec<String>,
    state: tokio::sync::Mutex<State>,
}

/// Used when the server omits `expires_in`: SMART suggests five minutes for backend tokens.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Attempts per renewal for retryable failures (5xx, 429, timeouts); each uses a new assertion.
const ATTEMPTS: u32 = 3;

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
            key,
            scopes,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// A token valid for a while yet, renewing first if the cached one is near expiry.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut state = self.state.lock().await;
        if let Some(cached) = &state.cached
            && Instant::now() < cached.renew_at
        {
            return Ok(cached.token.clone());
        }
        self.renew(&mut state).await
    }

    /// After a 401: renews unless another task already replaced the refused token.
    pub async fn token_after_rejection(
        &self,
        refused: &AccessToken,
    ) -> Result<AccessToken, AuthError> {
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
        self.renew(&mut state).await
    }

    /// The `scope` the server granted with the current token, if it said.
    pub async fn granted_scope(&self) -> Option<String> {
        self.state.lock().await.granted_scope.clone()
    }

    async fn renew(&self, state: &mut State) -> Result<AccessToken, AuthError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.request().await {
                Ok((secret, lifetime, scope)) => {
                    state.generation += 1;
                    let token = AccessToken {
                        secret,
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
                    let delay = Duration::from_millis(500 * 2u64.pow(attempt - 1));
                    tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "token request failed, retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn request(&self) -> Result<(SecretString, Duration, Option<String>), AuthError> {
        // A new assertion (and so a new jti) for every attempt: servers reject a reused jti.
        let assertion = self
            .key
            .sign_assertion(&self.client_id, self.token_url.as_str())
            .map_err(|e| AuthError::Sign(e.to_string()))?;
        let scope = self.scopes.join(" ");
        let form = [
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.expose_secret()),
            ("scope", scope.as_str()),
        ];
        let response = self
            .http
            .post(self.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| AuthError::Transport(e.without_url()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| AuthError::Transport(e.without_url()))?;
        if status.is_client_error() && status.as_u16() != 429 {
            return Err(match serde_json::from_slice::<OAuthError>(&body) {
                Ok(e) => {
                    let hint = self.hint(&e.error);
                    AuthError::Refused {
                        error: e.error,
                        description: e.error_description.unwrap_or_default(),
                        hint,
                    }
                }
                Err(_) => AuthError::Status {
                    status: status.as_u16(),
                },
            });
        }
        if !status.is_success() {
            return Err(AuthError::Status {
                status: status.as_u16(),
            });
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| AuthError::BadResponse(format!("not a token response: {e}")))?;
        if let Some(kind) = &parsed.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(AuthError::BadResponse(format!(
                "token_type {kind:?} is not bearer"
            )));
        }
        let lifetime = match &parsed.expires_in {
            None => DEFAULT_LIFETIME,
            Some(value) => parse_expires_in(value).ok_or_else(|| {
                AuthError::BadResponse(format!("expires_in {value} is not a number of seconds"))
            })?,
        };
        Ok((
            SecretString::from(parsed.access_token),
            lifetime,
            parsed.scope,
        ))
    }

    fn hint(&self, error: &str) -> String {
        match error {
            "invalid_client" => format!(
                "check that client id {:?} is registered with the public key kid {:?} ({}) and that this host's clock is right",
                self.client_id,
                self.key.kid(),
                self.key.algorithm()
            ),
            "invalid_scope" => format!("the server would not grant {:?}; change auth.scopes or ask the EHR to allow them", self.scopes.join(" ")),
            "unauthorized_client" => "the client is not allowed the client_credentials grant; ask the EHR to enable backend access".into(),
            _ => "see the server's error description".into(),
        }
    }
}

/// `expires_in` as a number, or as a string of digits (as some servers send it).
fn parse_expires_in(value: &serde_json::Value) -> Option<Duration> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (seconds.is_finite() && seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
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
        assert_eq!(parse_expires_in(&json!("soon")), None);
        assert_eq!(parse_expires_in(&json!(null)), None);
    }
}
