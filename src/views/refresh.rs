//! Incremental refresh: after a run, the rows of exactly the resources it changed or deleted.
//!
//! A v2 view row depends on its own resource only, so the rows of the resources a run touched
//! (`last_run_id` or `deleted_by_run_id` is the run) are deleted and recomputed from the
//! warehouse's current state, one transaction per view. The run is first recorded in the
//! view's `pending_run_ids` (committed on its own), and cleared only in the transaction that
//! applies it: a refresh that fails or is killed leaves it there, the view `stale` (or
//! `error`), and the next refresh of any run applies it too. Recomputing from current state
//! makes the order of refreshes irrelevant and a repeated refresh harmless. A view whose table
//! is missing or holds another definition is built in full instead (`materialise::build`).
//! This module is a plain function for the engine to call; it does not queue anything.

use std::time::Instant;

use sqlx::PgPool;

use super::compile::ident;
use super::materialise::{self, definition_text, describe};
use super::{View, ViewError, ViewSet};

/// What a refresh did to one view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The delta was applied: rows removed and rows written.
    Applied {
        runs: Vec<i64>,
        deleted: u64,
        inserted: u64,
    },
    /// The view was built in full (new, or its definition changed).
    Built { rows: u64 },
    /// Nothing applied; the run stays pending for the next refresh.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewRefresh {
    pub name: String,
    pub outcome: Outcome,
    pub duration_ms: u64,
}

/// One refresh over every view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshReport {
    pub views: Vec<ViewRefresh>,
}

impl RefreshReport {
    /// Whether every view is current with the run.
    pub fn all_applied(&self) -> bool {
        self.views
            .iter()
            .all(|v| !matches!(v.outcome, Outcome::Failed(_)))
    }
}

/// Refreshes every view of `views` with the changes and deletions of run `run_id` (and of any
/// earlier run a failed refresh left pending). Idempotent and resumable; a failure of one view
/// is reported in its entry and does not stop the others. `Err` only when the view state
/// cannot be read or written at all.
pub async fn refresh_for_run(
    pool: &PgPool,
    views: &ViewSet,
    run_id: i64,
) -> Result<RefreshReport, ViewError> {
    let mut report = RefreshReport::default();
    for view in &views.views {
        let started = Instant::now();
        let outcome = refresh_view(pool, views, view, run_id).await?;
        report.views.push(ViewRefresh {
            name: view.name.clone(),
            outcome,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    Ok(report)
}

async fn refresh_view(
    pool: &PgPool,
    views: &ViewSet,
    view: &View,
    run_id: i64,
) -> Result<Outcome, ViewError> {
    let current: Option<bool> = sqlx::query_scalar(
        "SELECT definition_hash = md5($2) AND table_schema = $3 FROM fhir_sync.view_state WHERE name = $1",
    )
    .bind(&view.name)
    .bind(definition_text(view, &views.schema))
    .bind(&views.schema)
    .fetch_optional(pool)
    .await?;
    if current != Some(true) {
        return Ok(match materialise::build(pool, view, &views.schema).await {
            Ok(rows) => Outcome::Built { rows },
            Err(e) => Outcome::Failed(e),
        });
    }
    // Recorded and committed before any work: if what follows fails or never finishes, the
    // run is still owed to this view.
    sqlx::query(
        "UPDATE fhir_sync.view_state
         SET pending_run_ids = CASE WHEN $2 = ANY(pending_run_ids) THEN pending_run_ids
                                    ELSE array_append(pending_run_ids, $2) END,
             status = CASE WHEN status = 'error' THEN status ELSE 'stale' END
         WHERE name = $1",
    )
    .bind(&view.name)
    .bind(run_id)
    .execute(pool)
    .await?;
    let started = Instant::now();
    match apply_pending(pool, views, view, started).await {
        Ok(outcome) => Ok(outcome),
        Err(e) => {
            let reason = describe(&e);
            tracing::warn!(view.name = %view.name, run.id = run_id, error = %reason, "refreshing the view failed; it stays stale");
            sqlx::query(
                "UPDATE fhir_sync.view_state SET status = 'error', error = $2 WHERE name = $1",
            )
            .bind(&view.name)
            .bind(&reason)
            .execute(pool)
            .await?;
            Ok(Outcome::Failed(reason))
        }
    }
}

/// Applies every pending run of the view in one transaction.
async fn apply_pending(
    pool: &PgPool,
    views: &ViewSet,
    view: &View,
    started: Instant,
) -> Result<Outcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // The row lock serialises refreshes (and builds) of this view; runs recorded by others
    // while we hold it wait for our commit, so clearing the list below loses none.
    let runs: Vec<i64> = sqlx::query_scalar(
        "SELECT pending_run_ids FROM fhir_sync.view_state WHERE name = $1 FOR UPDATE",
    )
    .bind(&view.name)
    .fetch_one(&mut *tx)
    .await?;
    if runs.is_empty() {
        tx.commit().await?;
        return Ok(Outcome::Applied {
            runs,
            deleted: 0,
            inserted: 0,
        });
    }
    let table = format!("{}.{}", ident(&views.schema), ident(&view.name));
    let deleted = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {table} AS t USING fhir_sync.resource AS r
         WHERE r.resource_type = $1 AND (r.last_run_id = ANY($2) OR r.deleted_by_run_id = ANY($2))
           AND t.\"_source\" = r.source AND t.\"_resource_id\" = r.id"
    )))
    .bind(&view.compiled.resource)
    .bind(&runs)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} SELECT * FROM ({}) AS q",
        view.compiled
            .query_where("r.last_run_id = ANY($1) OR r.deleted_by_run_id = ANY($1)")
    )))
    .bind(&runs)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE fhir_sync.view_state
         SET pending_run_ids = '{}', status = 'fresh', error = NULL,
             row_count = row_count - $2 + $3,
             last_run_id = greatest(last_run_id, (SELECT max(x) FROM unnest($4::bigint[]) AS x)),
             refreshed_at = now(), refresh_duration_ms = $5
         WHERE name = $1",
    )
    .bind(&view.name)
    .bind(deleted as i64)
    .bind(inserted as i64)
    .bind(&runs)
    .bind(started.elapsed().as_millis() as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Outcome::Applied {
        runs,
        deleted,
        inserted,
    })
}
