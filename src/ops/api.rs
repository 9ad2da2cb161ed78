//! The status API under `/api/v1`, and `/readyz`: what ran, what runs, what failed and why, as
//! JSON for scripts and dashboards; and the two things an operator may do, start a run and
//! cancel one.
//!
//! Everything shown comes from the read model [`super::report`]; runs are started and
//! cancelled through `sync`, never by writing run rows here. Errors share one shape,
//! `{"error":{"code":..,"message":..}}`, and never carry database or FHIR-server text: that is
//! logged, and the client is told to look at the log. The JSON shapes are documented in
//! `openapi.json` (served at `/api/v1/openapi.json`).

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use axum::{Json, Router};
use serde::Serialize;
use sqlx::PgPool;

pub use super::error::ApiError;
use super::error::database_unavailable;
use super::report::{self, JobOverview, RunFilter, RunSummary};
use super::state::OpsState;
use crate::sync::{self, CancelOutcome, Trigger};
use crate::warehouse::MIGRATOR;
use crate::warehouse::runs::RunStatus;

/// The OpenAPI 3.1 document describing every route of the ops server.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Runs listed when the request does not say.
pub const DEFAULT_RUN_LIMIT: i64 = 50;
/// Most runs one listing returns.
pub const MAX_RUN_LIMIT: i64 = 500;

/// How long `/readyz` waits for the database: well under an orchestrator's probe timeout, so a
/// hung database reads as "not ready" rather than as a probe that never answers.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// Every `/api/v1` route: method, path and handler. The router is built from this table, so
/// [`served_routes`] is exactly what is served, and the OpenAPI test checks the document
/// against it.
fn endpoints() -> Vec<(Method, &'static str, MethodRouter<OpsState>)> {
    vec![
        (Method::GET, "/api/v1/jobs", get(list_jobs)),
        (Method::POST, "/api/v1/jobs/{name}/run", post(start_run)),
        (Method::GET, "/api/v1/runs", get(list_runs)),
        (Method::GET, "/api/v1/runs/{id}", get(show_run)),
        (Method::POST, "/api/v1/runs/{id}/cancel", post(cancel_run)),
        (Method::GET, "/api/v1/views", get(list_views)),
        (Method::GET, "/api/v1/openapi.json", get(openapi)),
    ]
}

/// The (method, path) of every `/api/v1` route, paths in OpenAPI's `{param}` form.
pub fn served_routes() -> Vec<(Method, &'static str)> {
    endpoints()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

/// The `/api/v1` routes. They need the API token when one is configured.
pub fn routes() -> Router<OpsState> {
    endpoints()
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler)| {
            router.route(path, handler)
        })
        // An unknown API path answers in the API's error shape, not with an empty 404.
        .route("/api/v1/{*rest}", any(no_such_endpoint))
}

/// The routes anyone may call: `/readyz` (load balancers and orchestrators carry no token).
pub fn public_routes() -> Router<OpsState> {
    Router::new().route("/readyz", get(readyz))
}

async fn no_such_endpoint() -> ApiError {
    ApiError::NotFound("no such endpoint; see /api/v1/openapi.json".into())
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Why the service is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    DatabaseUnreachable,
    /// The database answered with an error (logged).
    DatabaseError,
    /// Embedded migrations not applied yet (`fhir-sync migrate`, or `serve` at start-up).
    Pending(Vec<i64>),
    /// Migrations whose last attempt failed, leaving the schema half-changed.
    Failed(Vec<i64>),
    /// Migrations applied with different contents than this binary embeds.
    Modified(Vec<i64>),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        match self {
            NotReady::DatabaseUnreachable => write!(f, "database unreachable"),
            NotReady::DatabaseError => write!(f, "database error; see the server log"),
            NotReady::Pending(v) => write!(f, "migrations pending: {}", versions(v)),
            NotReady::Failed(v) => write!(f, "migrations failed: {}", versions(v)),
            NotReady::Modified(v) => write!(
                f,
                "migrations applied with different contents: {}",
                versions(v)
            ),
        }
    }
}

/// Whether the database answers and every migration this binary embeds is applied,
/// successfully, with the same checksum.
pub async fn readiness(pool: &PgPool) -> Result<(), NotReady> {
    match tokio::time::timeout(READY_TIMEOUT, check_migrations(pool)).await {
        Err(_elapsed) => {
            tracing::warn!(
                timeout_ms = READY_TIMEOUT.as_millis() as u64,
                "readiness: the database did not answer in time"
            );
            Err(NotReady::DatabaseUnreachable)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the database check failed");
            Err(if database_unavailable(&e) {
                NotReady::DatabaseUnreachable
            } else {
                NotReady::DatabaseError
            })
        }
        Ok(Ok(problem)) => problem.map_or(Ok(()), Err),
    }
}

async fn check_migrations(pool: &PgPool) -> sqlx::Result<Option<NotReady>> {
    // sqlx records migrations in `_sqlx_migrations`, created by the first migration run; no
    // table means nothing is applied yet.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    let applied: Vec<(i64, Vec<u8>, bool)> = if exists {
        sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations")
            .fetch_all(pool)
            .await?
    } else {
        Vec::new()
    };
    let (mut pending, mut failed, mut modified) = (Vec::new(), Vec::new(), Vec::new());
    for migration in MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
    {
        match applied
            .iter()
            .find(|(version, ..)| *version == migration.version)
        {
            None => pending.push(migration.version),
            Some((_, _, false)) => failed.push(migration.version),
            Some((_, checksum, true)) if checksum[..] != migration.checksum[..] => {
                modified.push(migration.version)
            }
            Some(_) => {}
        }
    }
    // The most actionable problem first: a failed or edited migration blocks `migrate`.
    Ok(if !failed.is_empty() {
        Some(NotReady::Failed(failed))
    } else if !modified.is_empty() {
        Some(NotReady::Modified(modified))
    } else if !pending.is_empty() {
        Some(NotReady::Pending(pending))
    } else {
        None
    })
}

async fn readyz(State(state): State<OpsState>) -> Response {
    match readiness(&state.steps.pool).await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not_ready", "reason": reason.to_string()})),
        )
            .into_response(),
    }
}

/// `GET /api/v1/jobs`.
#[derive(Debug, Serialize)]
pub struct JobsResponse {
    pub jobs: Vec<JobOverview>,
}

async fn list_jobs(State(state): State<OpsState>) -> Result<Json<JobsResponse>, ApiError> {
    let mut jobs = state.steps.jobs();
    jobs.sort_by(|a, b| a.name.cmp(&b.name));
    let jobs = report::jobs(&state.steps.pool, &jobs, time::OffsetDateTime::now_utc()).await?;
    Ok(Json(JobsResponse { jobs }))
}

/// `GET /api/v1/views`.
#[derive(Debug, Serialize)]
pub struct ViewsResponse {
    pub views: Vec<crate::views::materialise::ViewStatus>,
}

async fn list_views(State(state): State<OpsState>) -> Result<Json<ViewsResponse>, ApiError> {
    let views = crate::views::materialise::states(&state.steps.pool).await?;
    Ok(Json(ViewsResponse { views }))
}

/// `GET /api/v1/runs`.
#[derive(Debug, Serialize)]
pub struct RunsResponse {
    pub runs: Vec<RunSummary>,
}

/// The query string's parameters, each at most once, only those in `allowed`. An empty value
/// counts as absent (`?job=` from a form left blank).
fn query_params(
    query: Option<&str>,
    allowed: &[&'static str],
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let mut params: Vec<(&'static str, String)> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let Some(known) = allowed.iter().find(|a| **a == name) else {
            return Err(ApiError::invalid(
                "query",
                format!(
                    "unknown parameter {name:?}; expected {}",
                    allowed.join(", ")
                ),
            ));
        };
        if params.iter().any(|(p, _)| p == known) {
            return Err(ApiError::invalid(known, "given more than once"));
        }
        if !value.is_empty() {
            params.push((known, value.into_owned()));
        }
    }
    Ok(params)
}

fn param<'a>(params: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(p, _)| *p == name)
        .map(|(_, v)| v.as_str())
}

/// Parses `?job=&status=&limit=` into a filter.
pub fn run_filter(query: Option<&str>) -> Result<RunFilter, ApiError> {
    let params = query_params(query, &["job", "status", "limit"])?;
    let status = param(&params, "status")
        .map(|text| {
            text.parse::<RunStatus>().map_err(|_| {
                ApiError::invalid(
                    "status",
                    format!(
                        "{text:?} is not a run status; expected one of {}",
                        RunStatus::spellings()
                    ),
                )
            })
        })
        .transpose()?;
    let limit = match param(&params, "limit") {
        None => DEFAULT_RUN_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_RUN_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("{text:?} is not a whole number from 1 to {MAX_RUN_LIMIT}"),
                )
            })?,
    };
    Ok(RunFilter {
        job: param(&params, "job").map(str::to_string),
        status,
        limit,
    })
}

async fn list_runs(
    State(state): State<OpsState>,
    RawQuery(query): RawQuery,
) -> Result<Json<RunsResponse>, ApiError> {
    let filter = run_filter(query.as_deref())?;
    let runs = report::runs(&state.steps.pool, &filter).await?;
    Ok(Json(RunsResponse { runs }))
}

fn run_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::invalid("id", format!("{text:?} is not a run id")))
}

async fn show_run(
    State(state): State<OpsState>,
    Path(id): Path<String>,
) -> Result<Json<report::RunDetail>, ApiError> {
    let id = run_id(&id)?;
    report::run_detail(&state.steps.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("there is no run {id}")))
}

/// `POST /api/v1/jobs/{name}/run`: the queued run.
#[derive(Debug, Serialize)]
pub struct RunStarted {
    pub run_id: i64,
    pub job: String,
    /// Always `queued`: the run starts when a worker takes it.
    pub status: RunStatus,
    pub full_export: bool,
    /// The job's unfinished run this one waits for (a job runs one at a time), if any.
    pub waits_for_run: Option<i64>,
}

async fn start_run(
    State(state): State<OpsState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref(), &["full"])?;
    let full = match param(&params, "full") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "full",
                format!("{other:?} is not true or false"),
            ));
        }
    };
    let Some(job) = state.steps.job(&name) else {
        return Err(ApiError::NotFound(format!(
            "there is no job named {name:?}"
        )));
    };
    if !job.enabled {
        return Err(ApiError::Conflict {
            code: "job_disabled",
            message: format!(
                "job {name:?} is disabled (enabled = false in its job file); enable it to run it"
            ),
        });
    }
    // A manual run never collides with another (only scheduled ticks are unique), so it is
    // queued even when the job is busy; its kick-off waits for the busy run to end.
    let waits_for_run =
        crate::warehouse::runs::unfinished_run(&state.steps.pool, &job.name).await?;
    let Some(run_id) = sync::enqueue_run(&state.steps, &job, Trigger::Manual, None, full).await?
    else {
        return Err(ApiError::Conflict {
            code: "run_exists",
            message: format!("a run of job {name:?} was created at the same moment; try again"),
        });
    };
    tracing::info!(job.name = %job.name, run.id = run_id, "run requested through the ops API");
    let body = RunStarted {
        run_id,
        job: job.name.clone(),
        status: RunStatus::Queued,
        full_export: full,
        waits_for_run,
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/runs/{run_id}"))],
        Json(body),
    )
        .into_response())
}

/// `POST /api/v1/runs/{id}/cancel`: what happened to the run and its export.
#[derive(Debug, Serialize)]
pub struct RunCancelled {
    pub run_id: i64,
    /// Always `cancelled`.
    pub status: RunStatus,
    /// `deleted`, `already_deleted`, `never_started` or `delete_failed`.
    pub export: &'static str,
    pub message: String,
}

async fn cancel_run(
    State(state): State<OpsState>,
    Path(id): Path<String>,
) -> Result<Json<RunCancelled>, ApiError> {
    let id = run_id(&id)?;
    let pool = &state.steps.pool;
    // The guarded transition decides, so a run that ends while this request is in flight is
    // either cancelled or reported finished, never both.
    if !crate::warehouse::runs::cancel(pool, id).await? {
        let status: Option<RunStatus> =
            sqlx::query_scalar("SELECT status FROM fhir_sync.run WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
        return Err(match status {
            None => ApiError::NotFound(format!("there is no run {id}")),
            Some(status) => ApiError::Conflict {
                code: "run_finished",
                message: format!("run {id} already ended {status}; there is nothing to cancel"),
            },
        });
    }
    tracing::info!(run.id = id, "run cancelled through the ops API");
    // The run is cancelled; what is left is deleting its export on the FHIR server, which
    // `cancel_run` does (its own cancel transition is now a no-op).
    let jobs: Vec<_> = state.steps.jobs().iter().map(|j| (**j).clone()).collect();
    let (export, message) = match sync::cancel_run(&state.steps, &jobs, id).await {
        Ok(CancelOutcome::Deleted) => ("deleted", "the export was deleted on the FHIR server"),
        Ok(CancelOutcome::AlreadyDeleted) => (
            "already_deleted",
            "the export had already been deleted on the FHIR server",
        ),
        Ok(CancelOutcome::NeverStarted) => (
            "never_started",
            "the run had not started an export; nothing to delete",
        ),
        Err(e) => {
            tracing::error!(run.id = id, error = %sync::error_chain(&e), "deleting the export of a cancelled run failed");
            (
                "delete_failed",
                "deleting the export on the FHIR server failed (see the server log); the next run of the job deletes it",
            )
        }
    };
    Ok(Json(RunCancelled {
        run_id: id,
        status: RunStatus::Cancelled,
        export,
        message: message.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(query: &str) -> (String, String) {
        match run_filter(Some(query)) {
            Err(ApiError::InvalidParameter { parameter, message }) => {
                (parameter.to_string(), message)
            }
            other => panic!("{query}: expected a bad parameter, got {other:?}"),
        }
    }

    #[test]
    fn run_filters_are_parsed_and_bad_parameters_named() {
        let filter = run_filter(None).unwrap();
        assert_eq!(
            (filter.job, filter.status, filter.limit),
            (None, None, DEFAULT_RUN_LIMIT)
        );
        let filter = run_filter(Some("job=epic%20prod&status=failed&limit=500")).unwrap();
        assert_eq!(filter.job.as_deref(), Some("epic prod"));
        assert_eq!(filter.status, Some(RunStatus::Failed));
        assert_eq!(filter.limit, 500);
        let filter = run_filter(Some("job=&status=&limit=")).unwrap();
        assert_eq!(
            (filter.job, filter.status, filter.limit),
            (None, None, DEFAULT_RUN_LIMIT)
        );

        for (query, parameter) in [
            ("status=runing", "status"),
            ("status=FAILED", "status"),
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=-1", "limit"),
            ("limit=ten", "limit"),
            ("limit=1&limit=2", "limit"),
            ("state=failed", "query"),
        ] {
            assert_eq!(error_of(query).0, parameter, "{query}");
        }
        assert!(error_of("status=runing").1.contains("succeeded"));
    }

    #[test]
    fn readiness_reasons_name_the_versions() {
        assert_eq!(
            NotReady::Pending(vec![20261129000400]).to_string(),
            "migrations pending: 20261129000400"
        );
        assert_eq!(
            NotReady::DatabaseUnreachable.to_string(),
            "database unreachable"
        );
    }
}
