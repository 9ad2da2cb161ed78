//! Deletions from servers that never list them: after a full run whose export was complete,
//! the rows of the exported types that the export no longer contained are marked deleted by
//! that run, so the warehouse (and the views, which refresh the rows a run deleted) follows
//! the server.
//!
//! One set-based statement per run, linear in the rows of the exported types: every resource
//! a full export contained was merged by the run, which sets its `last_run_id` to the run (a
//! version equal to the stored one is merged too), so a live row of those types with an older
//! `last_run_id` was not in the export. It must only be called for a full, complete,
//! unfiltered export: anything else would mark live resources deleted. Running it again marks
//! nothing more.

use sqlx::PgPool;

/// Which rows a run's reconciliation considers.
#[derive(Debug, Clone, Copy)]
pub struct Reconcile<'a> {
    /// The job (the rows' `source`).
    pub source: &'a str,
    pub run_id: i64,
    /// The types the export asked for (and was allowed): a type with no file in the manifest
    /// has no resource left on the server.
    pub types: &'a [String],
    /// A group export: only resources in the compartments of the Patients the export
    /// contained (the group's members now) are considered, and no Patient row. A patient who
    /// left the group is absent from its export without being deleted on the server, so their
    /// rows stay as they were.
    pub members_only: bool,
}

/// Marks deleted, by the run and as of its transactionTime, the live rows the export no longer
/// contained. Returns how many rows it marked.
pub async fn mark_missing_deleted(pool: &PgPool, scope: Reconcile<'_>) -> sqlx::Result<u64> {
    let marked = sqlx::query(
        "UPDATE fhir_sync.resource r
         SET deleted_at = coalesce(run.transaction_time::timestamptz, now()), deleted_by_run_id = $2
         FROM (SELECT transaction_time FROM fhir_sync.run WHERE id = $2) run
         WHERE r.source = $1 AND r.resource_type = ANY($3) AND r.deleted_at IS NULL
           AND r.last_run_id < $2
           AND (NOT $4 OR (r.resource_type <> 'Patient' AND r.patient_id IN (
                SELECT m.id FROM fhir_sync.resource m
                WHERE m.source = $1 AND m.resource_type = 'Patient' AND m.last_run_id = $2
                  AND m.deleted_at IS NULL)))",
    )
    .bind(scope.source)
    .bind(scope.run_id)
    .bind(scope.types)
    .bind(scope.members_only)
    .execute(pool)
    .await?;
    Ok(marked.rows_affected())
}
