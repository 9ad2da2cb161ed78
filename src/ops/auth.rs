//! The ops server's access check: the configured API token, as a bearer token or as the
//! password of HTTP Basic (so a browser can open the status page).
//!
//! The token is compared in constant time and never logged or echoed. Anonymous routes
//! (`/healthz`, `/readyz`, the JWKS) are simply not wrapped by this layer; see
//! [`super::http::router`].

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use super::api::ApiError;

/// The challenge every 401 carries: a script sends a bearer token, a browser asks for a
/// password (the token) and sends Basic.
pub const CHALLENGE: &str = r#"Bearer realm="fhir-sync", Basic realm="fhir-sync""#;

/// The token requests must present.
#[derive(Clone)]
pub struct ApiToken(Arc<SecretString>);

impl ApiToken {
    pub fn new(token: SecretString) -> Self {
        ApiToken(Arc::new(token))
    }

    /// Whether the request's `Authorization` header carries the token.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = presented_token(headers) else {
            return false;
        };
        // `ct_eq` on slices of different lengths answers at once; the length of a token of at
        // least 16 characters tells an attacker nothing useful.
        presented
            .as_bytes()
            .ct_eq(self.0.expose_secret().as_bytes())
            .into()
    }
}

/// The token in `Authorization: Bearer <token>`, or the password of `Authorization: Basic`
/// (any user name). `None` when the header is absent or malformed.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(credentials.to_string())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (_user, password) = decoded.split_once(':')?;
        Some(password.to_string())
    } else {
        None
    }
}

/// Middleware: lets the request through when it carries the token, else answers 401 with the
/// challenge and the API's error shape.
pub async fn require_token(
    State(token): State<ApiToken>,
    request: Request,
    next: Next,
) -> Response {
    if token.admits(request.headers()) {
        return next.run(request).await;
    }
    if request.headers().contains_key(header::AUTHORIZATION) {
        // A wrong token is worth an operator's attention (a stale secret, or someone probing);
        // a missing one is what every browser sends first.
        tracing::warn!(http.path = %request.uri().path(), "ops request refused: wrong API token");
    }
    let mut response = ApiError::Unauthorized.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
        headers
    }

    fn basic(user_and_password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_and_password)
        )
    }

    #[test]
    fn admits_the_token_as_bearer_or_basic_password_only() {
        let token = ApiToken::new(SecretString::from("0123456789abcdef"));
        let cases: &[(&str, bool)] = &[
            ("Bearer 0123456789abcdef", true),
            ("bearer 0123456789abcdef", true),
            ("Bearer  0123456789abcdef ", true),
            ("Bearer 0123456789abcdeF", false),
            ("Bearer 0123456789abcde", false),
            ("Bearer 0123456789abcdef0", false),
            ("Bearer", false),
            ("Token 0123456789abcdef", false),
            ("0123456789abcdef", false),
            ("Basic !!!not-base64", false),
        ];
        for (authorization, admitted) in cases {
            assert_eq!(
                token.admits(&headers(authorization)),
                *admitted,
                "{authorization}"
            );
        }
        for (credentials, admitted) in [
            ("ops:0123456789abcdef", true),
            (":0123456789abcdef", true),
            ("0123456789abcdef:x", false),
            ("0123456789abcdef", false),
        ] {
            assert_eq!(
                token.admits(&headers(&basic(credentials))),
                admitted,
                "{credentials}"
            );
        }
        assert!(!token.admits(&HeaderMap::new()));
    }
}
