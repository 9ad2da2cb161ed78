//! The fake authorization server: the SMART Backend Services token endpoint that verifies
//! `private_key_jwt` client assertions against registered JWK sets (and `client_secret_basic`
//! credentials for clients registered with a secret), and the bearer check every protected FHIR
//! route goes through.
//!
//! It is as strict as the spec lets a real EHR be (exact `aud`, `exp` at most five minutes ahead,
//! one-time `jti`, `kid` matched in the registered set, only the advertised algorithms, `jku`
//! only when it equals the registered JWKS URL, only the advertised scope syntaxes) and every
//! refusal names its reason, so that client tests can tell which rule they broke. Scripted
//! faults (token endpoint outages, 401s, early revocation, narrower grants, `expires_in` forms,
//! cross-origin redirects of file downloads) come from [`super::FakeOptions`] and are applied
//! here. It must never log a token, an assertion, a key, the form body or the `Authorization`
//! header; only outcomes and reasons are logged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::Rng;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::outcome;
use super::state::{IssuedToken, ServerState};
use super::{TokenAttempt, TokenRefusal};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// SMART: the assertion's `exp` "SHALL be no more than five minutes in the future".
const MAX_ASSERTION_LIFETIME_SECONDS: i64 = 300;

/// A failed token request: the HTTP status and the RFC 6749 §5.2 error body.
struct Refusal {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl Refusal {
    fn bad_request(error: &'static str, description: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
        }
    }

    /// Client authentication failed; SMART requires `invalid_client` for every such case.
    fn invalid_client(description: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: description.into(),
        }
    }
}

/// Who a token request claimed to be, filled in as far as the request got.
#[derive(Default)]
struct Caller {
    client_id: Option<String>,
    kid: Option<String>,
}

/// `POST /auth/token`.
pub(crate) async fn token(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    {
        let mut inner = state.lock();
        let budget = state.options.faults.token_redirects;
        if super::faults::take(&mut inner.faults.token_redirects, budget) {
            let location = state.token_url().to_string();
            return (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location)],
            )
                .into_response();
        }
    }
    refresh_jwks_from_url(&state, &headers, &body).await;
    let mut caller = Caller::default();
    let result = issue_token(&state, &headers, &body, &mut caller);
    let outcome = match &result {
        Ok(_) => Ok(()),
        Err(refusal) => Err(TokenRefusal {
            error: refusal.error.to_string(),
            description: refusal.description.clone(),
        }),
    };
    state.lock().token_attempts.push(TokenAttempt {
        client_id: caller.client_id,
        kid: caller.kid,
        outcome,
    });
    match result {
        Ok(body) => {
            tracing::debug!(
                outcome = "issued",
                "fake token endpoint issued an access token"
            );
            token_json(StatusCode::OK, body)
        }
        Err(refusal) => {
            tracing::debug!(
                outcome = "refused",
                error = refusal.error,
                reason = %refusal.description,
                "fake token endpoint refused a token request"
            );
            let body = json!({ "error": refusal.error, "error_description": refusal.description });
            token_json(refusal.status, body)
        }
    }
}

/// The most bytes of a client's JWK set the fake reads from its JWKS URL.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// For a client registered by JWKS URL ([`super::FakeFhirServer::register_jwks_url`]): fetches
/// its key set, as Epic does, and makes it the client's registered set. A fetch that fails
/// leaves the last set in place (the assertion is then checked against it, and refused if its
/// key is not there).
async fn refresh_jwks_from_url(state: &ServerState, headers: &HeaderMap, body: &[u8]) {
    let Ok(form) = parse_form(headers, body) else {
        return;
    };
    let Some(iss) = form.get("client_assertion").and_then(|assertion| {
        jsonwebtoken::dangerous::insecure_decode::<Value>(assertion)
            .ok()?
            .claims
            .get("iss")?
            .as_str()
            .map(str::to_string)
    }) else {
        return;
    };
    let Some(url) = state.lock().jwks_urls.get(&iss).cloned() else {
        return;
    };
    let fetched = async {
        let mut response = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .ok()?
            .get(url)
            .send()
            .await
            .ok()?
            .error_for_status()
            .ok()?;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.ok()? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_JWKS_BYTES {
                return None;
            }
        }
        serde_json::from_slice::<jsonwebtoken::jwk::JwkSet>(&bytes).ok()
    }
    .await;
    match fetched {
        Some(jwks) => {
            state.lock().clients.insert(iss, jwks);
        }
        None => tracing::debug!("fake token endpoint could not fetch a client's JWKS URL"),
    }
}

/// RFC 6749 §5.1: token responses are JSON and must not be cached.
fn token_json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        body.to_string(),
    )
        .into_response()
}

fn issue_token(
    state: &ServerState,
    headers: &HeaderMap,
    body: &[u8],
    caller: &mut Caller,
) -> Result<Value, Refusal> {
    let form = parse_form(headers, body)?;
    let param = |name: &str| form.get(name).map(String::as_str);
    let failing = {
        let mut inner = state.lock();
        if let Some(assertion) = param("client_assertion") {
            // Kept before any check so leak tests can look for every assertion that was sent.
            inner.received_assertions.push(assertion.to_string());
        }
        inner.token_requests += 1;
        inner.token_requests <= state.options.token_server_errors
    };
    if failing {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "temporarily_unavailable",
            description: "the authorization server is overloaded (scripted fault)".into(),
        });
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, credentials)| credentials.trim().to_string());
    if let Some(credentials) = basic {
        return issue_for_secret(state, &form, &credentials, caller);
    }
    match param("grant_type") {
        None => {
            return Err(Refusal::bad_request(
                "invalid_request",
                "grant_type is required",
            ));
        }
        Some("client_credentials") => {}
        Some(_) => {
            return Err(Refusal::bad_request(
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            ));
        }
    }
    if param("client_assertion_type") != Some(ASSERTION_TYPE) {
        return Err(Refusal::bad_request(
            "invalid_request",
            format!("client_assertion_type must be {ASSERTION_TYPE}"),
        ));
    }
    let assertion = match param("client_assertion") {
        Some(a) if !a.is_empty() => a,
        _ => {
            return Err(Refusal::bad_request(
                "invalid_request",
                "client_assertion is required",
            ));
        }
    };
    let requested_scope = match param("scope") {
        Some(s) if !s.trim().is_empty() => s,
        _ => return Err(Refusal::bad_request("invalid_scope", "scope is required")),
    };
    let client_id = verify_assertion(state, assertion, param("client_id"), caller)
        .map_err(Refusal::invalid_client)?;
    if state.options.deny_backend_access {
        // Authenticated, but the registration does not allow this grant.
        return Err(Refusal::bad_request(
            "unauthorized_client",
            "this client is not allowed the client_credentials grant",
        ));
    }
    grant(state, client_id, requested_scope)
}

/// A `client_secret_basic` token request (RFC 6749 §2.3.1): HTTP Basic with the form-encoded
/// client id and secret, and no assertion.
fn issue_for_secret(
    state: &ServerState,
    form: &HashMap<String, String>,
    credentials: &str,
    caller: &mut Caller,
) -> Result<Value, Refusal> {
    if form.contains_key("client_assertion") {
        return Err(Refusal::bad_request(
            "invalid_request",
            "use one client authentication method, not Basic and an assertion",
        ));
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err(Refusal::bad_request(
            "unsupported_grant_type",
            "only grant_type=client_credentials is supported",
        ));
    }
    let decoded = decode_base64(credentials)
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| Refusal::invalid_client("the Basic credentials are not base64"))?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or_else(|| Refusal::invalid_client("the Basic credentials are not id:secret"))?;
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (decode(id), decode(secret));
    caller.client_id = Some(id.clone());
    let registered = state.lock().secret_clients.get(&id).cloned();
    if registered.as_deref() != Some(secret.as_str()) {
        return Err(Refusal::invalid_client("unknown client or wrong secret"));
    }
    let requested_scope = match form.get("scope") {
        Some(s) if !s.trim().is_empty() => s.clone(),
        _ => return Err(Refusal::bad_request("invalid_scope", "scope is required")),
    };
    grant(state, id, &requested_scope)
}

/// Standard base64, as HTTP Basic uses (padding optional); `None` for anything else.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const STANDARD: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    STANDARD.decode(text).ok()
}

/// Issues a token for an authenticated client with the scopes this server grants of those
/// requested.
fn grant(state: &ServerState, client_id: String, requested_scope: &str) -> Result<Value, Refusal> {
    let options = &state.options;
    let has = |c: &str| options.capabilities.iter().any(|x| x == c);
    let scopes: Vec<String> = grant_scopes(requested_scope)
        .into_iter()
        .filter(|scope| {
            let v2 = scope.rsplit_once('.').is_some_and(|(_, p)| is_cruds(p));
            if v2 {
                has("permission-v2")
            } else {
                has("permission-v1")
            }
        })
        .filter(|scope| match &options.grantable_types {
            None => true,
            Some(types) => scope
                .strip_prefix("system/")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(t, _)| types.iter().any(|g| g == t)),
        })
        .collect();
    if scopes.is_empty() {
        return Err(Refusal::bad_request(
            "invalid_scope",
            "no requested scope is a system/<type>.<permissions> scope this server grants",
        ));
    }

    let access_token = random_token();
    let lifetime = state.options.token_lifetime_seconds;
    let expires_at = OffsetDateTime::now_utc()
        + time::Duration::seconds(i64::try_from(lifetime).unwrap_or(i64::MAX / 2));
    let scope = scopes.join(" ");
    let mut inner = state.lock();
    inner.issued_tokens.push(access_token.clone());
    inner.tokens.insert(
        access_token.clone(),
        IssuedToken {
            client_id,
            scopes,
            expires_at,
        },
    );
    let mut body = json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": lifetime,
        "scope": scope,
    });
    match options.expires_in {
        super::ExpiresIn::Number => {}
        super::ExpiresIn::String => body["expires_in"] = json!(lifetime.to_string()),
        super::ExpiresIn::Absurd => body["expires_in"] = json!(1e300),
        super::ExpiresIn::Missing => {
            body.as_object_mut().map(|b| b.remove("expires_in"));
        }
    }
    Ok(body)
}

/// Parses an `application/x-www-form-urlencoded` body. Repeated parameters are refused, as
/// RFC 6749 §3.2 requires ("parameters MUST NOT be included more than once").
fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, Refusal> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(Refusal::bad_request(
            "invalid_request",
            "the token request must be application/x-www-form-urlencoded",
        ));
    }
    let mut form = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(body) {
        if form.insert(name.to_string(), value.into_owned()).is_some() {
            return Err(Refusal::bad_request(
                "invalid_request",
                format!("parameter {name} is repeated"),
            ));
        }
    }
    Ok(form)
}

/// Checks the client assertion and returns the authenticated client id, or the reason it was
/// refused. The checks follow SMART's "Signature Verification" steps in order; claims are read
/// unverified first only to pick the key, and nothing from them is trusted until the signature
/// has been verified with that key.
fn verify_assertion(
    state: &ServerState,
    assertion: &str,
    form_client_id: Option<&str>,
    caller: &mut Caller,
) -> Result<String, String> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| "client_assertion is not a JWS signed with RS384 or ES384".to_string())?;
    caller.kid = header.kid.clone();
    let accepted = &state.options.signing_algorithms;
    if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384)
        || !accepted.iter().any(|a| *a == format!("{:?}", header.alg))
    {
        return Err(format!(
            "alg {:?} is not accepted; sign with {}",
            header.alg,
            accepted.join(" or ")
        ));
    }
    if header.typ.as_deref() != Some("JWT") {
        return Err("typ must be JWT".to_string());
    }
    let Some(kid) = header.kid.clone() else {
        return Err("kid is required in the assertion header".to_string());
    };

    let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(assertion)
        .map_err(|_| "client_assertion claims are not a JSON object".to_string())?
        .claims;
    let Some(iss) = claims.get("iss").and_then(Value::as_str) else {
        return Err("iss is required".to_string());
    };
    caller.client_id = Some(iss.to_string());
    // SMART: a `jku` header SHALL equal the JWKS URL registered for the client.
    if let Some(jku) = &header.jku {
        match state.lock().client_jkus.get(iss) {
            None => {
                return Err(
                    "jku is not accepted: this client registered a static JWK set".to_string(),
                );
            }
            Some(registered) if registered != jku => {
                return Err("jku does not match the client's registered JWKS URL".to_string());
            }
            Some(_) => {}
        }
    }
    let Some(jwks) = state.lock().clients.get(iss).cloned() else {
        return Err("unknown client".to_string());
    };
    let matching: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
        .collect();
    let jwk = match matching.as_slice() {
        [] => return Err(format!("no registered key with kid {kid}")),
        [one] => *one,
        // SMART 2: "if no keys match, or more than one key matches, the verification fails".
        _ => return Err(format!("more than one registered key has kid {kid}")),
    };
    check_key_fits(jwk, header.alg).map_err(|why| format!("registered key {kid} {why}"))?;
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|_| format!("registered key {kid} is not a usable public key"))?;

    // Only the signature is checked here; every claim is checked below so that each failure
    // gets its own reason instead of the library's generic one.
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let verified = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|_| "signature does not verify against the registered key".to_string())?
        .claims;

    let token_url = state.token_url();
    let aud_ok = match verified.get("aud") {
        Some(Value::String(aud)) => aud == token_url.as_str(),
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(token_url.as_str())),
        _ => false,
    };
    if !aud_ok {
        return Err(format!(
            "aud does not match the token endpoint {}",
            token_url.as_str()
        ));
    }
    if verified.get("sub").and_then(Value::as_str) != Some(iss) {
        return Err("sub must equal iss (the client_id)".to_string());
    }
    if form_client_id.is_some_and(|id| id != iss) {
        return Err("client_id does not match the assertion iss".to_string());
    }
    let Some(exp) = verified.get("exp").and_then(Value::as_i64) else {
        return Err("exp is required and must be an integer number of seconds".to_string());
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    if exp <= now {
        return Err("exp is in the past: the assertion has expired".to_string());
    }
    if exp - now > MAX_ASSERTION_LIFETIME_SECONDS {
        return Err(format!(
            "exp is more than {MAX_ASSERTION_LIFETIME_SECONDS} seconds in the future"
        ));
    }
    let jti = match verified.get("jti").and_then(Value::as_str) {
        Some(jti) if !jti.is_empty() => jti,
        _ => return Err("jti is required".to_string()),
    };
    // The jti is spent only by an assertion that passed every other check, so a forged or
    // malformed assertion cannot burn a legitimate client's nonce.
    if !state
        .lock()
        .used_jtis
        .insert((iss.to_string(), jti.to_string()))
    {
        return Err("jti has already been used".to_string());
    }
    Ok(iss.to_string())
}

/// Whether a registered JWK may verify an assertion signed with `alg`.
fn check_key_fits(jwk: &Jwk, alg: Algorithm) -> Result<(), &'static str> {
    let family_fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS384) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        _ => false,
    };
    if !family_fits {
        return Err("is not of a type that verifies this alg");
    }
    if jwk
        .common
        .key_algorithm
        .is_some_and(|registered| registered != KeyAlgorithm::from(alg))
    {
        return Err("is registered for a different alg");
    }
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption)
        || jwk
            .common
            .key_operations
            .as_ref()
            .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return Err("is not registered for signature verification");
    }
    Ok(())
}

/// The requested scopes this server grants, in request order without duplicates: SMART v1
/// (`system/Patient.read`) and v2 (`system/*.rs`) system scopes. Anything else (user or
/// patient scopes, granular `?` constraints, out-of-order permissions) is silently dropped,
/// which SMART allows; the client must look at the granted list.
fn grant_scopes(requested: &str) -> Vec<String> {
    let mut granted: Vec<String> = Vec::new();
    for scope in requested.split_whitespace() {
        if is_system_scope(scope) && !granted.iter().any(|g| g == scope) {
            granted.push(scope.to_string());
        }
    }
    granted
}

fn is_system_scope(scope: &str) -> bool {
    let Some(rest) = scope.strip_prefix("system/") else {
        return false;
    };
    let Some((resource_type, permissions)) = rest.split_once('.') else {
        return false;
    };
    (resource_type == "*" || is_resource_type_name(resource_type))
        && (matches!(permissions, "read" | "write" | "*") || is_cruds(permissions))
}

/// A SMART v2 permission string: a non-empty subsequence of `cruds`, in that order.
fn is_cruds(permissions: &str) -> bool {
    let mut rest = "cruds";
    !permissions.is_empty()
        && permissions.chars().all(|c| match rest.find(c) {
            Some(at) => {
                rest = &rest[at + 1..];
                true
            }
            None => false,
        })
}

/// Whether `name` is shaped like a FHIR resource type name (`Patient`, `MedicationRequest`).
pub(crate) fn is_resource_type_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

/// Whether a granted scope lets its holder read resources of `resource_type`.
pub(crate) fn scope_allows_read(scope: &str, resource_type: &str) -> bool {
    let Some((scope_type, permissions)) = scope
        .strip_prefix("system/")
        .and_then(|rest| rest.split_once('.'))
    else {
        return false;
    };
    (scope_type == "*" || scope_type == resource_type)
        && (matches!(permissions, "read" | "*")
            || (is_cruds(permissions) && permissions.contains('r')))
}

/// An opaque access token: 256 random bits, hex-encoded.
pub(crate) fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a protected request was refused; it becomes a 401 with a `WWW-Authenticate` challenge.
/// Expired and unknown tokens get `error="invalid_token"` (RFC 6750 §3.1) so that a client can
/// tell "fetch a new token" from "you sent nothing".
#[derive(Debug)]
pub(crate) struct Unauthorized {
    error: Option<&'static str>,
    diagnostics: &'static str,
}

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        let challenge = match self.error {
            None => "Bearer".to_string(),
            Some(error) => format!(
                "Bearer error=\"{error}\", error_description=\"{}\"",
                self.diagnostics
            ),
        };
        let mut response = outcome::error(StatusCode::UNAUTHORIZED, "login", self.diagnostics);
        // The challenge is built from fixed strings, so it is always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// The checked bearer token of a protected request, as an extractor: a handler that takes it
/// only runs for a valid, unexpired token and otherwise answers 401.
pub(crate) struct Bearer(pub(crate) IssuedToken);

impl FromRequestParts<Arc<ServerState>> for Bearer {
    type Rejection = Unauthorized;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ServerState>,
    ) -> Result<Self, Self::Rejection> {
        authorize(state, &parts.headers).map(Bearer)
    }
}

/// Checks the bearer token of a protected request and returns what it grants.
pub(crate) fn authorize(
    state: &ServerState,
    headers: &HeaderMap,
) -> Result<IssuedToken, Unauthorized> {
    let options = &state.options;
    if options.open_access {
        return Ok(IssuedToken {
            client_id: "anonymous".into(),
            scopes: vec!["system/*.read".into()],
            expires_at: OffsetDateTime::now_utc() + time::Duration::days(1),
        });
    }
    {
        let mut inner = state.lock();
        inner.protected_requests += 1;
        let count = inner.protected_requests;
        if options
            .revoke_tokens_after_requests
            .is_some_and(|after| count == after + 1)
        {
            let now = OffsetDateTime::now_utc();
            for token in inner.tokens.values_mut() {
                token.expires_at = now;
            }
        }
        if count <= options.unauthorized_responses {
            return Err(Unauthorized {
                error: Some("invalid_token"),
                diagnostics: "the access token was rejected (scripted fault)",
            });
        }
    }
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(Unauthorized {
            error: None,
            diagnostics: "an Authorization: Bearer token is required",
        });
    };
    let token = value.to_str().ok().and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
    });
    let Some(token) = token else {
        return Err(Unauthorized {
            error: Some("invalid_request"),
            diagnostics: "the Authorization header must be Bearer <token>",
        });
    };
    let issued = state.lock().tokens.get(token).cloned();
    match issued {
        None => Err(Unauthorized {
            error: Some("invalid_token"),
            diagnostics: "the access token is not one this server issued",
        }),
        Some(issued) if issued.expires_at <= OffsetDateTime::now_utc() => Err(Unauthorized {
            error: Some("invalid_token"),
            diagnostics: "the access token has expired",
        }),
        Some(issued) => Ok(issued),
    }
}

/// Middleware for [`super::FakeFhirServer::redirect_files_to`]: on the primary origin a file
/// download (after the usual bearer check) answers 307 to the other origin with a one-time
/// `presigned` query; on the other origin that query stands in for the token, the way a
/// presigned cloud-storage URL does. Requests arriving with an `Authorization` header keep it,
/// so a client that leaks the token across origins is visible in the recorded requests.
pub(crate) async fn redirect_files(
    State(state): State<Arc<ServerState>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_string();
    if !path.starts_with(&format!("{}/bulkfiles/", state.base_path())) {
        return next.run(request).await;
    }
    let presigned = request.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "presigned")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(key) = presigned {
        let stands_for = state.lock().presigned.get(&key).cloned();
        let Some(stands_for) = stands_for else {
            return outcome::error(StatusCode::FORBIDDEN, "forbidden", "unknown presigned URL");
        };
        if !request.headers().contains_key(header::AUTHORIZATION)
            && let Some(value) = stands_for.and_then(|v| HeaderValue::from_str(&v).ok())
        {
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        return next.run(request).await;
    }
    let target = state.lock().redirect_files_to.clone();
    let on_primary = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.ends_with(&format!(":{}", state.origin.port().unwrap_or(0))));
    let Some(target) = target.filter(|_| on_primary) else {
        return next.run(request).await;
    };
    if state.options.requires_access_token
        && let Err(unauthorized) = authorize(&state, request.headers())
    {
        return unauthorized.into_response();
    }
    let key = random_token();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.lock().presigned.insert(key.clone(), authorization);
    let mut location = target.clone();
    location.set_path(&path);
    location.set_query(Some(&format!("presigned={key}")));
    let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(value) = HeaderValue::from_str(location.as_str()) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// `GET /fhir/{type}?_count=1`: the one search the fake answers, so that clients (and
/// `fhir-sync check`) can prove a token works on an ordinary FHIR read. It needs a token whose
/// scopes allow reading the type and returns a searchset with the type's total and at most one
/// entry; any other search parameter than `_count` is refused.
pub(crate) async fn search_probe(
    State(state): State<Arc<ServerState>>,
    axum::extract::Path(resource_type): axum::extract::Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    Bearer(token): Bearer,
) -> Response {
    let known = super::RESOURCE_TYPES.contains(&resource_type.as_str());
    if !known {
        return outcome::error(
            StatusCode::NOT_FOUND,
            "not-supported",
            "unknown resource type",
        );
    }
    let only_count = query
        .as_deref()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).all(|(k, _)| k == "_count"))
        .unwrap_or(true);
    if !only_count {
        return outcome::error(
            StatusCode::BAD_REQUEST,
            "not-supported",
            "only _count is supported",
        );
    }
    if !token
        .scopes
        .iter()
        .any(|s| scope_allows_read(s, &resource_type))
    {
        return outcome::error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the access token does not allow reading this type",
        );
    }
    let total = state.dataset.count(&resource_type);
    let entry: Vec<Value> = (0..total.min(1))
        .map(|i| json!({ "resource": state.dataset.resource(&resource_type, i) }))
        .collect();
    outcome::fhir_json(
        StatusCode::OK,
        json!({ "resourceType": "Bundle", "type": "searchset", "total": total, "entry": entry })
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::test_client::{
        ASSERTION_TYPE, CLIENT_ID, TestKey, claims, good_claims, post_token,
    };
    use crate::fake::{Dataset, FakeFhirServer, FakeOptions};
    use jsonwebtoken::Header;

    async fn server_with(key: &TestKey) -> FakeFhirServer {
        let server = FakeFhirServer::start(Dataset::new(1, 1), FakeOptions::default())
            .await
            .unwrap();
        server.register_client(CLIENT_ID, key.jwks());
        server
    }

    async fn assert_issued(server: &FakeFhirServer, key: &TestKey) {
        let http = reqwest::Client::new();
        let assertion = key.sign(&good_claims(server));
        let response = post_token(&http, server, &assertion, "system/*.read launch").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 300);
        assert_eq!(body["scope"], "system/*.read");
        let token = body["access_token"].as_str().unwrap();
        assert!(token.len() >= 32);
        assert_eq!(server.issued_tokens(), [token]);
        assert_eq!(server.received_assertions(), [assertion]);
        let attempts = server.token_attempts();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].client_id.as_deref(), Some(CLIENT_ID));
        assert_eq!(attempts[0].kid.as_deref(), Some(key.kid.as_str()));
        assert_eq!(attempts[0].outcome, Ok(()));
    }

    #[tokio::test]
    async fn rs384_assertion_gets_a_token() {
        let key = TestKey::rsa(0, "rsa-key-1");
        let server = server_with(&key).await;
        assert_issued(&server, &key).await;
    }

    #[tokio::test]
    async fn es384_assertion_gets_a_token() {
        let key = TestKey::ec("ec-key-1");
        let server = server_with(&key).await;
        assert_issued(&server, &key).await;
    }

    /// Posts `assertion` and checks it is refused with `invalid_client` and a reason containing
    /// `reason`, both in the response and in `token_attempts`.
    async fn assert_refused(server: &FakeFhirServer, assertion: &str, reason: &str) {
        let http = reqwest::Client::new();
        let response = post_token(&http, server, assertion, "system/*.read").await;
        assert_eq!(response.status(), 401, "{reason}");
        assert_eq!(response.headers()["cache-control"], "no-store");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client", "{reason}");
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.contains(reason),
            "{description:?} should say {reason:?}"
        );
        let last = server.token_attempts().pop().unwrap();
        assert_eq!(
            last.outcome,
            Err(TokenRefusal {
                error: "invalid_client".to_string(),
                description: description.to_string(),
            })
        );
    }

    #[tokio::test]
    async fn bad_assertions_are_refused_with_their_reason() {
        let key = TestKey::rsa(0, "registered");
        let server = server_with(&key).await;
        let aud = server.token_url().to_string();
        let other_key_same_kid = TestKey::rsa(1, "registered");
        let ec_same_kid = TestKey::ec("registered");
        let unknown_kid = TestKey::rsa(0, "not-registered");
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut c = good_claims(&server);
            edit(&mut c);
            c
        };
        let mut no_typ = Header::new(Algorithm::RS384);
        no_typ.kid = Some("registered".to_string());
        no_typ.typ = None;
        let mut hs256 = Header::new(Algorithm::HS256);
        hs256.kid = Some("registered".to_string());
        let hs256_assertion = jsonwebtoken::encode(
            &hs256,
            &good_claims(&server),
            &jsonwebtoken::EncodingKey::from_secret(b"shared secret").unwrap(),
        )
        .unwrap();

        let cases: Vec<(String, &str)> = vec![
            (
                other_key_same_kid.sign(&good_claims(&server)),
                "signature does not verify against the registered key",
            ),
            (
                key.sign(&claims(CLIENT_ID, &aud, -60)),
                "exp is in the past",
            ),
            (
                key.sign(&claims(CLIENT_ID, &aud, 600)),
                "exp is more than 300 seconds in the future",
            ),
            (
                key.sign(&claims(CLIENT_ID, &format!("{aud}/"), 60)),
                "aud does not match the token endpoint",
            ),
            (
                key.sign(&claims(
                    CLIENT_ID,
                    &aud.replace("127.0.0.1", "localhost"),
                    60,
                )),
                "aud does not match the token endpoint",
            ),
            (
                key.sign(&claims("someone-else", &aud, 60)),
                "unknown client",
            ),
            (
                unknown_kid.sign(&good_claims(&server)),
                "no registered key with kid not-registered",
            ),
            (
                key.sign(&with(&|c| c["sub"] = json!("someone-else"))),
                "sub must equal iss",
            ),
            (
                key.sign(&with(&|c| {
                    c.as_object_mut().unwrap().remove("jti");
                })),
                "jti is required",
            ),
            (
                key.sign(&with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                })),
                "exp is required",
            ),
            (
                ec_same_kid.sign(&good_claims(&server)),
                "is not of a type that verifies this alg",
            ),
            (
                key.sign_with_header(&no_typ, &good_claims(&server)),
                "typ must be JWT",
            ),
            (hs256_assertion, "alg HS256 is not accepted"),
            ("not a jwt".to_string(), "is not a JWS"),
        ];
        for (assertion, reason) in &cases {
            assert_refused(&server, assertion, reason).await;
        }
        assert!(server.issued_tokens().is_empty());
        assert_eq!(server.received_assertions().len(), cases.len());
    }

    #[tokio::test]
    async fn a_reused_jti_is_refused() {
        let key = TestKey::ec("ec");
        let server = server_with(&key).await;
        let http = reqwest::Client::new();
        let assertion = key.sign(&good_claims(&server));
        let first = post_token(&http, &server, &assertion, "system/*.read").await;
        assert_eq!(first.status(), 200);
        assert_refused(&server, &assertion, "jti has already been used").await;

        // The same jti in a newly signed assertion is just as spent.
        let mut again = good_claims(&server);
        again["jti"] = jsonwebtoken::dangerous::insecure_decode::<Value>(&assertion)
            .unwrap()
            .claims["jti"]
            .clone();
        assert_refused(&server, &key.sign(&again), "jti has already been used").await;
    }

    #[tokio::test]
    async fn malformed_token_requests_get_oauth_errors() {
        let key = TestKey::ec("ec");
        let server = server_with(&key).await;
        let http = reqwest::Client::new();
        let assertion = key.sign(&good_claims(&server));
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![
                    ("grant_type", "authorization_code"),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", &assertion),
                    ("scope", "system/*.read"),
                ],
                "unsupported_grant_type",
            ),
            (
                vec![
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", &assertion),
                    ("scope", "system/*.read"),
                ],
                "invalid_request",
            ),
            (
                vec![
                    ("grant_type", "client_credentials"),
                    ("client_assertion", &assertion),
                    ("scope", "system/*.read"),
                ],
                "invalid_request",
            ),
            (
                vec![
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("scope", "system/*.read"),
                ],
                "invalid_request",
            ),
            (
                vec![
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", &assertion),
                ],
                "invalid_scope",
            ),
            (
                vec![
                    ("grant_type", "client_credentials"),
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", &assertion),
                    ("scope", "system/*.read"),
                ],
                "invalid_request",
            ),
        ];
        for (form, error) in cases {
            let response = http
                .post(server.token_url())
                .form(&form)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{form:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], error, "{form:?}");
            let last = server.token_attempts().pop().unwrap();
            assert_eq!(last.outcome.unwrap_err().error, error);
        }

        let json_body = http
            .post(server.token_url())
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        assert_eq!(json_body.status(), 400);

        // A valid assertion asking only for scopes this server never grants.
        let fresh = key.sign(&good_claims(&server));
        let response = post_token(&http, &server, &fresh, "patient/*.read openid").await;
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_scope");
        assert!(server.issued_tokens().is_empty());
    }

    #[test]
    fn system_scopes_in_v1_and_v2_syntax_are_granted() {
        let granted = grant_scopes(
            "system/*.read system/Patient.rs system/Observation.cruds system/*.rs system/*.read",
        );
        assert_eq!(
            granted,
            [
                "system/*.read",
                "system/Patient.rs",
                "system/Observation.cruds",
                "system/*.rs"
            ]
        );
    }

    #[test]
    fn other_scopes_are_dropped() {
        for scope in [
            "patient/*.read",
            "user/Patient.rs",
            "system/Patient",
            "system/patient.read",
            "system/Patient.sr",
            "system/Patient.rr",
            "system/Patient.",
            "system/Observation.rs?category=laboratory",
            "launch",
            "openid",
        ] {
            assert!(
                grant_scopes(scope).is_empty(),
                "{scope} should not be granted"
            );
        }
    }

    #[test]
    fn read_access_follows_the_scope() {
        assert!(scope_allows_read("system/*.read", "Observation"));
        assert!(scope_allows_read("system/*.rs", "Observation"));
        assert!(scope_allows_read("system/Observation.cruds", "Observation"));
        assert!(scope_allows_read("system/*.*", "Condition"));
        assert!(!scope_allows_read("system/Patient.read", "Observation"));
        assert!(!scope_allows_read("system/*.s", "Observation"));
        assert!(!scope_allows_read("system/*.write", "Observation"));
    }

    #[test]
    fn resource_type_names_are_recognised() {
        for ok in ["Patient", "MedicationRequest", "Observation", "X1"] {
            assert!(is_resource_type_name(ok), "{ok}");
        }
        for bad in ["", "patient", "Patient-1", "Obs ervation", "Zoë", "*"] {
            assert!(!is_resource_type_name(bad), "{bad}");
        }
    }
}
