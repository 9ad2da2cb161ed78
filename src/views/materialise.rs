//! Views as tables in schema `sof` (configurable): creation, rebuild on a changed definition,
//! and pruning of tables whose file is gone.
//!
//! A table has two key columns (`_source`, `_resource_id`, indexed) naming the resource each
//! row came from, then the view's typed columns. A build fills a shadow table and swaps it in
//! within one transaction that also holds the view's `fhir_sync.view_state` row lock, so readers
//! see the old table until the new one is complete and no refresh interleaves with the build.
//! `fhir_sync.view_state` is written only here and in `refresh`.

use std::time::Instant;

use sqlx::PgPool;

use super::compile::{KEY_COLUMNS, ident};
use super::{View, ViewError, ViewSet};

/// What `apply` did to one view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created {
        rows: u64,
    },
    Rebuilt {
        rows: u64,
    },
    Unchanged,
    /// A build failed; the previous table (if any) is untouched and the view is in `error`.
    Failed(String),
    Pruned,
}

/// `views apply` options.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Rebuild every view, changed or not.
    pub rebuild: bool,
    /// Drop the tables of views whose file is gone.
    pub prune: bool,
}

/// The text whose hash says which definition a table holds: its DDL and its query, so a
/// change of the compiler's output rebuilds too.
pub fn definition_text(view: &View, schema: &str) -> String {
    format!(
        "{}\n{}",
        create_table_sql(schema, &view.name, view),
        view.compiled.query()
    )
}

/// `CREATE TABLE` for a view's table named `table` in `schema`.
pub fn create_table_sql(schema: &str, table: &str, view: &View) -> String {
    let mut columns: Vec<String> = KEY_COLUMNS
        .iter()
        .map(|k| format!("{} text NOT NULL", ident(k)))
        .collect();
    columns.extend(
        view.compiled
            .columns
            .iter()
            .map(|c| format!("{} {}", ident(&c.name), c.sql_type)),
    );
    format!(
        "CREATE TABLE {}.{} ({})",
        ident(schema),
        ident(table),
        columns.join(", ")
    )
}

/// Creates missing tables, rebuilds changed (or, with `rebuild`, all) ones, and with `prune`
/// drops tables whose view is no longer in `views`.
pub async fn apply(
    pool: &PgPool,
    views: &ViewSet,
    options: ApplyOptions,
) -> Result<Vec<(String, Applied)>, ViewError> {
    let mut out = Vec::new();
    for view in &views.views {
        let current: Option<(bool, String)> = sqlx::query_as(
            "SELECT definition_hash = md5($2) AND status <> 'building', table_schema FROM fhir_sync.view_state WHERE name = $1",
        )
        .bind(&view.name)
        .bind(definition_text(view, &views.schema))
        .fetch_optional(pool)
        .await?;
        let applied = match current {
            Some((true, schema)) if schema == views.schema && !options.rebuild => {
                Applied::Unchanged
            }
            existing => match build(pool, view, &views.schema).await {
                Ok(rows) if existing.is_some() => Applied::Rebuilt { rows },
                Ok(rows) => Applied::Created { rows },
                Err(e) => Applied::Failed(e),
            },
        };
        out.push((view.name.clone(), applied));
    }
    if options.prune {
        let names: Vec<String> = views.views.iter().map(|v| v.name.clone()).collect();
        let gone: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, table_schema FROM fhir_sync.view_state WHERE name <> ALL($1) ORDER BY name",
        )
        .bind(&names)
        .fetch_all(pool)
        .await?;
        for (name, schema) in gone {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT 1 FROM fhir_sync.view_state WHERE name = $1 FOR UPDATE")
                .bind(&name)
                .execute(&mut *tx)
                .await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP TABLE IF EXISTS {}.{}",
                ident(&schema),
                ident(&name)
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM fhir_sync.view_state WHERE name = $1")
                .bind(&name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            out.push((name, Applied::Pruned));
        }
    }
    Ok(out)
}

/// Builds a view's table from every loaded resource and swaps it in. On failure the previous
/// table stays, and the view is marked `error` with the reason, which is returned.
pub async fn build(pool: &PgPool, view: &View, schema: &str) -> Result<u64, String> {
    let started = Instant::now();
    // Visible to operators while the build runs (the build's own transaction is not).
    let marked = sqlx::query(
        "INSERT INTO fhir_sync.view_state (name, table_schema, resource_type, definition_hash, status)
         VALUES ($1, $2, $3, '', 'building')
         ON CONFLICT (name) DO UPDATE SET status = 'building'",
    )
    .bind(&view.name)
    .bind(schema)
    .bind(&view.compiled.resource)
    .execute(pool)
    .await;
    if let Err(e) = marked {
        return Err(describe(&e));
    }
    match build_in_transaction(pool, view, schema, started).await {
        Ok(rows) => Ok(rows),
        Err(e) => {
            let reason = describe(&e);
            tracing::warn!(view.name = %view.name, error = %reason, "building the view failed");
            let _ = sqlx::query(
                "UPDATE fhir_sync.view_state SET status = 'error', error = $2 WHERE name = $1",
            )
            .bind(&view.name)
            .bind(&reason)
            .execute(pool)
            .await;
            Err(reason)
        }
    }
}

/// The reason a build or refresh failed, as stored in the view's status and shown by the
/// ops API. The compiled queries raise their own errors (they name view, column and resource
/// id, never values); any other database message could quote a resource's data (a value that
/// does not cast), so only its SQLSTATE is kept.
pub(crate) fn describe(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(db) if db.code().as_deref() == Some("22000") && db.message().starts_with("view ") => {
            db.message().to_string()
        }
        Some(db) => format!(
            "the database rejected the view's query (SQLSTATE {})",
            db.code().unwrap_or_default()
        ),
        None => format!("database error: {e}"),
    }
}

async fn build_in_transaction(
    pool: &PgPool,
    view: &View,
    schema: &str,
    started: Instant,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Holding the state row serialises this build with refreshes of the same view: one that
    // comes later waits and then applies its run to the new table.
    let old_schema: String = sqlx::query_scalar(
        "SELECT table_schema FROM fhir_sync.view_state WHERE name = $1 FOR UPDATE",
    )
    .bind(&view.name)
    .fetch_one(&mut *tx)
    .await?;
    let shadow = format!("{}__new", view.name);
    let (q_schema, q_table, q_shadow) = (ident(schema), ident(&view.name), ident(&shadow));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {q_schema}; DROP TABLE IF EXISTS {q_schema}.{q_shadow}; {}",
        create_table_sql(schema, &shadow, view)
    )))
    .execute(&mut *tx)
    .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {q_schema}.{q_shadow} SELECT * FROM ({}) AS q",
        view.compiled.query()
    )))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE INDEX {} ON {q_schema}.{q_shadow} (\"_source\", \"_resource_id\");
         DROP TABLE IF EXISTS {}.{q_table};
         DROP TABLE IF EXISTS {q_schema}.{q_table};
         ALTER TABLE {q_schema}.{q_shadow} RENAME TO {q_table};
         ALTER INDEX {q_schema}.{} RENAME TO {};
         ANALYZE {q_schema}.{q_table}",
        ident(&format!("{shadow}__key")),
        ident(&old_schema),
        ident(&format!("{shadow}__key")),
        ident(&format!("{}__key", view.name)),
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE fhir_sync.view_state SET table_schema = $2, resource_type = $3,
             definition_hash = md5($4), status = 'fresh', row_count = $5, pending_run_ids = '{}',
             last_run_id = (SELECT max(id) FROM fhir_sync.run), built_at = now(),
             refreshed_at = now(), refresh_duration_ms = $6, error = NULL
         WHERE name = $1",
    )
    .bind(&view.name)
    .bind(schema)
    .bind(&view.compiled.resource)
    .bind(definition_text(view, schema))
    .bind(rows as i64)
    .bind(started.elapsed().as_millis() as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(view.name = %view.name, rows, duration_ms = started.elapsed().as_millis() as u64, "view built");
    Ok(rows)
}

/// A view's row of `fhir_sync.view_state`: what operators see.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct ViewStatus {
    pub name: String,
    pub table_schema: String,
    pub resource_type: String,
    /// `fresh`, `stale` (runs pending), `building` or `error`.
    pub status: String,
    pub row_count: i64,
    /// The latest run whose changes the table holds.
    pub last_run_id: Option<i64>,
    /// Runs whose refresh began but has not committed (a failed or killed refresh).
    pub pending_run_ids: Vec<i64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub built_at: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub refreshed_at: Option<time::OffsetDateTime>,
    pub refresh_duration_ms: Option<i64>,
    pub error: Option<String>,
}

/// Every view's state, by name.
pub async fn states(pool: &PgPool) -> sqlx::Result<Vec<ViewStatus>> {
    sqlx::query_as(
        "SELECT name, table_schema, resource_type, status, row_count, last_run_id, pending_run_ids,
                built_at, refreshed_at, refresh_duration_ms, error
         FROM fhir_sync.view_state ORDER BY name",
    )
    .fetch_all(pool)
    .await
}

/// `SELECT * FROM <schema>.<view>` for tests and the demo, ordered by the key columns.
pub fn select_all_sql(schema: &str, name: &str) -> String {
    format!(
        "SELECT * FROM {}.{} ORDER BY 1, 2",
        ident(schema),
        ident(name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::{definition, prepare};

    #[test]
    fn the_table_has_key_columns_then_typed_view_columns() {
        let definition = definition::from_json(
            r#"{"name":"patient","resource":"Patient","select":[{"column":[
                {"name":"id","path":"id","type":"id"},{"name":"born","path":"birthDate","type":"date"},
                {"name":"active","path":"active","type":"boolean"}]}]}"#,
        )
        .unwrap();
        let compiled = prepare(&definition, true).unwrap();
        let view = View {
            file: "views/patient.json".into(),
            name: "patient".into(),
            definition,
            compiled,
        };
        assert_eq!(
            create_table_sql("sof", "patient", &view),
            "CREATE TABLE \"sof\".\"patient\" (\"_source\" text NOT NULL, \"_resource_id\" text NOT NULL, \"id\" text, \"born\" text, \"active\" boolean)"
        );
        assert!(definition_text(&view, "sof").ends_with(&view.compiled.query()));
    }
}
