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

use super::error::ApiError;

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

/// What [`guard_requests`] checks against: the names the server answers to.
#[derive(Clone)]
pub struct RequestGuard {
    /// `ops.allowed_hosts`; checked only when `beyond_loopback`.
    pub allowed_hosts: Arc<Vec<String>>,
    pub beyond_loopback: bool,
}

/// Middleware for every route. A server reachable beyond loopback answers only requests whose
/// `Host` is an IP address or one of `ops.allowed_hosts` (a DNS-rebinding page carries its own
/// name). A state-changing request (anything but GET, HEAD, OPTIONS) is refused when the
/// browser says it comes from another site: an `Origin` that is not this `Host`, or
/// `Sec-Fetch-Site: cross-site`. A form POST from another page always carries one of them;
/// curl and scripts carry neither.
pub async fn guard_requests(
    State(guard): State<RequestGuard>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if guard.beyond_loopback && !host_allowed(&host, &guard.allowed_hosts) {
        tracing::warn!(http.path = %request.uri().path(), "ops request refused: Host is not in ops.allowed_hosts");
        return refusal(
            axum::http::StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            "this server does not answer to that host name (ops.allowed_hosts)",
        );
    }
    let safe = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if !safe && is_cross_site(headers, &host) {
        tracing::warn!(http.path = %request.uri().path(), "ops request refused: cross-site");
        return refusal(
            axum::http::StatusCode::FORBIDDEN,
            "cross_site",
            "state-changing requests from another site are refused",
        );
    }
    next.run(request).await
}

fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok()
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name))
}

fn is_cross_site(headers: &HeaderMap, host: &str) -> bool {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if fetch_site.eq_ignore_ascii_case("cross-site") || fetch_site.eq_ignore_ascii_case("same-site")
    {
        return true;
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => false,
        Some(origin) => url::Url::parse(origin)
            .ok()
            .and_then(|url| {
                let authority = match url.port() {
                    Some(port) => format!("{}:{port}", url.host_str()?),
                    None => url.host_str()?.to_string(),
                };
                Some(!authority.eq_ignore_ascii_case(host))
            })
            // `Origin: null` (a sandboxed page or a redirect) is another site too.
            .unwrap_or(true),
    }
}

fn refusal(status: axum::http::StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins() {
        let allowed = vec!["ops.example.org".to_string()];
        for (host, ok) in [
            ("ops.example.org", true),
            ("ops.example.org:8080", true),
            ("10.0.0.5:8080", true),
            ("[::1]:8080", true),
            ("evil.example", false),
            ("", false),
        ] {
            assert_eq!(host_allowed(host, &allowed), ok, "{host}");
        }
        let with = |name: &str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
            headers
        };
        assert!(!is_cross_site(&HeaderMap::new(), "127.0.0.1:8080"));
        assert!(!is_cross_site(
            &with("origin", "http://127.0.0.1:8080"),
            "127.0.0.1:8080"
        ));
        assert!(is_cross_site(
            &with("origin", "https://evil.example"),
            "127.0.0.1:8080"
        ));
        assert!(is_cross_site(&with("origin", "null"), "127.0.0.1:8080"));
        assert!(is_cross_site(
            &with("sec-fetch-site", "cross-site"),
            "127.0.0.1:8080"
        ));
        assert!(!is_cross_site(
            &with("sec-fetch-site", "same-origin"),
            "127.0.0.1:8080"
        ));
    }

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
