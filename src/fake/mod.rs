//! The fake FHIR server that tests and the `demo` command run in-process: a SMART Backend
//! Services token endpoint and a Bulk Data `$export` server over deterministic synthetic data.
//!
//! It is meant to be as strict as a real EHR: it verifies client assertions against registered
//! JWK sets, requires the spec's headers and parameters, and answers with the spec's status codes,
//! headers and OperationOutcomes, so that a client that passes against it has a fair chance
//! against Epic or Oracle. It records every request and token attempt for tests to inspect, but
//! must never log a token, an assertion, a key or a resource body. It is not a FHIR server in
//! general: besides discovery, tokens and export it answers only `GET [base]/<type>?_count=1`, the
//! cheap authorised read `fhir-sync check` makes.
//!
//! All mutable state lives in one [`state::ServerState`] behind an `Arc`, and all knobs in
//! [`FakeOptions`]; scripted export faults (429 storms, cut and expiring files, paging, gzip,
//! one export at a time) are a [`Faults`] value in the options, fired by request count.

mod auth;
pub mod data;
mod discovery;
mod export;
mod exports;
mod faults;
mod outcome;
mod personality;
mod state;
#[cfg(test)]
mod test_client;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use jsonwebtoken::jwk::JwkSet;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use url::Url;

pub use data::{Dataset, RESOURCE_TYPES};
pub use export::ALL_PATIENTS_GROUP_ID;
pub use faults::Faults;
pub use personality::{
    ATHENAHEALTH_GROUP_ID, EPIC_RETRY_AFTER_SECONDS, ORACLE_RETRY_AFTER_SECONDS, ORACLE_TENANT,
    group_id,
};

use state::ServerState;

/// How long `shutdown` waits for open connections (a client still reading a file) to finish
/// before it stops the server anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the fake server behaves. Every field has a default chosen for fast tests.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Status polls answered with 202 before the manifest is returned. Default 1.
    pub polls_before_ready: u32,
    /// `Retry-After` seconds on an in-progress status response. Default 1.
    pub retry_after_seconds: u64,
    /// At most this many resources per NDJSON file (0 is treated as 1). Default 1000.
    pub resources_per_file: usize,
    /// `expires_in` of issued access tokens; tokens stop working after it. Default 300.
    pub token_lifetime_seconds: u64,
    /// The manifest's `requiresAccessToken`, and whether file downloads need the bearer token.
    /// Default true.
    pub requires_access_token: bool,
    /// Serve `.well-known/smart-configuration`; when false it answers 404 and clients must
    /// fall back to the CapabilityStatement. Default true.
    pub serve_smart_configuration: bool,
    /// Assertion algorithms advertised and accepted (others are refused). Default RS384, ES384.
    pub signing_algorithms: Vec<String>,
    /// SMART `capabilities` advertised. Without `permission-v1` v1 scopes are not granted,
    /// without `permission-v2` v2 scopes are not. Default: asymmetric client auth, v1 and v2.
    pub capabilities: Vec<String>,
    /// Declare the export operations in the CapabilityStatement. Default true.
    pub declare_export: bool,
    /// Grant read scopes only for these types (an EHR whose registration allows less than the
    /// client asks for). Default: any type.
    pub grantable_types: Option<Vec<String>>,
    /// The first this many token requests answer 503. Default 0.
    pub token_server_errors: u32,
    /// Refuse every correctly authenticated token request with `unauthorized_client`, as an
    /// EHR does for an app registered without backend access. Default false.
    pub deny_backend_access: bool,
    /// The first this many requests to protected endpoints answer 401 even with a valid token.
    /// Default 0.
    pub unauthorized_responses: u32,
    /// After this many requests to protected endpoints, every token issued so far stops
    /// working (as if it expired early or was revoked). Default: never.
    pub revoke_tokens_after_requests: Option<u32>,
    /// How `expires_in` is sent in token responses. Default [`ExpiresIn::Number`].
    pub expires_in: ExpiresIn,
    /// No authorisation at all: protected endpoints accept requests without a token (an open
    /// test server). Default false.
    pub open_access: bool,
    /// Scripted export faults (429 storms, cut downloads, expiring links...). Default none.
    pub faults: Faults,
    /// The EHR vendor the fake plays (see [`FakeOptions::vendor`]): it refuses what that
    /// vendor refuses. Default [`Vendor::Generic`](crate::vendor::Vendor::Generic), the spec.
    pub vendor: crate::vendor::Vendor,
    /// A tenant in the base URL: the FHIR endpoints live under `/r4/<tenant>` instead of
    /// `/fhir` (Oracle Health). Default none.
    pub tenant: Option<String>,
}

/// How the token endpoint sends `expires_in`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiresIn {
    /// A JSON number (the spec's form).
    Number,
    /// A JSON string of digits (seen in the wild).
    String,
    /// Not at all.
    Missing,
    /// `1e300`: a number no clock can add (a hostile or broken server).
    Absurd,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            polls_before_ready: 1,
            retry_after_seconds: 1,
            resources_per_file: 1000,
            token_lifetime_seconds: 300,
            requires_access_token: true,
            serve_smart_configuration: true,
            signing_algorithms: vec!["RS384".into(), "ES384".into()],
            capabilities: vec![
                "client-confidential-asymmetric".into(),
                "permission-v1".into(),
                "permission-v2".into(),
            ],
            declare_export: true,
            grantable_types: None,
            token_server_errors: 0,
            deny_backend_access: false,
            unauthorized_responses: 0,
            revoke_tokens_after_requests: None,
            expires_in: ExpiresIn::Number,
            open_access: false,
            faults: Faults::default(),
            vendor: crate::vendor::Vendor::Generic,
            tenant: None,
        }
    }
}

/// One token request and how the fake answered it.
#[derive(Clone, Debug)]
pub struct TokenAttempt {
    /// The assertion's `iss`, if the request got far enough to read it.
    pub client_id: Option<String>,
    /// The assertion header's `kid`, if the request got far enough to read it.
    pub kid: Option<String>,
    pub outcome: Result<(), TokenRefusal>,
}

/// Why a token request was refused: the OAuth error code (e.g. `invalid_client`) and the
/// specific reason sent as `error_description`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRefusal {
    pub error: String,
    pub description: String,
}

/// One HTTP request the fake answered. Header values that could carry credentials are never
/// kept, only whether an `Authorization` header was present.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub accept: Option<String>,
    pub prefer: Option<String>,
    pub had_authorization: bool,
    pub status: u16,
    /// The `Host` header: tells the primary origin from [`FakeFhirServer::start_other_origin`].
    pub host: Option<String>,
}

/// One export kick-off: its method, path and decoded parameters, in the order sent.
#[derive(Clone, Debug)]
pub struct RecordedKickOff {
    pub method: String,
    pub path: String,
    pub params: Vec<(String, String)>,
}

/// A running fake FHIR server on `127.0.0.1` with an OS-chosen port. Dropping it aborts the
/// server task; [`FakeFhirServer::shutdown`] stops it gracefully.
pub struct FakeFhirServer {
    state: Arc<ServerState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeFhirServer {
    /// Binds `127.0.0.1:0` and starts serving on a spawned task.
    pub async fn start(dataset: Dataset, options: FakeOptions) -> anyhow::Result<FakeFhirServer> {
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        FakeFhirServer::start_at(loopback, None, dataset, options).await
    }

    /// Binds `listen` and starts serving on a spawned task. `origin` is the scheme, host and
    /// port clients reach it at (in its URLs: discovery, status, files), when that is not the
    /// bound address: a container named `fake-ehr` listening on `0.0.0.0:8090` is reached at
    /// `http://fake-ehr:8090`.
    pub async fn start_at(
        listen: std::net::SocketAddr,
        origin: Option<Url>,
        dataset: Dataset,
        options: FakeOptions,
    ) -> anyhow::Result<FakeFhirServer> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the fake fhir server to {listen}"))?;
        let address = listener
            .local_addr()
            .context("reading the fake fhir server's bound address")?;
        let origin = match origin {
            Some(origin) => origin,
            None => Url::parse(&format!("http://{address}"))
                .context("building the fake fhir server's url")?,
        };
        let state = Arc::new(ServerState::new(options, dataset, origin));
        let app = router(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                // A dropped sender means the handle is gone; stop either way.
                let _ = stopped.await;
            });
            if let Err(err) = serve.await {
                tracing::warn!(error = %err, "fake fhir server stopped with an error");
            }
        });
        tracing::debug!(server.port = address.port(), "fake fhir server started");
        Ok(FakeFhirServer {
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The FHIR base, e.g. `http://127.0.0.1:PORT/fhir` (no trailing slash), or
    /// `http://127.0.0.1:PORT/r4/<tenant>` with a tenant.
    pub fn fhir_base_url(&self) -> Url {
        self.state.fhir_base_url()
    }

    /// The token endpoint, `http://127.0.0.1:PORT/auth/token`; assertions' `aud` must equal it.
    pub fn token_url(&self) -> Url {
        self.state.token_url()
    }

    /// Registers (or replaces) a client's public JWK set, as an EHR administrator would.
    pub fn register_client(&self, client_id: &str, jwks: JwkSet) {
        self.state
            .lock()
            .clients
            .insert(client_id.to_string(), jwks);
    }

    /// Registers a `client_secret_basic` client (CMS BCDA style).
    pub fn register_secret_client(&self, client_id: &str, secret: &str) {
        self.state
            .lock()
            .secret_clients
            .insert(client_id.to_string(), secret.to_string());
    }

    /// Registers the JWKS URL of a client; assertions from it may then carry exactly this `jku`.
    pub fn register_jku(&self, client_id: &str, jku: &str) {
        self.state
            .lock()
            .client_jkus
            .insert(client_id.to_string(), jku.to_string());
    }

    /// Issues an access token out of band, as a server's administrators do for clients that
    /// authenticate with a static bearer token: valid for a day, for the read scopes given.
    pub fn issue_static_token(&self, client_id: &str, scopes: &[&str]) -> String {
        let token = auth::random_token();
        let mut inner = self.state.lock();
        inner.tokens.insert(
            token.clone(),
            state::IssuedToken {
                client_id: client_id.to_string(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                expires_at: time::OffsetDateTime::now_utc() + time::Duration::days(1),
            },
        );
        inner.issued_tokens.push(token.clone());
        token
    }

    /// Registers a client by its JWKS URL, as Epic backend apps are: the fake fetches the key
    /// set from `url` at every token request, so a key the client publishes there later (a
    /// rotation) is accepted without registering it again. Assertions may carry `url` as `jku`.
    pub fn register_jwks_url(&self, client_id: &str, url: &Url) {
        let mut inner = self.state.lock();
        inner.jwks_urls.insert(client_id.to_string(), url.clone());
        inner
            .client_jkus
            .insert(client_id.to_string(), url.to_string());
    }

    /// Starts serving the same endpoints and state on another port of 127.0.0.1: another
    /// origin, for tests of where the bearer token may go.
    pub async fn start_other_origin(&self) -> anyhow::Result<OtherOrigin> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the other-origin fake server")?;
        let address = listener.local_addr()?;
        let app = router(self.state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(OtherOrigin {
            origin: Url::parse(&format!("http://{address}"))?,
            task,
        })
    }

    /// From now on, file downloads on this origin answer 307 to the same file on `other` with a
    /// one-time presigned query (as EHRs do with cloud storage); the presigned URL works without
    /// a token.
    pub fn redirect_files_to(&self, other: &OtherOrigin) {
        self.state.lock().redirect_files_to = Some(other.origin.clone());
    }

    /// Every token request so far, in order, with its outcome.
    pub fn token_attempts(&self) -> Vec<TokenAttempt> {
        self.state.lock().token_attempts.clone()
    }

    /// Every access token handed out, for tests that check no token leaked into logs.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.lock().issued_tokens.clone()
    }

    /// Every raw `client_assertion` received, for tests that check none leaked into logs.
    pub fn received_assertions(&self) -> Vec<String> {
        self.state.lock().received_assertions.clone()
    }

    /// Every HTTP request the server answered, in the order the responses were produced.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().requests.clone()
    }

    pub fn dataset(&self) -> &Dataset {
        &self.state.dataset
    }

    /// The options the server was started with.
    pub fn options(&self) -> &FakeOptions {
        &self.state.options
    }

    /// Every export kick-off, with its decoded parameters.
    pub fn kick_offs(&self) -> Vec<RecordedKickOff> {
        self.state.lock().kick_offs.clone()
    }

    /// The most file bodies the server was ever streaming at the same time.
    pub fn max_concurrent_files(&self) -> usize {
        self.state.lock().faults.max_open_files
    }

    /// How many file bodies were sent gzip-compressed.
    pub fn gzipped_files(&self) -> usize {
        self.state.lock().faults.gzipped_files
    }

    /// File bodies sent with `Content-Encoding: deflate`.
    pub fn deflated_files(&self) -> usize {
        self.state.lock().faults.deflated_files
    }

    /// Sets the members of Group `id` (patient indices of the data set), creating it: the
    /// group's exports hold only these patients' compartments, and `GET Group/{id}` lists
    /// them. Groups change between runs as patients join and leave.
    pub fn set_group(&self, id: &str, patients: impl IntoIterator<Item = usize>) {
        self.state
            .lock()
            .groups
            .insert(id.to_string(), patients.into_iter().collect());
    }

    /// Deletes the `index`-th resource of `resource_type` on the server: later exports leave
    /// it out and list it in no `deleted[]`, as many servers do.
    pub fn delete_resource(&self, resource_type: &str, index: usize) {
        self.state
            .lock()
            .removed
            .insert((resource_type.to_string(), index));
    }

    /// How many exports are known (kicked off and not deleted).
    pub fn export_count(&self) -> usize {
        self.state.lock().exports.len()
    }

    /// Stops accepting connections, lets in-flight requests finish (for at most a few seconds),
    /// and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            tracing::warn!("fake fhir server did not stop in time; aborting it");
            task.abort();
        }
    }
}

impl Drop for FakeFhirServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A second listener serving the fake server's endpoints on another origin. Dropping it stops it.
pub struct OtherOrigin {
    origin: Url,
    task: JoinHandle<()>,
}

impl OtherOrigin {
    /// `http://127.0.0.1:OTHER_PORT`.
    pub fn origin(&self) -> &Url {
        &self.origin
    }

    /// `url` moved to this origin (same path and query).
    pub fn rebase(&self, url: &Url) -> Url {
        let mut moved = url.clone();
        // Both are http://127.0.0.1 URLs, so only the port differs and setting it cannot fail.
        let _ = moved.set_port(self.origin.port());
        moved
    }
}

impl Drop for OtherOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(state: Arc<ServerState>) -> Router {
    let fhir = Router::new()
        .route(
            "/.well-known/smart-configuration",
            get(discovery::smart_configuration),
        )
        .route("/metadata", get(discovery::metadata))
        .route(
            "/$export",
            get(export::kick_off).post(export::post_kick_off),
        )
        .route(
            "/Patient/$export",
            get(export::kick_off).post(export::post_kick_off),
        )
        .route("/Group/{id}", get(export::read_group))
        .route(
            "/Group/{id}/$export",
            get(export::group_kick_off).post(export::group_post_kick_off),
        )
        .route(
            "/bulkstatus/{id}",
            get(export::status).delete(export::delete),
        )
        .route("/bulkfiles/{id}/{file}", get(export::file))
        .route("/{resource_type}", get(auth::search_probe));
    Router::new()
        .nest(&state.base_path(), fhir)
        .route("/auth/token", post(auth::token))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::redirect_files,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

async fn not_found() -> Response {
    outcome::error(StatusCode::NOT_FOUND, "not-found", "no such endpoint")
}

/// Records every request with the status it got. Only the presence of `Authorization` is
/// kept, and only the method, path and status are logged.
async fn record(State(state): State<Arc<ServerState>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let accept = header_text(headers, header::ACCEPT);
    let prefer = header_text(headers, header::HeaderName::from_static("prefer"));
    let had_authorization = headers.contains_key(header::AUTHORIZATION);
    let host = header_text(headers, header::HOST);
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(str::to_string);

    let response = next.run(request).await;

    let status = response.status().as_u16();
    tracing::debug!(
        http.method = %method,
        http.path = %path,
        http.status = status,
        "fake fhir server answered a request"
    );
    state.lock().requests.push(RecordedRequest {
        method,
        path,
        query,
        accept,
        prefer,
        had_authorization,
        status,
        host,
    });
    response
}

fn header_text(headers: &axum::http::HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use serde_json::Value;

    use super::test_client::Harness;
    use super::*;

    #[tokio::test]
    async fn discovery_documents_need_no_token() {
        let h = Harness::start(Dataset::new(1, 1), FakeOptions::default()).await;
        let base = h.server.fhir_base_url();
        assert!(!base.as_str().ends_with('/'));
        assert_eq!(base.path(), "/fhir");
        assert_eq!(h.server.token_url().path(), "/auth/token");

        let config = h
            .get(&format!("{base}/.well-known/smart-configuration"), None)
            .await;
        assert_eq!(config.status(), 200);
        assert_eq!(config.headers()["content-type"], "application/json");
        let config: Value = config.json().await.unwrap();
        assert_eq!(config["token_endpoint"], h.server.token_url().as_str());
        assert_eq!(
            config["token_endpoint_auth_methods_supported"],
            serde_json::json!(["private_key_jwt"])
        );
        assert_eq!(
            config["token_endpoint_auth_signing_alg_values_supported"],
            serde_json::json!(["RS384", "ES384"])
        );
        assert_eq!(
            config["grant_types_supported"],
            serde_json::json!(["client_credentials"])
        );
        let capabilities = config["capabilities"].as_array().unwrap();
        for capability in [
            "client-confidential-asymmetric",
            "permission-v1",
            "permission-v2",
        ] {
            assert!(capabilities.iter().any(|c| c == capability), "{capability}");
        }
        let scopes = config["scopes_supported"].as_array().unwrap();
        assert!(scopes.iter().any(|s| s == "system/*.read"));
        assert!(scopes.iter().any(|s| s == "system/*.rs"));

        let metadata = h.get(&format!("{base}/metadata"), None).await;
        assert_eq!(metadata.status(), 200);
        assert_eq!(metadata.headers()["content-type"], "application/fhir+json");
        let metadata: Value = metadata.json().await.unwrap();
        assert_eq!(metadata["resourceType"], "CapabilityStatement");
        assert_eq!(metadata["fhirVersion"], "4.0.1");
        assert_eq!(
            metadata["instantiates"][0],
            "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
        );
        let rest = &metadata["rest"][0];
        let oauth = &rest["security"]["extension"][0];
        assert_eq!(
            oauth["url"],
            "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
        );
        assert_eq!(oauth["extension"][0]["url"], "token");
        assert_eq!(
            oauth["extension"][0]["valueUri"],
            h.server.token_url().as_str()
        );
        assert_eq!(rest["operation"][0]["name"], "export");
        assert_eq!(
            rest["operation"][0]["definition"],
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"
        );
        let resource_export = |t: &str| {
            rest["resource"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["type"] == t)
                .map(|r| r["operation"][0]["definition"].clone())
        };
        assert_eq!(
            resource_export("Patient").unwrap(),
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
        );
        assert_eq!(
            resource_export("Group").unwrap(),
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"
        );
    }

    #[tokio::test]
    async fn every_request_is_recorded_without_header_values() {
        let h = Harness::start(Dataset::new(1, 1), FakeOptions::default()).await;
        let token = h.token().await;
        let kick_off = h.kick_off("$export?_type=Patient", &token).await;
        assert_eq!(kick_off.status(), 202);
        let missing = h
            .get(&format!("{}/Patient/123", h.server.fhir_base_url()), None)
            .await;
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.headers()["content-type"], "application/fhir+json");

        let requests = h.server.requests();
        assert_eq!(requests.len(), 3);
        let token_request = &requests[0];
        assert_eq!(
            (token_request.method.as_str(), token_request.path.as_str()),
            ("POST", "/auth/token")
        );
        assert_eq!(token_request.status, 200);
        assert!(!token_request.had_authorization);

        let export = &requests[1];
        assert_eq!(export.method, "GET");
        assert_eq!(export.path, "/fhir/$export");
        assert_eq!(export.query.as_deref(), Some("_type=Patient"));
        assert_eq!(export.accept.as_deref(), Some("application/fhir+json"));
        assert_eq!(export.prefer.as_deref(), Some("respond-async"));
        assert!(export.had_authorization);
        assert_eq!(export.status, 202);

        assert_eq!(requests[2].status, 404);
        assert!(!format!("{requests:?}").contains(&token));
    }

    #[tokio::test]
    async fn shutdown_stops_serving() {
        let h = Harness::start(Dataset::new(1, 1), FakeOptions::default()).await;
        let url = format!("{}/metadata", h.server.fhir_base_url());
        assert_eq!(h.get(&url, None).await.status(), 200);
        // A fresh client, so no pooled connection to the old server is reused.
        let Harness { server, .. } = h;
        server.shutdown().await;
        assert!(reqwest::Client::new().get(&url).send().await.is_err());
    }

    /// Collects everything a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // A current-thread runtime, so the subscriber set for this thread also sees the server task.
    #[tokio::test(flavor = "current_thread")]
    async fn logs_never_contain_tokens_or_assertions() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        // With exactly one live dispatcher, tracing-core computes a new callsite's interest from
        // the registering thread's default, so a callsite first hit by another test's thread
        // would be cached as "never" and this test would miss its events. A second live
        // dispatcher makes it consult every dispatcher instead.
        let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let _guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();

        let options = FakeOptions {
            polls_before_ready: 0,
            resources_per_file: 5,
            ..FakeOptions::default()
        };
        let h = Harness::start(Dataset::new(3, 2), options).await;
        let token = h.token().await;
        let refused = test_client::post_token(&h.http, &h.server, "a.b.c", "system/*.read").await;
        assert_eq!(refused.status(), 401);
        let kick_off = h.kick_off("$export", &token).await;
        let status_url = kick_off.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        let manifest: Value = h.get(&status_url, Some(&token)).await.json().await.unwrap();
        for entry in manifest["output"].as_array().unwrap() {
            let body = h
                .get(entry["url"].as_str().unwrap(), Some(&token))
                .await
                .text()
                .await
                .unwrap();
            assert!(!body.is_empty());
        }
        assert_eq!(
            h.get(&status_url, Some("forged-token-value"))
                .await
                .status(),
            401
        );

        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(
            logs.contains("fake fhir server answered a request"),
            "logging is captured"
        );
        assert!(logs.contains("fake token endpoint issued an access token"));
        let secrets = h
            .server
            .issued_tokens()
            .into_iter()
            .chain(h.server.received_assertions())
            .chain(["forged-token-value".to_string()]);
        for secret in secrets {
            assert!(!logs.contains(&secret), "a secret reached the logs");
        }
        let some_resource_id = h.server.dataset().id("Patient", 0);
        assert!(
            !logs.contains(&some_resource_id),
            "resource bodies reached the logs"
        );
    }
}
