//! The ops HTTP server run by `serve`: health, the client's public JWKS (so an EHR registered
//! with a JWKS URL sees a rotated key before it signs anything), the status API
//! ([`super::api`]), Prometheus metrics ([`super::metrics`]) and the status page
//! ([`super::page`]).
//!
//! The JWKS serves public keys only and must be fetchable without client authentication
//! (SMART requires it); `/healthz` and `/readyz` are open too. Everything else needs the API
//! token ([`super::auth`]) when one is configured, which settings validation insists on when
//! the server listens beyond loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use jsonwebtoken::jwk::JwkSet;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthMethod, JobConfig};
use crate::smart;

/// How long an EHR may cache the JWKS. Short, so a newly added key is seen soon; SMART says the
/// server must not cache longer than this.
const JWKS_MAX_AGE_SECONDS: u32 = 300;

/// The public keys of every job that signs assertions, in one set. Keys shared by several jobs
/// appear once; two different keys under one `kid` are refused (an EHR picks the key by kid).
pub fn jwks_of(jobs: &[Arc<JobConfig>]) -> Result<JwkSet, String> {
    let mut keys = Vec::new();
    for job in jobs
        .iter()
        .filter(|j| matches!(j.auth.method, AuthMethod::PrivateKeyJwt))
    {
        let job_keys = smart::job_keys(job).map_err(|e| format!("job {}: {e}", job.name))?;
        let set = smart::publish_jwks(&job_keys).map_err(|e| format!("job {}: {e}", job.name))?;
        keys.extend(set.keys);
    }
    let mut unique: Vec<jsonwebtoken::jwk::Jwk> = Vec::new();
    for key in keys {
        match unique.iter().find(|k| k.common.key_id == key.common.key_id) {
            Some(existing) if *existing == key => {}
            Some(_) => {
                return Err(format!(
                    "two different keys share kid {:?}; every key needs its own kid",
                    key.common.key_id.as_deref().unwrap_or("")
                ));
            }
            None => unique.push(key),
        }
    }
    Ok(JwkSet { keys: unique })
}

pub use super::state::OpsState;

/// The ops routes. With an API token configured (`ops.api_token_file` or
/// `FHIR_SYNC_OPS__API_TOKEN`), the API, the metrics and the status page require it; health,
/// readiness and the JWKS stay anonymous (probes and EHRs carry no token).
pub fn router(state: OpsState) -> Router {
    let mut protected = Router::new()
        .merge(super::api::routes())
        .merge(super::metrics::routes())
        .merge(super::page::routes());
    if let Some(token) = &state.settings.ops.api_token {
        // `route_layer`: only requests that match a route are checked, so the layer wraps
        // exactly the routes above and nothing merged later.
        protected = protected.route_layer(axum::middleware::from_fn_with_state(
            super::auth::ApiToken::new(token.clone()),
            super::auth::require_token,
        ));
    }
    let guard = super::auth::RequestGuard {
        allowed_hosts: Arc::new(state.settings.ops.allowed_hosts.clone()),
        beyond_loopback: state.settings.ops.listens_beyond_loopback(),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/.well-known/jwks.json", get(jwks_handler))
        .merge(super::api::public_routes())
        .merge(protected)
        .layer(axum::middleware::from_fn_with_state(
            guard,
            super::auth::guard_requests,
        ))
        .with_state(state)
}

async fn jwks_handler(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (
                header::CACHE_CONTROL,
                format!("public, max-age={JWKS_MAX_AGE_SECONDS}"),
            ),
        ],
        axum::Json(state.jwks.as_ref().clone()),
    )
}

/// Serves `router` on `listen` until `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (ops.listen): {e}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let stopped = shutdown.cancelled_owned();
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "the ops HTTP server stopped");
        }
    });
    tracing::info!(ops.listen = %bound, "ops HTTP server listening");
    Ok((bound, task))
}
